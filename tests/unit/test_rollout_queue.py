"""PromptQueue bookkeeping without Ray: leases, give-back on restart, expiry, exactly-once completion."""

import time

import pytest

from actors.prompt_queue import PromptQueue, PromptTask
from data.sample import PromptSample


def tasks(n):
    return [
        PromptTask(f"p{i}@0", PromptSample(id=f"p{i}", question="q", problem_type="numerical", answer="1"))
        for i in range(n)
    ]


def test_lease_complete_and_duplicates():
    q = PromptQueue()
    q.put(tasks(3))
    got = q.lease("w0", 2)
    assert [t.key for t in got] == ["p0@0", "p1@0"]
    assert q.complete("w0", "p0@0", "r0") is True
    assert q.complete("w1", "p0@0", "again") is False  # a late duplicate is dropped and counted
    assert q.stats()["duplicates"] == 1 and q.take_results() == ["r0"]
    with pytest.raises(ValueError):
        q.put(tasks(1))  # p0@0 is done: a key is never scheduled twice


def test_restarted_worker_gives_back_its_leases_first_in_line():
    q = PromptQueue()
    q.put(tasks(3))
    q.lease("w0", 2)
    assert q.release_worker("w0") == 2
    assert [t.key for t in q.lease("w1", 3)] == ["p1@0", "p0@0", "p2@0"]
    assert q.stats()["requeued"] == 2 and not q.finished()


def test_expired_lease_is_requeued_and_completes_once():
    q = PromptQueue(lease_timeout_s=0.01)
    q.put(tasks(1))
    q.lease("w0")
    time.sleep(0.02)
    assert [t.key for t in q.lease("w1")] == ["p0@0"]
    assert q.complete("w1", "p0@0", "r1") and not q.complete("w0", "p0@0", "r0")
    assert q.take_results() == ["r1"] and q.finished()
