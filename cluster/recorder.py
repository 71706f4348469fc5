"""The step recorder: one history row and the Prometheus series per step, from the learner's step summary
(counts, means, ids), the counters that came with the workers' answers, and one stats call to the replay service."""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from .components import Components
from .config import JobConfig
from .metrics import DriverMetrics
from .state import RunState

BUFFER_EVENTS = ("pushed_groups", "duplicates", "dead_lettered", "rejected", "reclaimed", "inserted", "evicted",
                 "sampled", "acked")
FROM_SUMMARY = ("reward_mean", "accuracy", "reward_terms", "loss", "kl", "clip_fraction", "zero_adv_token_fraction",
                "staleness_max", "stale_token_share", "hint_rate", "accuracy_hinted", "accuracy_unhinted", "group_hinted", "replay_fraction", "zero_adv_group_fraction", "group_accuracy", "trained_groups",
                "trained_prompts", "advantages_fresh", "advantages_replay", "judge_missing")


def history_row(stage: int, state: RunState, summary: dict, buffer_stats: dict, reward_stats: dict,
                worker_stats: list[dict], extra: dict) -> dict:
    """One history row: the learner's step summary, the run's counters and the components' stats."""
    tiers = {k: int(buffer_stats.get(f"tier_{k}", 0)) for k in ("easy", "medium", "hard")}
    judge_n = reward_stats.get("judge_requests", 0)
    return {
        "mode": "rl", "stage": stage, "step": state.step, "policy_version": state.policy_version,
        "completions_generated": state.completions_generated,
        **{k: summary[k] for k in FROM_SUMMARY}, "step_seconds": summary["seconds"],
        "hints_active": int(buffer_stats.get("hints_active", 0)),
        "stale_dropped_total": state.counters.get("stale_dropped", 0),
        "judge_requests_total": int(judge_n),
        "judge_failures_total": reward_stats.get("judge_failures", 0),
        "judge_latency_seconds": reward_stats.get("judge_latency_s_sum", 0.0) / judge_n if judge_n else 0.0,
        "tier_sizes": tiers, "fresh_length": int(buffer_stats.get("fresh_length", 0)),
        "buffer_events": {**{e: int(buffer_stats.get(e, 0)) for e in BUFFER_EVENTS},
                          "skipped_prompt": state.counters.get("skipped_prompts", 0)}, "time": time.time(),
        # cumulative busy seconds of the rollout workers (generation) and reward workers (scoring)
        "rollout_generate_seconds": sum(s.get("generate_seconds", 0.0) for s in worker_stats),
        "rollout_tokens": sum(s.get("tokens", 0) for s in worker_stats),  # cumulative completion tokens
        # weight updates that reached requests in flight (rollout.weight_update), cumulative: completions whose
        # tokens span versions, their tokens from before their last version, updates applied with requests
        # frozen in the engine, requests aborted by an update and submitted again
        **{f"rollout_{k}": sum(s.get(k, 0) for s in worker_stats)
           for k in ("mixed_version_completions", "tokens_before_update", "updates_in_flight", "resubmitted")},
        "reward_scoring_seconds": float(reward_stats.get("scoring_s_sum", 0.0)),
        **extra,
    }


class StepRecorder:
    def __init__(self, cfg: JobConfig, comps: Components, metrics: DriverMetrics, history: Path):
        self.cfg, self.comps, self.metrics, self.history = cfg, comps, metrics, history

    def record(self, state: RunState, summary: dict, worker_stats: tuple[dict, list[dict], float],
               extra: dict) -> dict:
        """`worker_stats`: (reward workers' counters summed, each rollout worker's counters, weight-load seconds),
        as they came with the workers' answers; the replay service's counters take one call."""
        rewards, rollouts, load_s = worker_stats
        row = history_row(self.cfg.stage, state, summary, ray.get(self.comps.buffer.stats.remote()), rewards,
                          rollouts, {"weight_load_seconds": round(load_s, 4), **extra})
        with self.history.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.metrics.row = row  # the driver's own series; the components export theirs (common/metrics.py)
        return row
