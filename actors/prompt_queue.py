"""The prompt stream shared by the rollout workers, with leases so that no prompt is lost or done twice.

A worker leases tasks, generates, and completes each task with its result in one call. A task leased by a
worker that dies goes back to the queue: when Ray restarts the worker, its constructor calls
`release_worker(worker_id)`; a worker that never comes back loses its leases after `lease_timeout_s`. The
first completion of a task wins; a late duplicate (from a lease that had expired) is counted and dropped, so
each task's result is delivered exactly once.

Use it as a Ray actor: `ray.remote(PromptQueue).options(name=...).remote()`. Ray runs one method at a time
on it, so the bookkeeping needs no lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from data.sample import PromptSample


@dataclass
class PromptTask:
    """One prompt to roll out: the manifest row and the driver's hint decision. `key` is unique per task
    (e.g. "<prompt id>@<step>"), so one prompt can be scheduled again in a later step."""

    key: str
    sample: PromptSample
    use_hint: bool = False


class PromptQueue:
    def __init__(self, lease_timeout_s: float | None = None):
        self.lease_timeout_s = lease_timeout_s
        self.pending: OrderedDict[str, PromptTask] = OrderedDict()
        self.leases: dict[str, tuple[str, float, PromptTask]] = {}  # key -> (worker, leased at, task)
        self.done: set[str] = set()
        self.results: list[Any] = []
        self.counts = {"put": 0, "leased": 0, "completed": 0, "requeued": 0, "duplicates": 0}

    def put(self, tasks: list[PromptTask]) -> int:
        for task in tasks:
            if task.key in self.done or task.key in self.pending or task.key in self.leases:
                raise ValueError(f"prompt task {task.key!r} is already queued, leased or done")
            self.pending[task.key] = task
        self.counts["put"] += len(tasks)
        return len(self.pending)

    def _expire(self) -> None:
        if self.lease_timeout_s is None:
            return
        now = time.monotonic()
        for key, (_, since, task) in list(self.leases.items()):
            if now - since > self.lease_timeout_s:
                self._requeue(key, task)

    def _requeue(self, key: str, task: PromptTask) -> None:
        del self.leases[key]
        self.pending[key] = task
        self.pending.move_to_end(key, last=False)  # first in line again
        self.counts["requeued"] += 1

    def lease(self, worker_id: str, max_items: int = 1) -> list[PromptTask]:
        self._expire()
        out = []
        while self.pending and len(out) < max_items:
            key, task = self.pending.popitem(last=False)
            self.leases[key] = (worker_id, time.monotonic(), task)
            out.append(task)
        self.counts["leased"] += len(out)
        return out

    def complete(self, worker_id: str, key: str, result: Any) -> bool:
        """Record the result of a task. False (and the result dropped) when the task was already done."""
        if key in self.done:
            self.counts["duplicates"] += 1
            return False
        if key not in self.leases and key not in self.pending:
            raise KeyError(f"unknown prompt task {key!r}")
        self.leases.pop(key, None)
        self.pending.pop(key, None)  # an expired lease completed late: it still counts, once
        self.done.add(key)
        self.results.append(result)
        self.counts["completed"] += 1
        return True

    def release_worker(self, worker_id: str) -> int:
        """Give back every task leased to `worker_id` (called by a worker when it (re)starts)."""
        keys = [k for k, (w, _, _) in self.leases.items() if w == worker_id]
        for key in keys:
            self._requeue(key, self.leases[key][2])
        return len(keys)

    def take_results(self, max_items: int | None = None) -> list[Any]:
        n = len(self.results) if max_items is None else max_items
        out, self.results = self.results[:n], self.results[n:]
        return out

    def finished(self) -> bool:
        return not self.pending and not self.leases

    def stats(self) -> dict[str, int]:
        return {
            **self.counts,
            "pending": len(self.pending),
            "leased_now": len(self.leases),
            "done": len(self.done),
        }
