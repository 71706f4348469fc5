"""ReplayService against a real redis-server: tiers, eviction, sampling, idempotence, redelivery, crash recovery,
dead letters, authentication. Expected values are computed by hand in the comments."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import redis
from scipy.stats import chisquare

from buffer_service.config import BufferConfig, HintConfig, RedisConfig
from buffer_service.inspect import inspect_text, main
from buffer_service.records import Trajectory
from buffer_service.redis_server import RedisAuthError, connect, start_redis
from buffer_service.schema import SCHEMA_VERSION, VERSION_KEY, encode_group
from buffer_service.service import ReplayService
from buffer_service.tiers import TIERS, Tiers
from tests.conftest import make_traj

pytestmark = pytest.mark.integration


def train(svc: ReplayService, consumer: str = "learner", advantage: float = 0.5, **read_kw) -> dict:
    """Read every fresh group, 'train' (set the advantage), commit; returns the commit result."""
    got = svc.read_fresh(consumer, max_groups=1000, **read_kw)
    trained = []
    for _, group in got:
        for t in group:
            t.advantage = advantage
            trained.append(t)
    return svc.commit([e for e, _ in got], trained)


def tier_of(svc: ReplayService) -> dict[str, str]:
    return {e["trajectory_id"]: e["tier"] for e in svc.entries()}


def test_quantile_rule_on_a_crafted_sequence(make_service):
    svc = make_service(capacity=100)
    # One single-completion group per prompt, pushed and trained one after the other, so each entry is
    # compared with the R(q) of the prompts seen so far (its own included).
    # q40 = sorted[round(0.4 (n-1))], q75 = sorted[round(0.75 (n-1))], Python's round (half to even):
    #  A .5  n=1 [.5]                        q40 .5  q75 .5   -> hard (at or below q40)
    #  B 1   n=2 [.5 1]                      q40 [0] .5  q75 [round 0.75=1] 1 -> medium
    #  C 0   n=3 [0 .5 1]                    q40 [round 0.8=1] .5  -> hard
    #  D .75 n=4 [0 .5 .75 1]                q40 [1] .5  q75 [round 2.25=2] .75 -> medium
    #  E .25 n=5 [0 .25 .5 .75 1]            q40 [2] .5  -> hard
    #  F .8  n=6 [0 .25 .5 .75 .8 1]         q40 [2] .5  q75 [round 3.75=4] .8 -> medium
    #  G .9  n=7 [0 .25 .5 .75 .8 .9 1]      q75 [round 4.5=4] .8 -> easy (half up would give [5] .9 -> medium)
    #  H .6  n=8 [0 .25 .5 .6 .75 .8 .9 1]   q40 [round 2.8=3] .6 -> hard
    #  I 1   n=9 [0 .25 .5 .6 .75 .8 .9 1 1] q75 [round 6.0=6] .9 -> easy
    sequence = [
        ("A", 0.5),
        ("B", 1.0),
        ("C", 0.0),
        ("D", 0.75),
        ("E", 0.25),
        ("F", 0.8),
        ("G", 0.9),
        ("H", 0.6),
        ("I", 1.0),
    ]
    for pid, reward in sequence:
        assert svc.push_group([make_traj(f"t{pid}", pid, reward)])["accepted"] == 1
        assert train(svc)["inserted"] == 1
    expected = {
        "tA": "hard",
        "tB": "medium",
        "tC": "hard",
        "tD": "medium",
        "tE": "hard",
        "tF": "medium",
        "tG": "easy",
        "tH": "hard",
        "tI": "easy",
    }
    assert tier_of(svc) == expected
    # The prompts' tiers now, over all nine: q40 = .6, q75 = .9
    states = svc.prompt_states(["A", "G", "H", "I"])
    assert {p: s["tier"] for p, s in states.items()} == {"A": "hard", "G": "medium", "H": "hard", "I": "easy"}
    assert svc.tier_sizes() == {"easy": 2, "medium": 3, "hard": 4}


def test_tier_ratios_capacities_and_sample_counts(make_service):
    svc = make_service(capacity=20)
    assert svc.tier_capacities() == {"easy": 5, "medium": 7, "hard": 8}
    # Prompts with R(q) 0, .5, 1, each with 4 completions of the same reward, pushed first, trained after:
    # q40 = sorted[round(.8)=1] = .5, q75 = sorted[round(1.5)=2] = 1 -> P0 hard, P5 hard, P1 medium.
    for pid, reward in [("P0", 0.0), ("P5", 0.5), ("P1", 1.0)]:
        svc.push_group([make_traj(f"{pid}-{i}", pid, reward) for i in range(4)])
    train(svc)
    assert svc.tier_sizes() == {"easy": 0, "medium": 4, "hard": 8}
    # n = 8 -> easy 2 / medium 3 / hard 3; easy is empty, so its 2 are back-filled from all entries.
    # fifo makes it exact: medium's 3 oldest, hard's 3 oldest, then the 2 oldest of all (P0 was trained first)
    got = svc.sample(8, strategy="fifo")
    assert [s.trajectory.trajectory_id for s in got] == [
        "P1-0",
        "P1-1",
        "P1-2",
        "P0-0",
        "P0-1",
        "P0-2",
        "P0-0",
        "P0-1",
    ]
    tiers = Counter(s.tier for s in svc.sample(8, strategy="uniform", rng_seed=0))
    assert tiers["medium"] >= 3 and tiers["hard"] >= 3 and sum(tiers.values()) == 8 and tiers["easy"] == 0
    # A new prompt with R(q) 1 alone above q75? R(q) values 0 .5 1 1: q75 = sorted[round(2.25)=2] = 1 -> medium;
    # one with 2.0: [0 .5 1 2] -> q75 = 1 < 2 -> easy. One easy entry: a count of 2 takes it once, back-fills 1.
    svc.push_group([make_traj("E-0", "E", 2.0)])
    train(svc)
    assert tier_of(svc)["E-0"] == "easy"
    for seed in range(5):
        got = svc.sample(8, strategy="fifo", rng_seed=seed)
        # fifo: medium's 3 oldest, hard's 3 oldest, easy's one entry, then the oldest of all as back-fill
        assert [s.trajectory.trajectory_id for s in got] == [
            "E-0",
            "P1-0",
            "P1-1",
            "P1-2",
            "P0-0",
            "P0-1",
            "P0-2",
            "P0-0",
        ]
        assert [s.tier for s in got][:7] == ["easy", "medium", "medium", "medium", "hard", "hard", "hard"]


def test_fifo_eviction_at_capacity(make_service):
    svc = make_service(capacity=10)  # easy 2, medium 4, hard 4
    # One prompt only: its R(q) is its own quantile -> every entry is hard.
    for i in range(6):
        svc.push_group([make_traj(f"t{i}", "P", 0.0, group_id=f"g{i}")])
        train(svc)
    assert svc.tier_sizes() == {"easy": 0, "medium": 0, "hard": 4}
    assert [e["trajectory_id"] for e in svc.entries()] == [
        "t2",
        "t3",
        "t4",
        "t5",
    ]  # t0, t1 evicted, oldest first
    assert svc.stats()["evicted"] == 2
    assert svc.r.hlen(svc.k["blob"]) == 4  # the evicted records' bytes are gone too
    sampled = {s.trajectory.trajectory_id for s in svc.sample(200, strategy="uniform", rng_seed=1)}
    assert sampled == {"t2", "t3", "t4", "t5"}


def test_priority_sampling_follows_exp_weights(make_service):
    svc = make_service(capacity=100)
    # score = advantage - 0.1 * mean_logratio: 0, .5, 1 - .05 = .95, 2 ; T = 1
    specs = [(0.0, 0.0), (0.5, 0.0), (1.0, 0.5), (2.0, 0.0)]
    svc.push_group([make_traj(f"t{i}", "P", 1.0) for i in range(4)])
    ((eid, group),) = svc.read_fresh("learner", 1)
    for t, (adv, lr) in zip(group, specs, strict=True):
        t.advantage, t.mean_logratio_old_ref = adv, lr
    svc.commit([eid], group)
    weights = np.exp(np.array([0.0, 0.5, 0.95, 2.0]))
    probs = weights / weights.sum()  # about .0874 .1441 .2260 .6425
    n = 20_000
    counts = Counter(s.trajectory.trajectory_id for s in svc.sample(n, rng_seed=1234))
    observed = np.array([counts[f"t{i}"] for i in range(4)])
    assert observed.sum() == n
    assert chisquare(observed, probs * n).pvalue > 0.001
    # The test has power: the same counts reject uniform sampling outright.
    assert chisquare(observed, np.full(4, n / 4)).pvalue < 1e-12
    # Temperature 2 flattens the weights: exp(s / 2).
    svc2 = ReplayService(svc.config.model_copy(update={"priority_temperature": 2.0}), svc.r)
    counts2 = Counter(s.trajectory.trajectory_id for s in svc2.sample(n, rng_seed=99))
    w2 = np.exp(np.array([0.0, 0.5, 0.95, 2.0]) / 2)
    assert chisquare([counts2[f"t{i}"] for i in range(4)], w2 / w2.sum() * n).pvalue > 0.001
    # Same seed, same draws; sampling removes nothing.
    ids = [s.trajectory.trajectory_id for s in svc.sample(16, rng_seed=5)]
    assert ids == [s.trajectory.trajectory_id for s in svc.sample(16, rng_seed=5)]
    assert svc.tier_sizes()["hard"] == 4


def test_samples_carry_current_rbar_and_honour_age_bound(make_service):
    svc = make_service(capacity=100, max_age_versions=2, min_size=3)
    svc.push_group([make_traj("old", "P", 1.0, policy_version=1)])
    train(svc)
    assert svc.sample(4) == []  # below min_size 3
    svc.push_group([make_traj(f"new{i}", "P", 0.0, policy_version=5, group_id="g2") for i in range(2)])
    train(svc)
    got = svc.sample(50, rng_seed=0, current_version=6)
    assert {s.trajectory.trajectory_id for s in got} == {"new0", "new1"}  # version 1 is 5 behind > 2
    assert all(s.rbar == pytest.approx(1 / 3) for s in got)  # R(q) of P = mean(1, 0, 0)
    assert got[0].trajectory.advantage == 0.5 and got[0].trajectory.behaviour_logprobs == [-0.5, -0.25, -1.0]
    assert "old" in {s.trajectory.trajectory_id for s in svc.sample(50, rng_seed=0)}  # no version: no bound
    svc.push_group([make_traj("more", "P", 1.0, group_id="g3")])  # R(q) -> mean(1, 0, 0, 1) = .5
    assert svc.sample(1, rng_seed=0)[0].rbar == 0.5


def test_idempotent_push_and_commit(make_service):
    svc = make_service()
    group = [make_traj(f"t{i}", "P", float(i % 2)) for i in range(4)]
    first = svc.push_group(group)
    assert first["accepted"] == 4 and first["entry_id"]
    again = svc.push_group(group)  # a retried push
    assert again == {"entry_id": None, "accepted": 0, "duplicates": 4, "dead_lettered": False}
    assert svc.push_group(encode_group(group))["accepted"] == 0  # the same as bytes
    # A partly new group: only the new trajectory enters, statistics move for it alone.
    partial = svc.push_group(group[:2] + [make_traj("t9", "P", 1.0)])
    assert partial["accepted"] == 1 and partial["duplicates"] == 2
    state = svc.prompt_states(["P"])["P"]
    assert state["count"] == 5 and state["rbar"] == pytest.approx(3 / 5)  # rewards 0 1 0 1 1
    stats = svc.stats()
    assert stats["fresh_length"] == 2 and stats["pushed_trajectories"] == 5 and stats["duplicates"] == 10
    got = svc.read_fresh("learner", 10)
    assert sorted(len(g) for _, g in got) == [1, 4]
    trained = [t for _, g in got for t in g]
    entry_ids = [e for e, _ in got]
    assert svc.commit(entry_ids, trained) == {"acked": 2, "inserted": 5, "evicted": 0, "ignored": 0}
    assert svc.commit(entry_ids, trained) == {
        "acked": 0,
        "inserted": 0,
        "evicted": 0,
        "ignored": 5,
    }  # retried
    assert sum(svc.tier_sizes().values()) == 5 and svc.stats()["fresh_length"] == 0


def test_concurrent_pushers_never_duplicate(make_service):
    services = [make_service() for _ in range(4)]
    groups = [[make_traj(f"g{j}-t{i}", f"P{j}", 1.0, group_id=f"g{j}") for i in range(4)] for j in range(30)]

    def pusher(svc):
        for g in groups:
            svc.push_group(g)

    threads = [threading.Thread(target=pusher, args=(s,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = services[0].stats()
    assert stats["fresh_length"] == 30 and stats["pushed_trajectories"] == 120
    assert stats["duplicates"] == 3 * 120
    assert all(s["count"] == 4 for s in services[0].prompt_states([f"P{j}" for j in range(30)]).values())


def test_dead_consumer_entries_are_reclaimed_and_trained_once(make_service):
    svc = make_service()
    for j in range(5):
        svc.push_group([make_traj(f"g{j}-t{i}", f"P{j}", 1.0, group_id=f"g{j}") for i in range(2)])
    crashed = svc.read_fresh("learner-a", max_groups=3)  # learner-a dies before committing
    assert len(crashed) == 3
    # learner-b: the entries are not idle long enough to be reclaimed yet -> only the 2 unread ones
    first = svc.read_fresh("learner-b", max_groups=10, reclaim_idle_ms=60_000)
    assert len(first) == 2
    assert svc.stats()["fresh_pending"] == 5
    time.sleep(0.15)
    second = svc.read_fresh("learner-b", max_groups=10, reclaim_idle_ms=100)
    assert sorted(e for e, _ in second) == sorted(
        e for e, _ in crashed + first
    )  # learner-a's 3, and b's own 2
    assert svc.stats()["reclaimed"] == 5
    trained_groups = Counter()
    for entry_id, group in second:
        result = svc.commit([entry_id], group)
        trained_groups[group[0].group_id] += result["acked"]
    # learner-a comes back and commits late: nothing is inserted twice
    assert svc.commit([e for e, _ in crashed], [t for _, g in crashed for t in g])["inserted"] == 0
    assert trained_groups == Counter({f"g{j}": 1 for j in range(5)})
    assert sum(svc.tier_sizes().values()) == 10
    assert svc.stats()["fresh_pending"] == 0 and svc.read_fresh("learner-b", 10, reclaim_idle_ms=0) == []


def test_take_back_claims_every_pending_entry_and_new_only_claims_none(make_service):
    svc = make_service(reclaim_idle_ms=0)  # any pending entry counts as idle
    for j in range(130):  # more than one XAUTOCLAIM page (100)
        svc.push_group([make_traj(f"g{j}-t0", f"P{j}", 1.0, group_id=f"g{j}")])
    read = svc.read_fresh("learner", max_groups=125)
    assert len(read) == 125
    # a consumer reading new entries only gets the 5 unread ones, never the 125 pending ones, idle or not
    assert [g[0].group_id for _, g in svc.read_fresh("learner", 200, new_only=True)] == [f"g{j}" for j in
                                                                                           range(125, 130)]
    assert svc.read_fresh("learner", 200, new_only=True) == [] and svc.stats()["reclaimed"] == 0
    # a restarted learner takes back all 130, whoever read them and however recently
    back = svc.take_back_fresh("learner-2")
    assert sorted(g[0].group_id for _, g in back) == sorted(f"g{j}" for j in range(130))
    assert svc.stats()["reclaimed"] == 130 and svc.take_back_fresh("learner-2") != []  # still pending: not acked
    svc.ack([e for e, _ in back])
    assert svc.take_back_fresh("learner-2") == [] and svc.stats()["fresh_pending"] == 0


def test_sigkill_and_aof_restart_keep_everything(redis_server, tmp_path):
    cfg = BufferConfig(redis=redis_server.config(), min_size=0, capacity=100, hint={"trigger": "zero_total_streak"})
    svc = ReplayService(cfg)
    for j in range(4):
        svc.push_group(
            [make_traj(f"g{j}-t{i}", f"P{j}", float(i == 0 and j < 2), group_id=f"g{j}") for i in range(3)]
        )
    train(svc, advantage=0.25)  # all four trained: in the tiers
    svc.push_group([make_traj(f"g4-t{i}", "P4", 0.0, group_id="g4") for i in range(3)])  # read, not committed
    ((pending_id, _),) = svc.read_fresh("learner", 1)
    svc.push_group([make_traj(f"g5-t{i}", "P5", 0.0, group_id="g5") for i in range(3)])  # not even read
    before_entries = svc.entries()
    prompts = [f"P{j}" for j in range(6)]
    before_states = svc.prompt_states(prompts)
    before_stats = svc.stats()
    assert before_states["P4"]["hint_active"] and before_states["P4"]["streak"] == 3

    redis_server.kill()  # SIGKILL: only what appendfsync always wrote survives
    assert not redis_server.alive()
    with pytest.raises(redis.ConnectionError):
        svc.r.ping()
    restarted = start_redis(redis_server.folder, password=redis_server.password, appendfsync="always")
    try:
        svc2 = ReplayService(cfg.model_copy(update={"redis": restarted.config()}))
        assert svc2.entries() == before_entries
        assert svc2.prompt_states(prompts) == before_states
        assert svc2.stats() == before_stats
        # the group read before the crash is redelivered, the unread one delivered
        got = svc2.read_fresh("learner-2", 10, reclaim_idle_ms=0)
        assert [e for e, _ in got][0] == pending_id
        assert [g[0].group_id for _, g in got] == ["g4", "g5"]
        assert svc2.push_group([make_traj("g5-t0", "P5")])["duplicates"] == 1  # idempotence survived too
        assert svc2.sample(3, rng_seed=0)[0].trajectory.advantage == 0.25
    finally:
        restarted.stop()


def test_bad_records_go_to_the_dead_letter_stream(make_service):
    svc = make_service()
    good = [make_traj("t1", "P", 1.0)]
    table = pa.ipc.open_stream(encode_group(good)).read_all()

    def ipc(t):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        return sink.getvalue().to_pybytes()

    wrong_version = ipc(table.replace_schema_metadata({VERSION_KEY: b"99"}))
    missing = ipc(table.drop_columns(["reward"]))
    bad_lengths = [make_traj("t2", "P", 1.0, behaviour_logprobs=[-1.0])]
    too_big = [make_traj("t3", "P", 1.0, prompt_token_ids=[2**40])]
    for record in (b"not arrow at all", wrong_version, missing, bad_lengths, too_big):
        assert svc.push_group(record)["dead_lettered"] is True
    # a writer that bypassed push_group: caught when the learner reads it, acknowledged, never redelivered
    svc.r.xadd(svc.k["fresh"], {"blob": wrong_version, "group_id": "x", "tids": "zz"})
    assert svc.read_fresh("learner", 10) == []
    assert svc.read_fresh("learner", 10, reclaim_idle_ms=0) == []
    letters = svc.dead_letters()
    reasons = [d["reason"] for d in letters]
    assert "not an Arrow IPC stream" in reasons[0]
    assert f"schema version 99, expected {SCHEMA_VERSION}" in reasons[1]
    assert "missing field 'reward'" in reasons[2]
    assert "1 behaviour_logprobs for 3 completion tokens" in reasons[3]
    assert "cannot encode group" in reasons[4] and letters[4]["payload"] == b""
    assert "schema version 99" in reasons[5] and letters[5]["source"] == "fresh"
    assert letters[1]["payload"] == wrong_version  # kept for inspection, as bytes
    stats = svc.stats()
    assert stats["dead_lettered"] == 6 and stats["pushed_trajectories"] == 0 and stats["fresh_length"] == 0
    assert svc.prompt_states(["P"])["P"]["rbar"] is None  # no statistic moved


def test_idempotence_window_bounds_the_remembered_ids(make_service):
    svc = make_service(dedup_window_groups=2)
    for g in ("g1", "g2", "g3"):
        assert svc.push_group([make_traj(f"{g}-t{i}", "P", 1.0, group_id=g) for i in range(3)])["accepted"] == 3
    # the last two pushes are remembered: re-pushing them adds nothing
    assert svc.push_group([make_traj(f"g3-t{i}", "P", 1.0, group_id="g3") for i in range(3)])["duplicates"] == 3
    assert svc.push_group([make_traj("g2-t1", "P", 1.0, group_id="g2")])["duplicates"] == 1
    # the oldest has left the window: only 2 groups x 3 ids are kept, whatever the number of pushes
    assert svc.r.scard(svc.k["seen"]) == 6 and svc.r.llen(svc.k["seen_order"]) == 2
    assert not svc.r.sismember(svc.k["seen"], "g1-t0") and svc.r.sismember(svc.k["seen"], "g2-t0")
    assert svc.push_group([make_traj("g1-t0", "P", 1.0, group_id="g1")])["accepted"] == 1
    assert svc.stats()["pushed_groups"] == 4


def test_rejected_inputs_are_dead_lettered_once_each(make_service):
    svc = make_service()
    assert svc.reject("P1#0", "media", "prompt P1: clip.mp4: media file is empty") is True
    assert svc.reject("manifest:7", "manifest", "m.jsonl line 7: missing field 'answer'") is True
    # the same task met again (a resumed job) adds nothing
    assert svc.reject("P1#0", "media", "prompt P1: clip.mp4: media file is empty") is False
    letters = svc.dead_letters()
    assert [(d["source"], d["entry_id"]) for d in letters] == [("media", "P1#0"), ("manifest", "manifest:7")]
    assert letters[0]["reason"] == "prompt P1: clip.mp4: media file is empty" and letters[0]["payload"] == b""
    stats = svc.stats()
    assert (stats["rejected"], stats["dead_lettered"], stats["dead_letter_length"]) == (2, 2, 2)
    assert stats["pushed_groups"] == 0 and stats["prompts"] == 0


def test_hint_trigger_streak_window_and_lapse(make_service):
    svc = make_service(rbar_window=4, hint={"trigger": "zero_total_streak"})
    svc.push_group([make_traj("a0", "Q", 1.0, group_id="ga")])  # another prompt, R(q) 1
    svc.push_group([make_traj(f"b{i}", "P", 0.0, group_id="gb") for i in range(2)])
    st = svc.prompt_states(["P"])["P"]
    assert st == {"rbar": 0.0, "streak": 2, "hint_active": False, "tier": "hard", "count": 2, "task_mean": 0.0,
                  "kl": None}
    svc.push_group([make_traj("c0", "P", 0.0, group_id="gc")])  # third zero in a row
    assert svc.prompt_states(["P"])["P"]["hint_active"] is True
    assert svc.stats()["hints_active"] == 1
    # rewards of P now 0 0 0; add 1, 1, 1 -> window of 4 keeps 0 1 1 1 -> R(q) .75; streak reset
    svc.push_group([make_traj(f"d{i}", "P", 1.0, group_id="gd") for i in range(3)])
    # R(q): P .75, Q 1 -> n=2, q40 = sorted[0] = .75 -> P still hard, hint stays
    st = svc.prompt_states(["P"])["P"]
    assert st["rbar"] == 0.75 and st["streak"] == 0 and st["tier"] == "hard" and st["hint_active"] is True
    # a third prompt with R(q) 0: [0 .75 1], q40 = sorted[round(.8)=1] = .75 -> P still hard;
    # a fourth with 0: [0 0 .75 1], q40 = sorted[round(1.2)=1] = 0 -> P leaves hard -> the hint lapses
    svc.push_group([make_traj("e0", "R", 0.0, group_id="ge")])
    assert svc.prompt_states(["P"])["P"]["hint_active"] is True
    svc.push_group([make_traj("f0", "S", 0.0, group_id="gf")])
    st = svc.prompt_states(["P"])["P"]
    assert st["tier"] == "medium" and st["hint_active"] is False
    assert svc.stats()["hints_active"] == 0
    # the release's behaviour: hints stay on forever
    redis_cfg = svc.config.redis.model_copy(update={"key_prefix": "keep"})
    keep = make_service(rbar_window=4, hint={"lapse_when_not_hard": False, "trigger": "zero_total_streak"},
                        redis=redis_cfg)
    keep.push_group([make_traj(f"k{i}", "K", 0.0, group_id="gk") for i in range(3)])  # hint on
    keep.push_group([make_traj(f"m{i}", "K", 1.0, group_id="gm") for i in range(4)])  # K: R(q) 1
    for pid in ("M", "N"):
        keep.push_group([make_traj(f"{pid}0", pid, 0.0, group_id=f"g{pid}")])
    # [0 0 1] -> q40 = sorted[round(.8)=1] = 0: K is not hard, yet its hint stays on
    st = keep.prompt_states(["K"])["K"]
    assert st["tier"] != "hard" and st["hint_active"] is True
    assert svc.top_streaks(2)[0] in {("R", 1), ("S", 1)}


def test_wrong_password_and_passwordless_redis_are_refused(redis_server):
    with pytest.raises(RedisAuthError, match="refused the password"):
        connect(RedisConfig(url=redis_server.url, password="not-the-password"))
    with pytest.raises(RedisAuthError, match="refused the password"):
        ReplayService(BufferConfig(redis=RedisConfig(url=redis_server.url, password="nope")))
    with pytest.raises(RedisAuthError, match="requires a password and none was given"):
        connect(RedisConfig(url=redis_server.url))
    assert connect(redis_server.config()).ping()
    # the same server with its password removed: refused unless declared a throwaway local one
    redis_server.client().config_set("requirepass", "")
    with pytest.raises(RedisAuthError, match="accepts clients without a password"):
        ReplayService(BufferConfig(redis=RedisConfig(url=redis_server.url)))
    svc = ReplayService(BufferConfig(redis=RedisConfig(url=redis_server.url, throwaway_local=True)))
    assert svc.stats()["pushed_groups"] == 0


def test_inspect_prints_tiers_distributions_and_streaks(make_service, redis_server, capsys):
    svc = make_service(hint={"trigger": "zero_total_streak"})
    svc.push_group([make_traj(f"a{i}", "hard-prompt", 0.0, group_id="ga") for i in range(4)])
    svc.push_group([make_traj(f"b{i}", "easy-prompt", 1.0, group_id="gb") for i in range(2)])
    train(svc, advantage=-0.5)
    svc.reject("P9#0", "media", "prompt P9: clip.mp4: media file is empty")
    svc.reject("P9#1", "media", "prompt P9: clip.mp4: cannot decode video")
    text = inspect_text(svc, top=5)
    assert "dead letters: 2\n  media    P9#1" in text and "P9#1                         prompt P9: clip.mp4: cannot" in text
    assert "hard         4 / 4000" in text and "medium       2 / 3500" in text
    assert "advantage                    mean -0.500" in text
    assert "hard-prompt" in text and "streak   4" in text and "hint on" in text
    code = main(["--url", redis_server.url, "--password", redis_server.password])  # the generated one never starts with "-"
    assert main(["--url", redis_server.url, "--password=-x"]) == 2  # a password that does is passed with "="
    assert code == 0 and "hard-prompt" in capsys.readouterr().out
    assert main(["--url", redis_server.url, "--password", "wrong"]) == 2
    assert "refused the password" in capsys.readouterr().err


def test_hint_extra_condition_and_disabled(make_service, redis_server):
    # max_rbar 0.2: three zeros after rewards 1 1 1 1 give R(q) 4/7 > .2 -> no hint despite the streak
    svc = make_service(hint={"max_rbar": 0.2, "trigger": "zero_total_streak"})
    svc.push_group([make_traj(f"a{i}", "P", 1.0, group_id="ga") for i in range(4)])
    svc.push_group([make_traj(f"b{i}", "P", 0.0, group_id="gb") for i in range(3)])
    st = svc.prompt_states(["P"])["P"]
    assert st["streak"] == 3 and st["rbar"] == pytest.approx(4 / 7) and st["hint_active"] is False
    svc.push_group([make_traj(f"c{i}", "Q", 0.0, group_id="gc") for i in range(3)])  # R(q) 0 < .2 -> hint
    assert svc.prompt_states(["Q"])["Q"]["hint_active"] is True
    off = make_service(hint={"enabled": False}, redis=redis_server.config(key_prefix="off"))
    off.push_group([make_traj(f"d{i}", "Q", 0.0, group_id="gd") for i in range(5)])
    assert off.prompt_states(["Q"])["Q"] == {
        "rbar": 0.0,
        "streak": 5,
        "hint_active": False,
        "tier": "hard",
        "count": 5,
        "task_mean": 0.0,
        "kl": None,
    }


def scored(tid: str, pid: str, accuracy: float, group_id: str, fmt: float = 1.0) -> Trajectory:
    """A completion scored as in demo.yaml (0.1 format + 0.9 accuracy)."""
    return make_traj(tid, pid, 0.1 * fmt + 0.9 * accuracy, group_id=group_id,
                     rewards={"format": fmt, "accuracy": accuracy})


def push_prompt(svc: ReplayService, pid: str, accuracies: list[float], tag: str = "") -> None:
    svc.push_group([scored(f"{pid}{tag}-{i}", pid, a, f"{pid}{tag}") for i, a in enumerate(accuracies)])


def test_paper_hint_trigger_fires_for_answers_in_format_but_wrong(make_service, redis_server):
    svc = make_service()  # default trigger: paper, task_reward_max .25, kl_max .05, min_completions 4
    assert svc.config.hint.trigger == "paper"
    push_prompt(svc, "P", [0, 0, 0, 0])  # in format, wrong: total .1 each, so never a zero total
    push_prompt(svc, "M", [1, 0, 1, 0])  # R(q) .55, task mean .5
    push_prompt(svc, "E", [1, 1, 1, 1])  # R(q) 1.0
    push_prompt(svc, "F", [1, 1, 1, 0])  # R(q) .775
    # R(q) sorted [.1 .55 .775 1]: q40 = sorted[round(1.2)=1] = .55 -> P and M hard
    st = svc.prompt_states(["P", "M", "E"])
    assert st["P"]["tier"] == "hard" and st["P"]["task_mean"] == 0.0 and st["P"]["rbar"] == pytest.approx(0.1)
    assert st["P"]["hint_active"] is True  # hard, task mean 0 <= .25, no KL yet (still the reference)
    assert st["M"]["tier"] == "hard" and st["M"]["hint_active"] is False  # task mean .5 > .25
    assert st["E"]["hint_active"] is False
    # the release's trigger on the same data: no zero total, no streak, no hint
    rel = make_service(hint={"trigger": "zero_total_streak"}, redis=redis_server.config(key_prefix="rel"))
    push_prompt(rel, "P", [0, 0, 0, 0])
    assert rel.prompt_states(["P"])["P"]["streak"] == 0 and rel.prompt_states(["P"])["P"]["hint_active"] is False
    # the task streak sees what the total streak cannot
    task = make_service(hint={"trigger": "zero_task_streak"}, redis=redis_server.config(key_prefix="task"))
    push_prompt(task, "P", [0, 0, 0, 0])
    assert task.prompt_states(["P"])["P"]["streak"] == 4 and task.prompt_states(["P"])["P"]["hint_active"] is True
    # P answered right from now on: R(q) (.1 * 4 + 1 * 4) / 8 = .55, sorted [.55 .55 .775 1], q40 = .55: still
    # hard, the hint stays; 12 more right ones: (.4 + 16) / 20 = .82 > q40 = sorted[1] = .775: P leaves hard
    push_prompt(svc, "P", [1, 1, 1, 1], "b")
    st = svc.prompt_states(["P"])["P"]
    assert st["rbar"] == pytest.approx(0.55) and st["tier"] == "hard" and st["hint_active"] is True
    for tag in "cde":
        push_prompt(svc, "P", [1, 1, 1, 1], tag)
    st = svc.prompt_states(["P"])["P"]
    assert st["rbar"] == pytest.approx(0.82) and st["tier"] == "medium" and st["hint_active"] is False


def test_paper_hint_trigger_needs_low_kl(make_service, redis_server):
    svc = make_service(capacity=100)
    for pid, acc in (("E", 1.0), ("F", 1.0), ("G", 1.0)):
        push_prompt(svc, pid, [acc] * 4)
    push_prompt(svc, "Q", [0, 0])  # 2 completions: below min_completions
    assert svc.prompt_states(["Q"])["Q"]["hint_active"] is False
    ((eid, group),) = [(e, g) for e, g in svc.read_fresh("learner", 10) if g[0].prompt_id == "Q"]
    for t in group:
        t.advantage = 0.0
    # the learner measured the policy far from the reference on Q (mean k3 .2 and .4 per token)
    out = svc.insert([eid], group, kl={group[0].trajectory_id: 0.2, group[1].trajectory_id: 0.4})
    assert out == {"inserted": 2, "evicted": 0, "ignored": 0}
    push_prompt(svc, "Q", [0, 0], "b")  # 4 completions, task mean 0, hard, but KL .3 > .05: still exploring
    st = svc.prompt_states(["Q"])["Q"]
    assert st["kl"] == pytest.approx(0.3) and st["count"] == 4 and st["tier"] == "hard"
    assert st["hint_active"] is False
    # the same statistics under kl_max .5: the rule fires
    loose = ReplayService(svc.config.model_copy(update={"hint": HintConfig(kl_max=0.5)}))
    assert loose.prompt_states(["Q"])["Q"]["hint_active"] is True


def test_streak_does_not_depend_on_the_order_of_a_group(make_service, redis_server):
    states = []
    for k, order in enumerate(([0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0])):
        svc = make_service(hint={"trigger": "zero_total_streak"}, redis=redis_server.config(key_prefix=f"o{k}"))
        svc.push_group([make_traj(f"t{i}", "P", float(r), group_id="g") for i, r in enumerate(order)])
        states.append(svc.prompt_states(["P"])["P"])
    assert states[0] == states[1] == states[2] and states[0]["streak"] == 0 and not states[0]["hint_active"]
    # a whole group of zeros counts its size; the next group with a success resets
    svc.push_group([make_traj(f"z{i}", "P", 0.0, group_id="gz") for i in range(3)])
    assert svc.prompt_states(["P"])["P"]["streak"] == 3 and svc.prompt_states(["P"])["P"]["hint_active"] is True


def test_insert_after_the_step_ack_with_the_checkpoint_exactly_once(make_service):
    svc = make_service(capacity=100)
    for j in range(2):
        svc.push_group([make_traj(f"g{j}-t{i}", f"P{j}", float(i % 2), group_id=f"g{j}") for i in range(4)])
    got = svc.read_fresh("learner", 10)
    ids, trained = [e for e, _ in got], [t for _, g in got for t in g]
    for t in trained:
        t.advantage = 0.5
    assert svc.insert(ids, trained) == {"inserted": 8, "evicted": 0, "ignored": 0}
    # replayable at once, while the entries wait for the checkpoint's acknowledgement
    assert len(svc.sample(4, rng_seed=0)) == 4
    assert svc.stats()["fresh_pending"] == 2
    # a crash before the checkpoint: the entries are redelivered, retrained, and inserted nothing again
    again = svc.read_fresh("learner-2", 10, reclaim_idle_ms=0)
    assert sorted(e for e, _ in again) == sorted(ids)
    assert svc.insert(ids, [t for _, g in again for t in g]) == {"inserted": 0, "evicted": 0, "ignored": 8}
    assert sum(svc.tier_sizes().values()) == 8
    assert svc.ack(ids) == 2 and svc.ack(ids) == 0
    assert svc.stats()["fresh_pending"] == 0 and svc.stats()["fresh_length"] == 0
    assert svc.insert(ids, trained)["inserted"] == 0  # acknowledged entries are gone: nothing to insert


def test_insert_with_replay_off_feeds_statistics_not_tiers(make_service):
    svc = make_service(capacity=100)
    svc.push_group([make_traj(f"t{i}", "P", 0.0, group_id="g") for i in range(2)])
    ((eid, group),) = svc.read_fresh("learner", 1)
    out = svc.insert([eid], group, kl={"t0": 0.01, "t1": 0.03}, into_tiers=False)
    assert out == {"inserted": 0, "evicted": 0, "ignored": 0}
    assert svc.tier_sizes() == {"easy": 0, "medium": 0, "hard": 0}
    assert svc.prompt_states(["P"])["P"]["kl"] == pytest.approx(0.02)


def test_sampler_snapshot_refreshed_from_changes_equals_a_full_read(make_service):
    """The sampler's snapshot, brought up to date from what each insert changed (entries in, the oldest
    evicted, a trajectory id inserted again past the dedup window, everything cleared by another client),
    equals one read whole at every step."""
    svc = make_service(capacity=12, dedup_window_groups=3)  # tier capacities 3 / 4 / 5
    tiers = svc._tiers
    outcomes = []
    refresh = tiers._refresh
    tiers._refresh = lambda *a: outcomes.append(refresh(*a)) or outcomes[-1]
    rng = np.random.default_rng(7)
    for step in range(40):
        if step == 30:
            make_service(capacity=12).clear()
        for g in range(int(rng.integers(1, 4))):
            pid = f"p{rng.integers(0, 6)}"
            tid = f"t{step % 5}-{g}"  # ids come back once out of the dedup window
            svc.push_group([make_traj(tid, pid, float(rng.random()), group_id=f"{step}-{g}")])
        train(svc, advantage=float(rng.normal()))
        snap = tiers._load_snapshot()
        full = Tiers(tiers.store)._load_snapshot()
        for t in TIERS:
            assert snap[t]["tid"] == full[t]["tid"] and snap[t]["raw"] == full[t]["raw"]
            for column in ("seq", "score", "version"):
                assert snap[t][column].dtype == full[t][column].dtype
                assert np.array_equal(snap[t][column], full[t][column])
        assert svc.entries() == Tiers(tiers.store).entries()
    assert sum(o is not None for o in outcomes) > 25  # most steps took the incremental path
    assert any(o is None for o in outcomes)  # an id inserted again into its tier, the clear: read whole
