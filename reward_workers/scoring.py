"""Scoring one group: every reward term into Trajectory.rewards, the stage-weighted total into .reward."""

from __future__ import annotations

import time

from buffer_service.records import Trajectory
from data.sample import PromptSample

from .config import STAGE_WEIGHTS, RewardConfig
from .judge import Judge, JudgeRequest, judge_frames
from .rewards import GroupContext, accuracy_reward, format_reward, self_consistency_reward


def stage_weights(cfg: RewardConfig, stage: int) -> dict[str, float]:
    """The configured term weights, else the stage's defaults (the paper's for stages 1 and 2)."""
    if cfg.weights is not None:
        return dict(cfg.weights)
    if stage not in STAGE_WEIGHTS:
        raise ValueError(f"stage: no default reward weights for stage {stage}; set reward.weights")
    return dict(STAGE_WEIGHTS[stage])


def score_group(
    trajectories: list[Trajectory],
    sample: PromptSample,
    cfg: RewardConfig,
    judge: Judge | None = None,
) -> list[Trajectory]:
    """Fill .rewards, .reward and .scored_at of every trajectory of one group (in place; also returned).

    format and accuracy are always computed (cheap, and training accuracy is worth watching in every stage);
    self and judge only when weighted. A judge failure stores rewards["judge"] = None (missing) and adds
    weight * cfg.judge.fallback to the total.

    The judge sees the prompt's video: cfg.judge.num_frames frames read here from sample.video, once for the
    whole group. A video that cannot be read fails every judge request of the group (fallback, marked
    missing, counted as judge_media_failures; the reason is logged)."""
    if not trajectories:
        return trajectories
    stage = trajectories[0].stage
    weights = stage_weights(cfg, stage)
    texts = [t.completion_text for t in trajectories]
    group = GroupContext.of(texts, sample, cfg.numerical)
    terms: list[dict[str, float | None]] = [
        {"format": format_reward(c, sample, group), "accuracy": accuracy_reward(c, sample, group)}
        for c in texts
    ]
    if weights.get("self"):
        for t, c in zip(terms, texts):
            t["self"] = self_consistency_reward(c, sample, group)
    values = [dict(t) for t in terms]  # what enters the total (fallbacks included)
    if weights.get("judge"):
        if judge is None:
            raise ValueError(f"stage {stage} weights the judge term but no judge was given")
        frames, media_error = judge_frames(sample, cfg.judge)
        results = judge.score([JudgeRequest.of(c, sample, frames, media_error) for c in texts])
        for t, v, r in zip(terms, values, results):
            t["judge"], v["judge"] = r.score, r.value
    now = time.time()
    for traj, t, v in zip(trajectories, terms, values):
        traj.rewards = t
        traj.reward = sum(w * (v.get(k) or 0.0) for k, w in weights.items())
        traj.scored_at = now
    return trajectories
