"""The driver's parts, each alone: the task ledger (staleness bound, cursor), the task hand-out, the rollout
workers' health, the stream's and the workers' accounting, the retry policy (by exception type), the learner's
step summary, the version a resumed job publishes under, and the mechanism summary."""

from __future__ import annotations

import pytest
import ray

from actors.tasks import PromptTask
from buffer_service.records import ReplaySample
from cluster.accounting import StreamAccounting, WorkerCounters, newer_counters
from cluster.committer import Committer
from cluster.handout import TaskHandout
from cluster.job import resume_version
from cluster.ledger import TaskLedger
from cluster.report import format_mechanisms, mechanism_summary
from cluster.retry import DATA_LOST, WORKER_LOST, ScoringRetries, classify
from cluster.state import RunState
from cluster.worker_health import WorkerHealth
from learner.summary import step_summary
from learner.weights.shared_file import SharedFileSender
from tests.conftest import make_traj


def _group(key: str, version: int, rewards=(0.0, 1.0), hinted=False) -> list:
    return [make_traj(f"{key}/{i}", key.split("#")[0], reward=r, group_id=key, policy_version=version, hinted=hinted)
            for i, r in enumerate(rewards)]


def test_ledger_bounds_tasks_by_staleness_and_lost_tasks():
    state = RunState(step=2)
    ledger = TaskLedger(state, per_step=4, max_staleness=1, max_in_flight=100, dedup_window=1000)
    assert ledger.allowed() == (2 + 1 + 1) * 4 == 16
    state.counters.update({"lost_before_cursor": 1, "stale_dropped": 2})
    assert ledger.allowed() == 19  # each task that brings no group lets another one start
    assert ledger.next_indices(in_flight=0) == range(0, 19)
    small = TaskLedger(RunState(), per_step=4, max_staleness=1, max_in_flight=3, dedup_window=1000)
    assert small.next_indices(in_flight=1) == range(0, 2)  # max_prompts_in_flight leaves room for 2


def test_ledger_cursor_waits_for_the_first_group_not_in_the_buffer():
    state = RunState(cursor=10)
    ledger = TaskLedger(state, per_step=2, max_staleness=0, max_in_flight=100, dedup_window=1000)
    for key in ("a", "b", "c", "d"):
        ledger.handed_out(key)  # indices 10..13
    ledger.in_buffer("b")
    ledger.advance()
    assert state.cursor == 10  # "a" holds it back
    ledger.no_group("a")  # skipped media: the cursor may pass it, and it counts as lost once passed
    ledger.advance()
    assert state.cursor == 12 and state.counters["lost_before_cursor"] == 1 and ledger.lost_here == {}
    ledger.given_up("c")  # scoring given up: another task takes its place, the cursor stays before it
    ledger.in_buffer("d")
    ledger.advance()
    assert state.cursor == 12 and ledger.lost == 2 and ledger.submitted == 14


def test_retry_policy_is_decided_by_exception_type():
    assert classify(ray.exceptions.ActorDiedError()) == WORKER_LOST
    assert classify(ray.exceptions.ActorUnavailableError("restarting", None)) == WORKER_LOST
    assert classify(ray.exceptions.OwnerDiedError(ray.ObjectRef.nil().hex(), "", "")) == DATA_LOST
    # a failure whose text names an actor error is still not one
    assert classify(RuntimeError("ActorDiedError: the worker died")) is None
    retries = ScoringRetries(max_retries=2)
    assert [retries.again("k"), retries.again("k"), retries.again("k"), retries.again("j")] == [True, True, False, True]


def test_a_reward_workers_older_counters_never_replace_newer_ones():
    old, new = {"groups_scored": 3, "groups_failed": 1, "judge_failures": 4}, {"groups_scored": 5, "groups_failed": 0}
    assert newer_counters(None, old) is old
    assert newer_counters(old, new) is new
    assert newer_counters(new, old) is new  # a report read late brings the older reply


def test_groups_pushed_past_the_learners_read_still_count_toward_the_next_batch(tmp_path):
    state = RunState()
    stream = StreamAccounting(state)
    committer = Committer(tmp_path, state, None, lambda ids: None)
    stream.pushed = 8  # one rollout call's report: 8 groups in the stream
    # the learner reads a batch (4) and trains it: the other 4 are still in the stream, a batch for the next step
    stream.learner_read({"trained": True, "entry_ids": ["1-0", "2-0", "3-0", "4-0"], "stale": [], "held": 0}, committer)
    assert (stream.pushed, stream.learner_held) == (4, 0) and stream.batch_may_be_ready(4)
    # it reads 3 (one stale, dropped) and holds 2 without training; one more push makes a batch
    stale = [("5-0", "p5#0", 0)]
    assert stream.learner_read({"trained": False, "stale": stale, "held": 2}, committer) == ["p5#0"]
    assert (stream.pushed, stream.learner_held) == (1, 2) and not stream.batch_may_be_ready(4)
    stream.pushed += 1
    assert stream.batch_may_be_ready(4) and state.counters["stale_dropped"] == 1
    assert state.pending_ack == ["5-0"]  # the stale group is acknowledged with the next checkpoint


