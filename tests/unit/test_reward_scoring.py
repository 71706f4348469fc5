"""Stage weighting and score_group: per-term values next to the stage-weighted total."""

import pytest

from buffer_service.records import Trajectory
from data.sample import PromptSample
from reward_workers.config import RewardConfig
from reward_workers.judge import Judge
from reward_workers.scoring import score_group, stage_weights

VALID = (
    '{"audio_grounding_score": 1, "visual_id_score": 1, "location_acc_score": 0.5, "caption_corr_score": 0.5}'
)
MC = PromptSample(
    id="p1",
    question="Which colour?",
    problem_type="multiple_choice",
    answer="B",
    options=["A. red", "B. green", "C. blue"],
)


def group(texts, stage):
    return [
        Trajectory(
            trajectory_id=f"t{i}",
            group_id="g",
            prompt_id="p1",
            prompt_token_ids=[1],
            completion_token_ids=[2],
            behaviour_logprobs=[-0.1],
            policy_version=0,
            completion_text=t,
            stage=stage,
        )
        for i, t in enumerate(texts)
    ]


class FixedBackend:
    def __init__(self, outputs):
        self.outputs = outputs

    def complete(self, batch):
        return self.outputs[: len(batch)]

    def close(self):
        pass


def test_stage_weights_defaults_and_override():
    assert stage_weights(RewardConfig(), 1) == {"format": 0.5, "accuracy": 0.5}
    assert stage_weights(RewardConfig(), 2) == {"format": 0.2, "accuracy": 0.4, "self": 0.4}
    assert stage_weights(RewardConfig(), 3) == {"format": 0.5, "judge": 1.0}
    assert stage_weights(RewardConfig(weights={"accuracy": 1.0}), 2) == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="stage 7"):
        stage_weights(RewardConfig(), 7)


def test_stage1_format_and_accuracy():
    texts = [
        "<think>1. green</think><answer>B</answer>",
        "<answer>B</answer>",
        "<think>x</think><answer>A</answer>",
        "",
    ]
    trajs = score_group(group(texts, 1), MC, RewardConfig())
    assert [t.rewards for t in trajs] == [
        {"format": 1.0, "accuracy": 1.0},
        {"format": 0.0, "accuracy": 1.0},
        {"format": 1.0, "accuracy": 0.0},
        {"format": 0.0, "accuracy": 0.0},
    ]
    assert [t.reward for t in trajs] == [1.0, 0.5, 0.5, 0.0]
    assert all(t.scored_at is not None for t in trajs)


def test_stage2_adds_self_consistency():
    texts = [
        "<think>a</think><answer>A</answer>",
        "<think>b</think><answer>A</answer>",
        "<think>c</think><answer>B</answer>",
        "<answer>B</answer>",
        "<think>d</think><answer>C</answer>",
    ]
    trajs = score_group(group(texts, 2), MC, RewardConfig())
    # majority: A and B tie at 2 -> "A" (smallest); B is the right answer
    assert [t.rewards["self"] for t in trajs] == [1, 1, 0, 0, 0]
    expected = [0.2 + 0.4, 0.2 + 0.4, 0.2 + 0.4, 0.4, 0.2]
    assert [t.reward for t in trajs] == pytest.approx(expected)


def test_stage3_judge_terms_and_missing_on_failure():
    texts = [
        "<think>a</think><answer>Left: girl</answer>",
        "Left: girl",
        "<think>c</think><answer>x</answer>",
    ]
    cfg = RewardConfig()
    cfg.judge.fallback = 0.2
    cfg.judge.retries = 0
    judge = Judge(cfg.judge, FixedBackend([VALID, "garbage", TimeoutError("slow")]))
    trajs = score_group(group(texts, 3), MC, cfg, judge)
    assert [t.rewards["judge"] for t in trajs] == [
        0.75,
        None,
        None,
    ]  # (1 + 1 + 0.5 + 0.5) / 4; failures missing
    assert [t.reward for t in trajs] == pytest.approx(
        [0.5 + 0.75, 0.0 + 0.2, 0.5 + 0.2]
    )  # fallback in the total
    assert "self" not in trajs[0].rewards and "accuracy" in trajs[0].rewards  # accuracy kept for monitoring
    assert judge.stats()["judge_failures"] == 2


def test_judge_weighted_without_judge_is_an_error():
    with pytest.raises(ValueError, match="no judge"):
        score_group(group(["x"], 3), MC, RewardConfig())
    assert score_group([], MC, RewardConfig()) == []


def test_dense_numerical_from_config():
    s = PromptSample(id="n", question="How many?", problem_type="numerical", answer="10")
    texts = ["<think>a</think><answer>12</answer>"]
    assert score_group(group(texts, 1), s, RewardConfig(numerical="dense"))[0].rewards[
        "accuracy"
    ] == pytest.approx(0.8)
    assert score_group(group(texts, 1), s, RewardConfig())[0].rewards["accuracy"] == 0.0
