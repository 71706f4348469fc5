"""The per-prompt statistics the hint rule and the tiers read: R(q), the task-reward mean, the zero-reward
streak, the KL to the reference and the hint flag. Pushes and inserts update them inside their own scripts
(stream.py, tiers.py); this module holds the settings those scripts read and answers the driver's reads."""

from __future__ import annotations

import json

from buffer_service.config import BufferConfig
from buffer_service.records import Trajectory
from buffer_service.store import Store


def task_reward(traj: Trajectory) -> float:
    """The task term of a scored completion (accuracy, else the judge's score, else the total): the per-prompt
    task-reward mean that the paper's hint trigger reads, kept apart from R(q) (the total-reward baseline)."""
    for term in ("accuracy", "judge"):
        value = traj.rewards.get(term)
        if value is not None:
            return float(value)
    return float(traj.reward)


def script_settings(config: BufferConfig, **extra) -> str:
    """The settings every script reads (hint rule, quantiles, windows), as one JSON argument."""
    hint = config.hint
    return json.dumps({
        "prefix": config.redis.key_prefix, "hq": config.hard_quantile, "mq": config.medium_quantile,
        "rbar_window": config.rbar_window, "kl_window": config.rbar_window, "dedup_window": config.dedup_window_groups,
        "enabled": hint.enabled, "trigger": hint.trigger, "zero_reward_streak": hint.zero_reward_streak,
        "streak_on": "total" if hint.trigger == "zero_total_streak" else "task", "max_rbar": hint.max_rbar,
        "task_reward_max": hint.task_reward_max, "kl_max": hint.kl_max,
        "min_completions": hint.min_completions, "lapse_when_not_hard": hint.lapse_when_not_hard, **extra,
    })


class PromptStates:
    def __init__(self, store: Store):
        self.store = store

    def read(self, prompt_ids: list[str]) -> dict[str, dict]:
        """prompt id -> its state, the hint rule evaluated now (the quantiles move as other prompts change)."""
        if not prompt_ids:
            return {}
        rows = self.store.scripts["states"](keys=self.store.keys("rbar", "hinted"),
                                            args=[script_settings(self.store.config), *prompt_ids])
        out = {}
        for pid, rbar, streak, hint, tier, count, task, kl in rows:
            out[pid.decode()] = {
                "rbar": float(rbar) if rbar else None,
                "streak": int(streak),
                "hint_active": bool(hint),
                "tier": tier.decode() if tier else None,
                "count": int(count),
                "task_mean": float(task) if task else None,
                "kl": float(kl) if kl else None,
            }
        return out

    def top_streaks(self, k: int = 10) -> list[tuple[str, int]]:
        rows = self.store.r.zrevrange(self.store.k["streak"], 0, k - 1, withscores=True)
        return [(pid.decode(), int(score)) for pid, score in rows]
