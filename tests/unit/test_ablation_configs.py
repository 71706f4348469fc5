"""The ablations and the GRPO baseline isolate one thing each (issue 15, item 8): every file builds on
configs/avatar_base.yaml and its resolved config differs from avatar_base's in `name` and the keys its arm
names in benchmarks/arms.py, nothing else; the sample-efficiency benchmark runs these files with overrides
that are the same for every arm."""

from pathlib import Path

import pytest
import yaml

from benchmarks import sample_efficiency
from benchmarks.arms import ARMS, CONFIGS, REFERENCE, differences, unexpected
from cluster.config import load_config

BASE = load_config(CONFIGS / REFERENCE)

# hand-written: (avatar_base value, arm value) for every key that differs
EXPECTED = {
    "grpo": {
        "name": ("avatar", "grpo_baseline"),
        "buffer.hint.enabled": (True, False),
        "learner.objective.tas_shape": ("parabola", "uniform"),
        "pipeline.replay_per_group": (4, 0),
        "rollout.group_size": (4, 8),
    },
    "grpo4": {  # AVATAR's 4 fresh per prompt, without its replayed 4
        "name": ("avatar", "grpo_4fresh"),
        "buffer.hint.enabled": (True, False),
        "learner.objective.tas_shape": ("parabola", "uniform"),
        "pipeline.replay_per_group": (4, 0),
    },
    "tas_only": {
        "name": ("avatar", "ablation_tas_only"),
        "pipeline.replay_per_group": (4, 0),
        "rollout.group_size": (4, 8),
    },
    "replay_only": {
        "name": ("avatar", "ablation_replay_only"),
        "learner.objective.tas_shape": ("parabola", "uniform"),
    },
    "no_hints": {
        "name": ("avatar", "ablation_no_hints"),
        "buffer.hint.enabled": (True, False),
    },
}


def test_every_ablation_file_is_an_arm():
    files = {p.name for p in CONFIGS.glob("ablation_*.yaml")} | {"grpo_baseline.yaml", "grpo_4fresh.yaml"}
    assert files <= {a.config for a in ARMS.values()}
    assert set(EXPECTED) == set(ARMS) - {"avatar"} and ARMS["avatar"].config == REFERENCE


@pytest.mark.parametrize("arm", sorted(EXPECTED))
def test_arm_differs_from_avatar_base_in_its_mechanism_only(arm):
    path = ARMS[arm].path
    assert yaml.safe_load(path.read_text())["base"] == REFERENCE
    diff = differences(load_config(path), BASE)
    assert unexpected(arm, diff) == ([], [])
    assert diff == EXPECTED[arm]


def test_grpo_keeps_avatar_base_staleness_and_stage():
    grpo = load_config(ARMS["grpo"].path)
    assert grpo.pipeline.max_staleness == BASE.pipeline.max_staleness == 1
    assert grpo.stage == BASE.stage == 1 and grpo.data == BASE.data  # stage-agnostic: set on the command line


def test_the_check_catches_a_second_difference():
    # the old baseline: synchronous, on stage2.yaml -> staleness and the stage show up as not the arm's keys
    lax = load_config(ARMS["grpo"].path, ["pipeline.max_staleness=0", "stage=2", "data.synth.stage=2"])
    extra, missing = unexpected("grpo", differences(lax, BASE))
    assert extra == ["data.synth.stage", "pipeline.max_staleness", "stage"] and missing == []
    # and an arm that forgets its mechanism: tas_only with replay back on
    undone = load_config(ARMS["tas_only"].path, ["pipeline.replay_per_group=4"])
    assert unexpected("tas_only", differences(undone, BASE)) == ([], ["pipeline.replay_per_group"])


def test_benchmark_runs_the_config_files_with_shared_overrides(tmp_path: Path):
    arms = list(ARMS)
    plan = sample_efficiency.Plan(steps=3, lr=1e-4)
    task = sample_efficiency.task_paths(tmp_path)  # the manifests need not exist to check the arms
    diffs = sample_efficiency.check_arms(arms, plan, task, runs=tmp_path, seed=1)
    assert {a: set(d) for a, d in diffs.items()} == {a: set(ARMS[a].keys) for a in arms}
    assert diffs["tas_only"] == {"pipeline.replay_per_group": (4, 0), "rollout.group_size": (4, 8)}
    assert sample_efficiency.arm_config("grpo") == "configs/grpo_baseline.yaml"
    # the benchmark scale reaches every arm alike
    for arm in arms:
        cfg = load_config(ARMS[arm].path, sample_efficiency.arm_overrides(arm, 1, plan, task, None, tmp_path),
                          unchecked_paths=sample_efficiency.MANIFEST_KEYS)
        assert (cfg.stage, cfg.pipeline.steps, cfg.pipeline.max_staleness, cfg.learner.lora.enabled) == (2, 3, 0, False)
        assert cfg.reward.weights == {"accuracy": 1.0} and cfg.name == f"{arm}_s1" and cfg.learner.lr == 1e-4
        assert cfg.data.manifest == str(task.train) and cfg.data.eval_manifest == str(task.heldout)
        assert cfg.pipeline.eval_every == plan.eval_every and cfg.pipeline.eval_items == plan.heldout_items
