"""The learning-rate schedule follows the stage's length: pipeline.steps is the one step count."""

import pytest

from cluster.components import learner_args
from cluster.config import load_config
from learner.learner import WarmupSchedule


def test_warmup_is_ceil_of_ratio_times_stage_steps():
    s = WarmupSchedule.for_stage(0.05, 1000)
    assert (s.warmup, s.total) == (50, 1000)  # avatar_base: 1000 steps warm up over 50 (it was 5)
    assert s(0) == pytest.approx(1 / 51) and s(49) == pytest.approx(50 / 51) and s(50) == s(999) == 1.0
    assert WarmupSchedule.for_stage(0.05, 24).warmup == 2  # ceil(1.2)
    assert WarmupSchedule.for_stage(0.05, 200).warmup == 10
    assert WarmupSchedule.for_stage(0.07, 100).warmup == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert WarmupSchedule.for_stage(0.0, 100).warmup == 0 and WarmupSchedule.for_stage(0.05, 0).warmup == 0


def test_decay_ends_at_the_stage_end():
    lin = WarmupSchedule.for_stage(0.1, 20, "linear")  # warm-up 2, then 1 - (step - 2) / 18
    assert [lin(k) for k in (0, 1, 2, 11, 20)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5, 0.0])
    cos = WarmupSchedule.for_stage(0.1, 20, "cosine")
    assert [cos(k) for k in (2, 11, 20)] == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize(("config", "steps", "warmup"), [
    ("configs/avatar_base.yaml", 1000, 50), ("configs/stage0_sft.yaml", 200, 10),
    ("configs/demo_stage0.yaml", 200, 10), ("configs/demo.yaml", 24, 2),
])
def test_the_learner_is_given_the_stage_steps(config, steps, warmup):
    cfg = load_config(config)
    args = learner_args(cfg, rl=cfg.stage != 0)
    assert args["total_steps"] == cfg.pipeline.steps == steps
    assert WarmupSchedule.for_stage(args["cfg"].warmup_ratio, args["total_steps"]).warmup == warmup
    other = learner_args(load_config(config, ["pipeline.steps=40"]), rl=True)
    assert other["total_steps"] == 40  # an override of the stage's length moves the schedule with it
