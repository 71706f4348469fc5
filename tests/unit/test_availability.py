"""The bookkeeping of rollout workers that stopped answering (cluster/availability.py): the job goes on while
one answers, waits at most worker_wait_s with none, and says whom it waits for."""

from __future__ import annotations

import logging

import pytest

from cluster.availability import Availability, WorkersLost


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_job_goes_on_while_a_worker_answers_and_is_never_stopped_for_it():
    clock = Clock()
    av = Availability(["rollout-0", "rollout-1"], wait_s=10, clock=clock)
    assert av.lost(1) and not av.lost(1)  # the second failed call of an away worker changes nothing
    assert av.live() == [0]
    clock.now += 1000  # far past wait_s: one worker still answers, so the job goes on
    av.check()
    assert av.describe() == "rollout-1 (away 1000 s)"
    assert av.back(1) == 1000
    assert av.live() == [0, 1] and not av.away


def test_with_no_worker_answering_the_job_stops_after_wait_s_naming_them():
    clock = Clock()
    av = Availability(["rollout-0", "rollout-1"], wait_s=10, clock=clock)
    av.lost(0)
    clock.now += 50  # rollout-0 away for long, rollout-1 answers: no stop
    av.check()
    av.lost(1)  # now none answers: the bound counts from here
    clock.now += 10
    av.check()
    clock.now += 0.5
    with pytest.raises(WorkersLost, match=r"no rollout worker answered for 10 s .*worker_wait_s 10.*"
                                          r"rollout-0 \(away 60 s\), rollout-1 \(away 10 s\)"):
        av.check()


def test_a_worker_back_resets_the_bound():
    clock = Clock()
    av = Availability(["rollout-0"], wait_s=10, clock=clock)
    av.lost(0)
    clock.now += 8
    av.back(0)
    av.lost(0)  # lost again: a new 10 s
    clock.now += 8
    av.check()
    clock.now += 3
    with pytest.raises(WorkersLost):
        av.check()


def test_it_says_whom_it_waits_for_every_log_every_s(caplog):
    clock = Clock()
    av = Availability(["rollout-0", "rollout-1"], wait_s=600, log_every_s=30, clock=clock)
    av.lost(1)
    with caplog.at_level(logging.WARNING, logger="cluster.availability"):
        clock.now += 29
        av.check()
        assert not caplog.records
        clock.now += 1
        av.check()
        av.check()
        assert [r.getMessage() for r in caplog.records] == [
            "going on with rollout-0; still waiting for rollout-1 (away 30 s)"]
        av.lost(0)
        clock.now += 30
        av.check()
        assert caplog.records[-1].getMessage() == ("no rollout worker answers; waiting for rollout-0 (away 30 s), "
                                                   "rollout-1 (away 60 s) (the job stops after 600 s without any)")
