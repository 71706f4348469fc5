"""Task hand-out: the rollout calls in flight. A call carries several tasks of one worker (it generates them in
one engine call and answers once their groups are scored and pushed); tasks are dealt round robin over the
workers that answer, and wait, unassigned, while none does. Which workers answer is not decided here
(cluster/worker_health.py): the caller passes them in."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from actors.tasks import PromptTask


class TaskHandout:
    def __init__(self, call: Callable[[int, list[PromptTask]], ray.ObjectRef]):
        """`call(worker index, tasks)` starts one rollout call and returns its reference."""
        self.call = call
        self.calls: dict = {}  # ObjectRef -> (tasks, worker index)
        self.unassigned: list[PromptTask] = []  # handed out, waiting for a worker that answers
        self._next = 0

    @property
    def tasks_in_flight(self) -> int:
        return sum(len(tasks) for tasks, _ in self.calls.values()) + len(self.unassigned)

    @property
    def idle(self) -> bool:
        return not self.calls and not self.unassigned

    def give(self, tasks: list[PromptTask], live: list[int]) -> None:
        """One call per answering worker, the tasks dealt round robin; with none answering they wait."""
        if not live:
            self.unassigned += tasks
            return
        shares: dict[int, list[PromptTask]] = {}
        for task in tasks:
            shares.setdefault(live[self._next % len(live)], []).append(task)
            self._next += 1
        for i, share in shares.items():
            self.calls[self.call(i, share)] = (share, i)

    def give_waiting(self, live: list[int]) -> None:
        """The unassigned tasks to the workers that answer, if any does."""
        if self.unassigned and live:
            tasks, self.unassigned = self.unassigned, []
            self.give(tasks, live)

    def wait(self, timeout: float) -> None:
        """Sleep until a call finishes, or `timeout` passes: the driver wakes on the first."""
        if self.calls and timeout > 0:
            ray.wait(list(self.calls), num_returns=1, timeout=timeout)
        elif timeout > 0:
            time.sleep(timeout)

    def finished(self) -> list[tuple[list[PromptTask], int, object]]:
        """(tasks, worker index, its report or the exception the call raised) of each call that has finished."""
        return [(*self.calls.pop(ref), answer) for ref, answer in gather(self.calls)]

    def drain(self, timeout_s: float) -> None:
        """Wait for what is still generating or scoring: its groups enter the buffer for the next run."""
        deadline = time.monotonic() + timeout_s
        while self.calls and time.monotonic() < deadline:
            self.wait(1.0)
            for ref in ready(self.calls):
                self.calls.pop(ref)


def ready(calls) -> list:
    """The references among `calls` whose result is there (without waiting)."""
    if not calls:
        return []
    done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
    return done


def gather(calls) -> list[tuple]:
    """(ref, answer or the exception it raised) for the calls that have finished, fetched in one ray.get."""
    done = ready(calls)
    if not done:
        return []
    try:
        return list(zip(done, ray.get(done)))
    except Exception:  # one of them failed: fetch one by one to tell which
        out = []
        for ref in done:
            try:
                out.append((ref, ray.get(ref)))
            except Exception as exc:
                out.append((ref, exc))
        return out
