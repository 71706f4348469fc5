"""The learner as Ray actors with two ranks (two processes, gloo): it learns at ZeRO 1 and 2, and the
ranks agree on the step's metrics."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from learner.actor import LearnerGroup
from learner.config import LearnerConfig
from policy.config import TinyModelConfig
from policy.tiny import ensure_tiny_model

from .test_learner import make_group, problem

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    before = set(glob.glob("/dev/shm/deepspeed_*"))
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}})
    try:
        yield ray
    finally:
        ray.shutdown()
        for path in set(glob.glob("/dev/shm/deepspeed_*")) - before:
            try:
                os.unlink(path)
            except OSError:
                pass


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_raise_logprob_of_rewarded_completion(ray_session, tmp_path, zero_stage):
    model = ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path / "models")
    cfg = LearnerConfig(zero_stage=zero_stage, num_ranks=2, lr=1e-2, warmup_ratio=0.0, micro_batch_size=2)
    group = LearnerGroup(cfg, model, total_steps=4, publish_dir=tmp_path / "pub")
    try:
        prompt, comps = problem()

        def logps(items):
            return group.completion_logprobs(items)

        before = [sum(x) for x in logps(make_group(lambda p: [[0.0] * len(c) for c in comps], prompt, comps,
                                                   [0] * 4, "x"))]
        for step in range(4):
            out = group.train_step([make_group(logps, prompt, comps, [1.0, 0.0, 0.0, 0.0], f"g{step}")])
        after = [sum(x) for x in logps(make_group(lambda p: [[0.0] * len(c) for c in comps], prompt, comps,
                                                  [0] * 4, "x"))]
        gains = [a - b for a, b in zip(after, before)]
        assert gains[0] > max(gains[1:]) + 5.0, gains
        assert out["step"] == 4 and out["sequences"] == 4 and out["tokens"] == sum(len(c) for c in comps)
        assert set(out["mean_logratio_old_ref"]) == {f"g3/{i}" for i in range(4)}  # gathered from both ranks
        assert all(v is not None for v in out["mean_logratio_old_ref"].values())
        published = group.publish()
        assert published["version"] == 1 and Path(published["location"]).is_file()
        assert group.state()["policy_version"] == 1
    finally:
        group.shutdown()