def _tasks(*keys):
    return [PromptTask(key=k, sample=None) for k in keys]


def test_handout_deals_round_robin_over_the_workers_that_answer_and_keeps_the_rest_waiting():
    sent = []

    def call(i, tasks):
        sent.append((i, [t.key for t in tasks]))
        return f"ref{len(sent)}"  # stands in for the call's ObjectRef

    handout = TaskHandout(call)
    handout.give(_tasks("a", "b", "c"), live=[0, 2])
    assert sent == [(0, ["a", "c"]), (2, ["b"])]  # one call per worker
    assert handout.tasks_in_flight == 3 and not handout.idle
    handout.give(_tasks("d"), live=[0, 2])  # the deal goes on where it stopped
    assert sent[-1] == (2, ["d"])
    handout.give(_tasks("e", "f"), live=[])  # nobody answers: the tasks wait, still counted in flight
    assert handout.unassigned and handout.tasks_in_flight == 6 and len(sent) == 3
    handout.give_waiting(live=[])
    assert len(sent) == 3
    handout.give_waiting(live=[1])
    assert sent[-1] == (1, ["e", "f"]) and handout.unassigned == [] and handout.tasks_in_flight == 6


def test_worker_health_probes_a_lost_worker_once_and_counts_failed_weight_loads():
    probed = []
    health = WorkerHealth(["rollout-0", "rollout-1"], wait_s=60, max_load_failures=2,
                          probe=lambda i: probed.append(i) or f"probe{i}")
    assert health.lost(1) and not health.lost(1)  # its second failed call while away is not a new loss
    assert probed == [1] and health.live() == [0] and health.away_names() == ["rollout-1"]
    assert health.availability.away and set(health.probes) == {1}
    assert [health.weight_load("w0", "bad file"), health.weight_load("w0", "bad file")] == [1, 2]
    assert health.weight_load("w0", None) == 0  # a good load resets the count
    assert [health.weight_load("w0", "x"), health.weight_load("w0", "x")] == [1, 2]
    with pytest.raises(RuntimeError, match="w0 failed to load the published weights 3 times in a row "
                                           r"\(pipeline.max_weight_load_failures 2\): x"):
        health.weight_load("w0", "x")


def test_worker_counters_keep_each_workers_latest_and_take_load_seconds_once():
    counters = WorkerCounters()
    counters.rollout_report("w0", {"node_id": "n1", "completions": 8, "version": 2, "groups_scoring": 1}, 0.5)
    counters.rollout_report("w1", {"node_id": "n2", "completions": 4, "version": 1, "groups_scoring": 2}, 0.25)
    counters.rollout_report("w0", {"node_id": "n1", "completions": 12, "version": 3, "groups_scoring": 0}, 0.0)
    counters.reward_receipt(0, {"groups_scored": 2, "judge_requests": 2})
    counters.reward_receipt(0, {"groups_scored": 1, "judge_requests": 1})  # an older reply read late
    counters.reward_receipt(1, {"groups_scored": 3, "judge_requests": 3})
    assert counters.groups_scoring == 2
    assert counters.rollout_summary() == {"w0": {"node": "n1", "completions": 12, "version": 3},
                                          "w1": {"node": "n2", "completions": 4, "version": 1}}
    reward, rollout, load_s = counters.take()
    assert reward["groups_scored"] == 5 and reward["judge_requests"] == 5 and load_s == 0.75 and len(rollout) == 2
    assert counters.take()[2] == 0.0


def test_step_summary_by_hand():
    groups = [_group("a#0", 5, (0.0, 1.0), hinted=True), _group("b#0", 6, (0.5, 0.5))]
    for t in groups[0]:
        t.rewards = {"accuracy": t.reward, "format": 1.0}
    for t in groups[1]:
        t.rewards = {"accuracy": 0.0, "judge": None}
    replay = [ReplaySample(make_traj("r/0", "r", 1.0), rbar=0.5, tier="hard")]
    advantages = {"a#0/0": -1.0, "a#0/1": 1.0, "b#0/0": 0.0, "b#0/1": 0.0, "r/0": 0.5}
    stats = {"loss": 0.1, "kl": 0.01, "clip_fraction": 0.0, "zero_adv_token_fraction": 0.25, "seconds": 0.3,
             "advantages": advantages}
    s = step_summary(groups, replay, stats, policy_version=6)
    assert s["trained_groups"] == ["a#0", "b#0"] and s["completions"] == 4 and s["replayed"] == 1
    assert s["reward_mean"] == pytest.approx(0.5)  # (0 + 1 + 0.5 + 0.5) / 4
    assert s["reward_terms"] == {"accuracy": 0.25, "format": 1.0, "judge": 0.0}  # missing judge values are left out of its mean (all missing: 0.0)
    assert s["hint_rate"] == 0.5 and s["replay_fraction"] == 0.2  # 1 replayed of 5 trained
    assert s["zero_adv_group_fraction"] == 0.5  # group b: equal rewards
    assert s["group_accuracy"] == [0.5, 0.0]  # each group's mean accuracy term
    assert s["group_hinted"] == [True, False]
    assert s["accuracy_hinted"] == 0.5 and s["accuracy_unhinted"] == 0.0  # group a's (0 + 1) / 2; group b's 0
    assert step_summary(groups[1:], [], stats, policy_version=6)["accuracy_hinted"] is None  # no hinted group
    assert s["staleness_max"] == 1 and s["judge_missing"] == 2
    assert s["advantages_fresh"] == [-1.0, 1.0, 0.0, 0.0] and s["advantages_replay"] == [0.5]


