"""The driver's small parts: the staleness check at training time, the version a resumed job publishes under,
and the mechanism summary of a run's history."""

from __future__ import annotations

from cluster.driver import split_stale
from cluster.job import resume_version
from cluster.report import format_mechanisms, mechanism_summary
from learner.transport import SafetensorsTransport
from tests.conftest import make_traj


def _group(key: str, version: int) -> list:
    return [make_traj(f"{key}/{i}", key.split("#")[0], group_id=key, policy_version=version) for i in range(2)]


def test_split_stale_drops_groups_older_than_the_bound():
    held = [("1-0", _group("a#0", 5)), ("2-0", _group("b#0", 3)), ("3-0", _group("c#0", 4)), ("4-0", _group("d#0", 6))]
    fresh, stale = split_stale(held, version=6, max_staleness=1)
    assert [e for e, _ in fresh] == ["1-0", "4-0"]  # 6 - 5 = 1 and 6 - 6 = 0 are within the bound
    assert [e for e, _ in stale] == ["2-0", "3-0"]  # 3 and 2 versions old
    assert split_stale(held, version=6, max_staleness=3) == (held, [])


def test_resume_version_stays_monotonic(tmp_path):
    import torch

    run_dir = tmp_path
    assert resume_version(run_dir, 4) == 4  # nothing published yet: the checkpoint's version
    transport = SafetensorsTransport(run_dir / "published")
    w = {"x": torch.zeros(2)}
    transport.publish(w, 4)
    assert resume_version(run_dir, 4) == 4  # the lost run published nothing past the checkpoint
    transport.publish(w, 5)
    transport.publish(w, 6)
    # the lost run reached v6 after the v4 checkpoint: the restored weights become v7, so groups that v5 and
    # v6 generated are 2 and 1 versions old, not fresh (and never of negative age)
    assert resume_version(run_dir, 4) == 7


def test_mechanism_summary_of_a_history():
    rows = [
        {"mode": "rl", "step": 1, "hint_rate": 0.0, "replay_fraction": 0.0, "hints_active": 0,
         "tier_sizes": {"easy": 0, "medium": 0, "hard": 0}, "zero_adv_group_fraction": 0.5},
        {"mode": "rl", "step": 2, "hint_rate": 0.25, "replay_fraction": 0.5, "hints_active": 2,
         "tier_sizes": {"easy": 4, "medium": 4, "hard": 8}, "zero_adv_group_fraction": 0.25,
         "stale_dropped_total": 1, "judge_requests_total": 16},
    ]
    m = mechanism_summary(rows)
    assert m["hint_rate_mean"] == 0.125 and m["steps_with_hints"] == 1 and m["first_replay_step"] == 2
    assert m["replay_fraction_mean"] == 0.25 and m["tier_sizes"] == {"easy": 4, "medium": 4, "hard": 8}
    assert m["zero_adv_group_fraction_mean"] == 0.375 and m["stale_dropped"] == 1 and m["judge_requests"] == 16
    text = format_mechanisms(m)
    assert "hint rate 0.12 (hinted prompts on 1 of 2 steps, 2 hints on at the end)" in text
    assert "replay fraction 0.25 (from step 2)" in text and "4/4/8" in text
