"""benchmarks/sample_efficiency.py: the task it builds and the analysis of hand-made run histories."""

import json
import math

import pytest

from benchmarks import sample_efficiency as se
from benchmarks.stats import INF
from data.synth import SHORT_REASONING


def test_task_trains_stage0_on_half_and_holds_out_unseen_prompts(tmp_path):
    plan = se.Plan(train_items=6, sft_items=3, heldout_items=4)
    task = se.prepare_task(tmp_path, plan)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()]
            for name, path in (("train", task.train), ("sft", task.sft), ("heldout", task.heldout))}
    ids = {name: [r["id"] for r in rs] for name, rs in rows.items()}
    assert len(ids["train"]) == 6 and ids["sft"] == ids["train"][:3] and len(ids["heldout"]) == 4
    assert not set(ids["heldout"]) & set(ids["train"])
    assert {r["problem_type"] for r in rows["sft"]} == {"numerical", "multiple_choice"}  # both question kinds
    # short answers: a number as it is, a colour option by its text
    for r in rows["sft"]:
        spoken = next((o.split(". ", 1)[1] for o in r["options"] if o.startswith(f"{r['answer']}.")), r["answer"])
        assert r["cot"] == f"{SHORT_REASONING}<answer>{spoken}</answer>"
    assert se.prepare_task(tmp_path, plan) == task and task.train.stat().st_mtime  # made once


def _run(seed: int, accs: list[float], per_step: int, heldout: dict[int, float], hinted: bool = False) -> dict:
    """A run's summary and history: `accs` per step, `per_step` fresh completions each; held-out accuracy at the
    steps given (step -> accuracy), before = 0.25, after = the last value. Each step has a second group of
    accuracy 0.25, hinted or not."""
    rows = [{"completions_generated": per_step * (i + 1), "accuracy": a, "advantages_fresh": [0.0] * per_step,
             "advantages_replay": [], "heldout_accuracy": heldout.get(i + 1), "zero_adv_group_fraction": 0.5,
             "group_accuracy": [a, 0.25], "group_hinted": [False, hinted], "hint_rate": 0.0, "replay_fraction": 0.0,
             "tier_sizes": {"easy": 1, "medium": 2, "hard": 3}} for i, a in enumerate(accs)]
    summary = {"before": {"accuracy": 0.25}, "after": {"accuracy": heldout[len(accs)]}, "wall_seconds": 1.0}
    return se.run_record(seed, summary, rows, window=8)


def test_analysis_pairs_seeds_and_meets_at_equal_completions():
    plan = se.Plan(window=8, targets=(0.5, 0.99))
    # grpo: 8 completions a step, its window of 8 is one step: 0.5 and 0.99 at step 3 (24 completions); avatar:
    # 4 a step, its window is two steps: (0 + 1) / 2 at step 3 (12 completions), (1 + 0.9) / 2 = 0.95 at best.
    # Held-out at 16 completions: grpo's step 2, avatar's step 4
    results = {
        "grpo": [_run(s, [0.0, 0.0, 1.0, 1.0], 8, {2: 0.3, 4: 0.4}) for s in (0, 1)],
        "avatar": [_run(s, [0.0, 0.0, 1.0, 0.9], 4, {2: 0.5, 4: 0.6}, hinted=True) for s in (0, 1)],
    }
    a = se.analyse(results, plan)
    assert a["common_completions"] == 16 and a["heldout_points"] == [0, 16]
    assert a["arms"]["grpo"]["to_target"]["0.5"] == [24, 24] and a["arms"]["avatar"]["to_target"]["0.5"] == [12, 12]
    assert a["arms"]["grpo"]["to_target"]["0.99"] == [24, 24] and a["arms"]["avatar"]["to_target"]["0.99"] == [INF, INF]
    vs = a["vs_reference"]["grpo"]
    assert vs["to_target"]["0.5"]["ratio"] == 2.0
    assert vs["to_target"]["0.99"]["ratio"] == 0.0  # avatar never reached it: grpo's median / inf
    assert vs["heldout_at"]["16"]["diff"] == pytest.approx(0.6 - 0.3)  # avatar's step 4 against grpo's step 2
    assert vs["heldout_at"]["16"]["ci"] == (pytest.approx(0.3), pytest.approx(0.3))  # equal seeds: no spread
    assert vs["heldout_at"]["0"]["diff"] == 0.0
    # hinted groups apart: avatar's are the 0.25 groups; its unhinted ones average (0 + 0 + 1 + 0.9) / 4
    assert a["arms"]["avatar"]["train_acc_hinted"] == [0.25, 0.25]
    assert a["arms"]["avatar"]["train_acc_unhinted"] == [pytest.approx(0.475)] * 2
    assert math.isnan(a["arms"]["grpo"]["train_acc_hinted"][0])  # grpo had no hinted group
    assert a["arms"]["grpo"]["train_acc_unhinted"] == [pytest.approx((2 + 4 * 0.25) / 8)] * 2
    # mean training accuracy over completions 8-16: grpo's window is 0 until 16; avatar's is 0 until its step 3
    assert a["arms"]["grpo"]["mean_train_acc"][0] < a["arms"]["avatar"]["mean_train_acc"][0]
    lines = se.print_tables(a, plan)
    assert "| grpo | 2 | 0.250 [0.250, 0.250] | +0.000 [+0.000, +0.000] | 0.300 [0.300, 0.300] | +0.300 [+0.300, +0.300] |" in lines
    assert any(line.startswith("| grpo |") and "| 24 (24-24) (2/2 reached) | 2.00 |" in line for line in lines)