def test_stale_token_share_counts_each_tokens_version():
    from learner.summary import stale_token_share

    trajs = [make_traj("a", "p", policy_version=5),  # 3 tokens of v5
             make_traj("b", "p", policy_version=5, completion_token_ids=[1, 2, 3, 4],
                       behaviour_logprobs=[-1.0] * 4, token_policy_versions=[5, 6, 6, 6]),  # an update in flight
             make_traj("c", "p", policy_version=6, completion_token_ids=[1, 2], behaviour_logprobs=[-1.0] * 2)]
    assert stale_token_share(trajs, policy_version=6) == pytest.approx(4 / 9)  # (3 + 1) of 3 + 4 + 2
    assert stale_token_share(trajs, policy_version=5) == 0.0


def test_resume_version_stays_monotonic(tmp_path):
    import torch

    run_dir = tmp_path
    assert resume_version(run_dir, 4) == 4  # nothing published yet: the checkpoint's version
    transport = SharedFileSender(run_dir / "published", timeout_s=60)
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


def test_history_row_from_summary_and_stats():
    from cluster.recorder import history_row

    state = RunState(step=3, policy_version=3, completions_generated=48, counters={"stale_dropped": 2,
                                                                                   "skipped_prompts": 1})
    groups = [_group("a#0", 3, (0.0, 1.0))]
    stats = {"loss": 0.1, "kl": 0.01, "clip_fraction": 0.0, "zero_adv_token_fraction": 0.0, "seconds": 0.3,
             "advantages": {"a#0/0": -1.0, "a#0/1": 1.0}}
    buffer_stats = {"tier_easy": 4, "tier_hard": 8, "hints_active": 2, "fresh_length": 5, "pushed_groups": 12}
    reward_stats = {"judge_requests": 4, "judge_latency_s_sum": 2.0, "judge_failures": 1, "scoring_s_sum": 0.5}
    workers = [{"generate_seconds": 1.5, "tokens": 300}, {}, {"generate_seconds": 0.5, "tokens": 100}]
    row = history_row(2, state, step_summary(groups, [], stats, 3), buffer_stats, reward_stats, workers,
                      {"weight_sync_seconds": 0.02})
    assert (row["step"], row["policy_version"], row["completions_generated"]) == (3, 3, 48)
    assert row["tier_sizes"] == {"easy": 4, "medium": 0, "hard": 8} and row["hints_active"] == 2
    assert row["judge_latency_seconds"] == 0.5 and row["judge_requests_total"] == 4  # 2.0 s over 4 requests
    assert row["rollout_generate_seconds"] == 2.0 and row["rollout_tokens"] == 400  # a restarting worker: {}
    assert row["buffer_events"]["pushed_groups"] == 12 and row["buffer_events"]["skipped_prompt"] == 1
    assert row["stale_dropped_total"] == 2 and row["weight_sync_seconds"] == 0.02
    assert row["advantages_fresh"] == [-1.0, 1.0] and row["trained_groups"] == ["a#0"]


def test_committer_acknowledges_only_after_the_checkpoint_is_on_disk(tmp_path):
    import json

    from cluster.committer import Committer

    events = []

    class Learner:  # stands in for the learner's part of the checkpoint (the committer's order is under test)
        fail = False

        def save_checkpoint(self, directory):
            if self.fail:
                raise OSError("disk full")
            events.append("saved")
            (tmp_path / "learner-saved").write_text(str(directory))

    state, learner = RunState(step=4), Learner()
    committer = Committer(tmp_path, state, learner, lambda ids: events.append(("ack", list(ids))))
    committer.owe(["1-0", "2-0"])
    folder = committer.checkpoint()
    assert events == ["saved", ("ack", ["1-0", "2-0"])] and state.pending_ack == []
    assert json.loads((folder / "state.json").read_text())["pending_ack"] == ["1-0", "2-0"]  # saved with it
    committer.owe(["3-0"])
    learner.fail = True
    with pytest.raises(OSError):
        committer.checkpoint()
    assert events[-1] == ("ack", ["1-0", "2-0"]) and state.pending_ack == ["3-0"]  # no checkpoint: no ack
