"""The step summary the learner hands back to the driver: counts, means and ids, never a trajectory.

Pure: computed from the trained fresh groups, the replayed samples and the train step's statistics, so the
driver can record a history row and Prometheus metrics without receiving the data it was computed from."""

from __future__ import annotations

from collections.abc import Sequence

from buffer_service.records import ReplaySample, Trajectory

SCALARS = ("loss", "kl", "clip_fraction", "zero_adv_token_fraction", "seconds")


def mean_present(values) -> float:
    """The mean of the values that are not None (0.0 when none are)."""
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else 0.0


def _accuracy(trajs: Sequence[Trajectory]) -> float | None:
    values = [t.rewards.get("accuracy") for t in trajs]
    return mean_present(values) if any(v is not None for v in values) else None


def step_summary(groups: Sequence[Sequence[Trajectory]], replay: Sequence[ReplaySample], stats: dict,
                 policy_version: int) -> dict:
    """`stats` is Learner.train_step's result (advantages by trajectory id among them)."""
    trajs = [t for g in groups for t in g]
    terms = sorted({k for t in trajs for k in t.rewards})
    term_means = {k: mean_present([t.rewards.get(k) for t in trajs]) for k in terms}
    return {
        **{k: stats[k] for k in SCALARS},
        "trained_groups": [g[0].group_id for g in groups],
        "trained_prompts": [g[0].prompt_id for g in groups],
        "completions": len(trajs),
        "replayed": len(replay),
        "reward_mean": mean_present([t.reward for t in trajs]),
        "reward_terms": term_means,
        "accuracy": term_means.get("accuracy", 0.0),
        "hint_rate": mean_present([float(g[0].hinted) for g in groups]),
        # apart, as a hint may make its prompt easier: None when the step had no such group
        "accuracy_hinted": _accuracy([t for g in groups if g[0].hinted for t in g]),
        "accuracy_unhinted": _accuracy([t for g in groups if not g[0].hinted for t in g]),
        "group_hinted": [bool(g[0].hinted) for g in groups],
        "replay_fraction": len(replay) / (len(trajs) + len(replay)),
        "group_accuracy": [mean_present([t.rewards.get("accuracy") for t in g]) for g in groups],
        "zero_adv_group_fraction": mean_present([float(len({t.reward for t in g}) == 1) for g in groups]),
        "staleness_max": max(policy_version - t.policy_version for t in trajs),
        "stale_token_share": stale_token_share(trajs, policy_version),
        "advantages_fresh": [round(stats["advantages"][t.trajectory_id], 4) for t in trajs],
        "advantages_replay": [round(stats["advantages"][s.trajectory.trajectory_id], 4) for s in replay],
        "judge_missing": sum(1 for t in trajs if "judge" in t.rewards and t.rewards["judge"] is None),
    }


def stale_token_share(trajs: Sequence[Trajectory], policy_version: int) -> float:
    """The share of the fresh completion tokens sampled by a version older than the one being trained (per token:
    a completion that took a weight update in flight counts its tokens from before and after it apart)."""
    total = stale = 0
    for t in trajs:
        versions = t.token_policy_versions or [t.policy_version] * len(t.completion_token_ids)
        total += len(versions)
        stale += sum(v < policy_version for v in versions)
    return stale / total if total else 0.0
