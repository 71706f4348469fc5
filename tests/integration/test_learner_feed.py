"""The learner's reader of the fresh stream (learner/feed.py) against a real redis-server: a batch is taken
only when whole, stale groups are dropped and owed an acknowledgement, what was read and not trained stays
held, a new reader (a restarted learner) takes back what the old one had read, and a reader never gets back its
own entries, however long they wait for their acknowledgement."""

from __future__ import annotations

from buffer_service.config import BufferConfig
from learner.feed import FreshFeed, commit
from tests.conftest import make_traj


def _push(svc, key: str, version: int) -> str:
    group = [make_traj(f"{key}/{i}", key.split("#")[0], reward=float(i), group_id=key, policy_version=version)
             for i in range(2)]
    return svc.push_group(group)["entry_id"]


def test_feed_batches_drops_stale_and_holds_the_rest(make_service, redis_server):
    svc = make_service()
    cfg = BufferConfig(redis=redis_server.config(), min_size=0).model_dump()
    e_old = _push(svc, "old#0", version=1)
    e_a, e_b = _push(svc, "a#0", version=4), _push(svc, "b#0", version=5)
    feed = FreshFeed(cfg)
    feed.read(per_step=2, version=5, max_staleness=1, block_ms=None, reclaim=True)
    # "old" is 4 versions old: dropped and owed an acknowledgement; one fresh group read so far
    assert [s[:2] for s in feed.take_stale()] == [(e_old, "old#0")]
    assert feed.take(per_step=2) is None and [e for e, _ in feed.held] == [e_a]  # the read got "old" and "a"
    feed.read(per_step=2, version=5, max_staleness=1, block_ms=None, reclaim=False)
    batch = feed.take(per_step=2)
    assert [e for e, _ in batch] == [e_a, e_b] and feed.held == []
    stats = {"advantages": {f"{k}/{i}": 0.5 for k in ("a#0", "b#0") for i in range(2)},
             "mean_logratio_old_ref": {}, "ref_logprobs": {}, "kl_per_trajectory": {}}
    commit(feed.service, batch, stats, replay_on=True)
    assert svc.stats()["inserted"] == 4  # the trained samples are in the tiers, their entries not yet acked

    e_c = _push(svc, "c#0", version=5)
    feed.read(per_step=2, version=5, max_staleness=1, block_ms=None, reclaim=False)
    assert feed.take(per_step=2) is None and [e for e, _ in feed.held] == [e_c]  # fewer than a batch: held
    # the learner dies: a new reader's first read takes back what was read and never acknowledged
    again = FreshFeed(cfg)
    again.read(per_step=8, version=5, max_staleness=1, block_ms=None, reclaim=True)
    assert {e for e, _ in again.held} == {e_a, e_b, e_c}


def test_a_reader_never_gets_its_own_pending_entries_back(make_service, redis_server):
    """The learner is the stream's one consumer: an entry pending during a run is its own, held or trained and
    waiting for its checkpoint. With buffer.reclaim_idle_ms 0 every pending entry is "idle" at once, as after the
    driver sat still longer than the 60 s default (a node-loss run paused it 68 s): a trained entry handed back
    came back stale and was dropped (and counted, so the driver handed out a task too many), a held one came
    twice."""
    svc = make_service()
    cfg = BufferConfig(redis=redis_server.config(), min_size=0, reclaim_idle_ms=0).model_dump()
    e_a, e_b, e_c = _push(svc, "a#0", version=5), _push(svc, "b#0", version=5), _push(svc, "c#0", version=7)
    feed = FreshFeed(cfg)
    feed.read(per_step=2, version=5, max_staleness=1, block_ms=None, reclaim=True)
    batch = feed.take(per_step=2)
    assert [e for e, _ in batch] == [e_a, e_b]
    stats = {"advantages": {f"{k}/{i}": 0.5 for k in ("a#0", "b#0") for i in range(2)},
             "mean_logratio_old_ref": {}, "ref_logprobs": {}, "kl_per_trajectory": {}}
    commit(feed.service, batch, stats, replay_on=True)  # trained; acknowledged only with the next checkpoint
    for _ in range(2):  # two steps later: a and b would be 2 versions old, c is held
        feed.read(per_step=2, version=7, max_staleness=1, block_ms=None, reclaim=False)
        assert feed.take_stale() == [] and [e for e, _ in feed.held] == [e_c]
    assert svc.stats()["reclaimed"] == 0
    # the next run (the learner restarted from a checkpoint before a and b): all three back at once, though
    # a batch is one group
    again = FreshFeed(cfg)
    again.read(per_step=1, version=6, max_staleness=1, block_ms=None, reclaim=True)
    assert {e for e, _ in again.held} == {e_a, e_b, e_c} and svc.stats()["reclaimed"] == 3
