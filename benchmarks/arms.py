"""The arms of AVATAR's component ablation (docs/method.md section 7), in one place: each arm's config file under
configs/ and the keys of the resolved config in which it may differ from configs/avatar_base.yaml (besides
`name`). benchmarks/sample_efficiency.py runs these files; tests/unit/test_ablation_configs.py fails when a
file differs from avatar_base.yaml in anything else, or does not change every key it names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REFERENCE = "avatar_base.yaml"

# the mechanisms, by the keys that switch them
REPLAY_OFF = ("pipeline.replay_per_group", "rollout.group_size")  # G_off = 0; the replayed half generated fresh
TAS_OFF = ("learner.objective.tas_shape",)  # uniform token weights
HINTS_OFF = ("buffer.hint.enabled",)
ALSO_ALLOWED = ("name",)  # every file names its run


@dataclass(frozen=True)
class Arm:
    config: str  # file name under configs/
    what: str  # what it changes, in words
    keys: tuple[str, ...]  # the resolved keys it may (and must) change against avatar_base.yaml

    @property
    def path(self) -> Path:
        return CONFIGS / self.config


ARMS: dict[str, Arm] = {
    "avatar": Arm(REFERENCE, "AVATAR: replay, TAS, hints", ()),
    "grpo": Arm("grpo_baseline.yaml", "replay off, uniform token weights, hints off", REPLAY_OFF + TAS_OFF + HINTS_OFF),
    "grpo4": Arm("grpo_4fresh.yaml", "replay off with AVATAR's G = 4 fresh (no replayed half), uniform token "
                 "weights, hints off", REPLAY_OFF[:1] + TAS_OFF + HINTS_OFF),
    "tas_only": Arm("ablation_tas_only.yaml", "replay off (G = 8 fresh)", REPLAY_OFF),
    "replay_only": Arm("ablation_replay_only.yaml", "uniform token weights", TAS_OFF),
    "no_hints": Arm("ablation_no_hints.yaml", "hints off", HINTS_OFF),
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}. Free-form mappings (reward.weights, tier_ratios) are one leaf each only
    when empty; a non-empty one flattens like a section, which still names the key that differs."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(cfg: BaseModel, reference: BaseModel) -> dict[str, tuple[Any, Any]]:
    """key -> (reference value, cfg value) for every resolved key whose value differs (a key only one side has
    counts, with None on the other)."""
    a, b = flatten(reference.model_dump()), flatten(cfg.model_dump())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def unexpected(arm: str, diff: dict[str, tuple[Any, Any]]) -> tuple[list[str], list[str]]:
    """(keys that differ but are not the arm's, keys of the arm that do not differ)."""
    allowed = set(ARMS[arm].keys) | set(ALSO_ALLOWED)
    return sorted(set(diff) - allowed), sorted(set(ARMS[arm].keys) - set(diff))
