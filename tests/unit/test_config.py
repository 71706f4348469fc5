from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, load_config
from learner.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_releases():
    cfg = load_config()
    assert cfg.learner.objective.clip_eps == 0.2 and cfg.learner.objective.kl_beta == 0.1
    assert cfg.learner.objective.tas_lambda == 0.3 and cfg.learner.objective.tas_shape == "parabola"
    assert cfg.buffer.capacity == 10_000 and cfg.buffer.tier_ratios == {"easy": 0.25, "medium": 0.35, "hard": 0.40}
    assert cfg.processor.max_frames == 16 and cfg.processor.max_pixels == 224 * 224


def test_avatar_base_spells_out_the_objectives_defaults_and_agrees_with_them():
    """configs/avatar_base.yaml names the release's objective for its readers; the defaults live in
    ObjectiveConfig, so the file must repeat them exactly (a default changed in one place only fails here)."""
    written = yaml.safe_load((ROOT / "configs" / "avatar_base.yaml").read_text())["learner"]["objective"]
    assert {"clip_eps", "kl_beta", "tas_shape", "tas_lambda", "vcrs_alpha"} <= set(written)
    defaults = ObjectiveConfig().model_dump()
    assert {k: defaults[k] for k in written} == written


def test_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: trial\nlearner:\n  lr: 1.0e-6\n  zero_stage: 1\n")
    cfg = load_config(path, ["learner.lr=2e-6", "rollout.group_size=8", "pipeline.max_staleness=2", "stage=3",
                             "reward.judge.allow_tiny=true"])
    assert cfg.name == "trial"
    assert cfg.learner.lr == pytest.approx(2e-6) and cfg.learner.zero_stage == 1
    assert cfg.rollout.group_size == 8 and cfg.pipeline.max_staleness == 2 and cfg.stage == 3


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.objective.clip_epsilon=0.3"])
    text = str(err.value)
    assert "learner.objective.clip_epsilon: unknown key" in text
    assert "clip_eps" in text and "tas_shape" in text


def test_bad_choice_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.objective.tas_shape=cosine"])
    text = str(err.value)
    assert "learner.objective.tas_shape" in text
    assert "'parabola'" in text and "'inverse_parabola'" in text and "'cosine'" in text


def test_bad_number_and_cross_field_checks():
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(None, ["rollout.group_size=0"])
    with pytest.raises(ConfigError, match="tier_ratios"):
        load_config(None, ["buffer.tier_ratios={easy: 0.5, medium: 0.5, hard: 0.5}"])


def test_worker_wait_s_is_checked_at_load():
    assert load_config(None, []).pipeline.worker_wait_s == 600.0
    assert load_config(None, ["pipeline.worker_wait_s=30"]).pipeline.worker_wait_s == 30.0
    for bad in ("0", "-5", "soon"):
        with pytest.raises(ConfigError, match="pipeline.worker_wait_s"):
            load_config(None, [f"pipeline.worker_wait_s={bad}"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_removed_learner_keys_are_unknown_keys():
    # the step count is pipeline.steps alone; micro-batches are accumulated over the whole batch by hand
    for key in ("learner.total_steps=1000", "learner.grad_accum_steps=4"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [key])
        assert f"{key.split('=')[0]}: unknown key" in str(err.value) and "warmup_ratio" in str(err.value)


def test_every_weight_medium_loads_and_a_broadcast_needs_the_vllm_engine():
    for medium in ("object_store", "shared_file", "gloo", "nccl"):
        assert load_config(None, [f"learner.transport={medium}"]).learner.transport == medium
    assert load_config(None, ["learner.transport=safetensors"]).learner.transport == "shared_file"  # old name
    assert load_config(None, []).learner.transport == "object_store"  # no shared filesystem assumed
    with pytest.raises(ConfigError, match="learner.transport gloo .* needs rollout.engine vllm"):
        load_config(None, ["learner.transport=gloo", "rollout.engine=hf"])
    with pytest.raises(ConfigError, match="learner.transport"):
        load_config(None, ["learner.transport=carrier_pigeon"])


def _model_folder(path, config=True, weights=True):
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"x")
    return path


def test_paths_are_checked_at_load_naming_key_and_path(tmp_path):
    good = _model_folder(tmp_path / "good")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    ok = load_config(None, [f"init_from={good}", f"model.path={good}", f"reward.judge.model_path={good}",
                            f"data.manifest={manifest}", f"data.eval_manifest={manifest}"])
    assert ok.init_from == str(good) and ok.data.eval_manifest == str(manifest)

    cases = {
        f"init_from={tmp_path / 'runs/stage1/exprot'}": f"init_from: {tmp_path / 'runs/stage1/exprot'} does not exist",
        f"model.path={_model_folder(tmp_path / 'noconf', config=False)}": "model.path: "
        f"{tmp_path / 'noconf'} has no config.json",
        f"reward.judge.model_path={_model_folder(tmp_path / 'noweights', weights=False)}": "reward.judge.model_path: "
        f"{tmp_path / 'noweights'} has no weights",
        f"init_from={manifest}": f"init_from: {manifest} is not a folder",
        f"data.manifest={tmp_path / 'nope.jsonl'}": f"data.manifest: {tmp_path / 'nope.jsonl'} does not exist",
        f"data.eval_manifest={tmp_path}": f"data.eval_manifest: {tmp_path} is not a file",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert message in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:  # every wrong path at once
        load_config(None, [f"init_from={tmp_path / 'a'}", f"data.manifest={tmp_path / 'b'}"])
    assert "init_from:" in str(err.value) and "data.manifest:" in str(err.value)


def test_curriculum_init_from_is_checked_when_the_stage_starts(tmp_path):
    """A later stage's init_from is set by run_curriculum to the previous stage's export, which does not exist
    when the configs load: loading skips it (unchecked_paths), run_stage checks it before starting anything."""
    from cluster.job import run_stage

    missing = tmp_path / "runs" / "stage0" / "export"
    cfg = load_config(None, [f"init_from={missing}", f"run_dir={tmp_path / 'runs'}"], unchecked_paths=("init_from",))
    with pytest.raises(ConfigError, match=f"init_from: {missing} does not exist"):
        run_stage(cfg)
    assert not (tmp_path / "runs").exists()  # stopped before the run folder, Ray or Redis
    with pytest.raises(ConfigError, match="data.manifest"):  # only the named keys are skipped
        load_config(None, [f"data.manifest={tmp_path / 'x'}"], unchecked_paths=("init_from",))
