"""The prompt order, the guard against a dataset whose media is mostly unreadable, and the held-out split."""

import json
import logging

import pytest

from cluster.config import load_config
from cluster.prompts import PromptOrder, check_skipped, eval_split_key, is_held_out, load_prompts, load_splits
from data.sample import PromptSample


def test_a_few_unreadable_prompts_pass_most_stop_the_job():
    check_skipped(19, 20, "x")  # under 20 skips: never stops (a small dataset with a few bad files)
    check_skipped(30, 60, "x")  # exactly half: goes on
    with pytest.raises(ValueError, match=r"31 of the first 60 prompts have unreadable media; the last: a.mp4: empty"):
        check_skipped(31, 60, "a.mp4: empty")


def test_each_pass_visits_every_prompt_once_with_pass_numbered_keys():
    samples = [PromptSample(id=f"p{i}", question="q", problem_type="numerical", answer="1") for i in range(5)]
    order = PromptOrder(samples, seed=3, shuffle=True)
    keys = [order.task(i)[0] for i in range(10)]
    assert sorted(keys[:5]) == [f"p{i}#0" for i in range(5)] and sorted(keys[5:]) == [f"p{i}#1" for i in range(5)]
    assert [order.task(i)[0] for i in range(10)] == keys  # deterministic


# --- the held-out evaluation split ----------------------------------------------------------------------------


def _manifest(path, ids, bad=()):
    rows = [json.dumps({"id": i, "question": "How many beeps?", "problem_type": "numerical", "answer": "2"})
            for i in ids] + list(bad)
    path.write_text("".join(r + "\n" for r in rows))
    return path


def test_manifest_holds_out_a_stable_share_by_id_disjoint_from_training(tmp_path):
    ids = [f"q{i}" for i in range(400)]
    manifest = _manifest(tmp_path / "m.jsonl", ids)
    cfg = load_config(None, [f"data.manifest={manifest}", "pipeline.eval_items=1000"])
    train, held = load_splits(cfg, tmp_path / "runs" / "x")
    train_ids, held_ids = {s.id for s in train}, {s.id for s in held}
    assert not train_ids & held_ids and train_ids | held_ids == set(ids)
    assert held_ids == {i for i in ids if eval_split_key(i) < 0.1}
    assert 20 <= len(held_ids) <= 60  # about 10% of 400
    assert [s.id for s in load_prompts(cfg, tmp_path / "runs" / "x", "eval")] == [s.id for s in held]
    # the split depends on the ids only, not on the row order
    reordered = _manifest(tmp_path / "r.jsonl", list(reversed(ids)))
    _, held2 = load_splits(load_config(None, [f"data.manifest={reordered}", "pipeline.eval_items=1000"]), tmp_path)
    assert {s.id for s in held2} == held_ids
    # a larger fraction holds out a superset; 0 holds out nothing
    big = load_splits(load_config(None, [f"data.manifest={manifest}", "data.eval_fraction=0.5",
                                         "pipeline.eval_items=1000"]), tmp_path)[1]
    assert held_ids < {s.id for s in big}
    none_train, none_held = load_splits(load_config(None, [f"data.manifest={manifest}", "data.eval_fraction=0"]),
                                        tmp_path)
    assert len(none_train) == 400 and none_held == []


def test_the_evaluation_uses_at_most_eval_items_held_out_prompts(tmp_path):
    manifest = _manifest(tmp_path / "m.jsonl", [f"q{i}" for i in range(400)])
    cfg = load_config(None, [f"data.manifest={manifest}", "pipeline.eval_items=5"])
    train, held = load_splits(cfg, tmp_path)
    assert len(held) == 5 and all(is_held_out(s.id, 0.1) for s in held)
    assert len(train) == 400 - sum(is_held_out(f"q{i}", 0.1) for i in range(400))  # the rest is not trained on
    assert load_splits(cfg, tmp_path, with_eval=False) == (train, [])


def test_eval_manifest_overlap_is_removed_from_training_with_a_warning(tmp_path, caplog):
    manifest = _manifest(tmp_path / "m.jsonl", [f"q{i}" for i in range(10)],
                         bad=['{"id": "t-bad", "question": 1, "problem_type": "numerical", "answer": "1"}'])
    evalm = _manifest(tmp_path / "e.jsonl", ["e0", "e1", "q3", "q7"], bad=["{nope"])
    cfg = load_config(None, [f"data.manifest={manifest}", f"data.eval_manifest={evalm}"])
    rejected: list = []
    with caplog.at_level(logging.WARNING, logger="cluster.prompts"):
        train, held = load_splits(cfg, tmp_path, rejected=rejected)
    assert [s.id for s in held] == ["e0", "e1", "q3", "q7"]  # eval_fraction plays no part
    assert [s.id for s in train] == [f"q{i}" for i in range(10) if i not in (3, 7)]
    assert "2 prompts of data.manifest" in caplog.text and "left out of training" in caplog.text
    assert [(r.manifest, r.line, r.id) for r in rejected] == [(str(manifest), 11, "t-bad"), (str(evalm), 5, None)]
    assert "question must be a string" in rejected[0].reason


def test_rejected_rows_are_listed_in_the_run_folder(tmp_path):
    from cluster.job import write_rejected_rows

    manifest = _manifest(tmp_path / "m.jsonl", ["a", "b"], bad=['{"id": "c", "question": "q", "problem_type": '
                                                                 '"numerical", "answer": "1", "difficulty": 2}'])
    rejected: list = []
    load_splits(load_config(None, [f"data.manifest={manifest}"]), tmp_path, rejected=rejected)
    listed = write_rejected_rows(tmp_path, rejected)
    assert listed == tmp_path / "rejected_rows.jsonl"
    assert [json.loads(line) for line in listed.read_text().splitlines()] == [
        {"manifest": str(manifest), "line": 3, "id": "c", "reason": "difficulty must be a string, got int 2"}]


def test_synthetic_eval_split_never_shares_an_id_with_training(tmp_path):
    cfg = load_config(None, ["data.synth.num_items=3", "data.synth.seconds=1", "data.synth.size=32",
                             "data.synth.fps=2", "pipeline.eval_items=3"])
    train, held = load_splits(cfg, tmp_path / "runs" / "x")
    assert len(train) == len(held) == 3 and not {s.id for s in train} & {s.id for s in held}
    assert [s.id for s in load_prompts(cfg, tmp_path / "runs" / "x", "eval")] == [s.id for s in held]
