"""Rollout workers' health, as the driver sees it: which ones answer (cluster/availability.py decides), a probe
to each away worker until it answers again, and weight loads failing in a row.

A worker whose call dies (RayActorError: its process or its node died) is away: a probe (its `version()`) stays
pending until it answers again (Ray restarted it, on a node that joined if its own died); a probe that fails (the
actor not yet known as restarting, or gone for good) is sent again after PROBE_AGAIN_S."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from .availability import Availability
from .handout import ready


class WorkerHealth:
    PROBE_AGAIN_S = 2.0

    def __init__(self, names: list[str], wait_s: float, max_load_failures: int,
                 probe: Callable[[int], ray.ObjectRef]):
        """wait_s: pipeline.worker_wait_s; max_load_failures: pipeline.max_weight_load_failures; `probe(i)`
        sends worker i a call that answers once it is up."""
        self.availability = Availability(names, wait_s)
        self.names, self.max_load_failures, self.probe = names, max_load_failures, probe
        self.probes: dict[int, tuple] = {}  # away worker index -> (its pending probe, when sent)
        self.load_failures: dict[str, int] = {}  # rollout worker id -> failed weight loads in a row

    def live(self) -> list[int]:
        return self.availability.live()

    def away_names(self) -> list[str]:
        return [self.names[i] for i in sorted(self.availability.away)]

    def lost(self, i: int) -> bool:
        """Worker i's call died; True when it was answering until now (then it is probed until it answers)."""
        if not self.availability.lost(i):
            return False
        self.probes[i] = (self.probe(i), time.monotonic())
        return True

    def returned(self) -> list[tuple[int, float, int]]:
        """(worker index, seconds away, the policy version it holds) of each away worker whose probe answered
        since the last call; a failed
        probe is sent again. Raises WorkersLost once none has answered for pipeline.worker_wait_s."""
        back = []
        for i, (ref, sent) in list(self.probes.items()):
            if not ready([ref]):
                continue
            try:
                version = ray.get(ref)
            except ray.exceptions.RayActorError:  # not known as restarting yet, or gone for good: ask again
                if time.monotonic() - sent >= self.PROBE_AGAIN_S:
                    self.probes[i] = (self.probe(i), time.monotonic())
                continue
            del self.probes[i]
            back.append((i, self.availability.back(i), version))
        self.availability.check()
        return back

    def weight_load(self, worker_id: str, error: str | None) -> int:
        """A report's weight load: returns the worker's failed loads in a row (0 after a good one); raises once
        they exceed pipeline.max_weight_load_failures."""
        if error is None:
            self.load_failures.pop(worker_id, None)
            return 0
        failed = self.load_failures[worker_id] = self.load_failures.get(worker_id, 0) + 1
        if failed > self.max_load_failures:
            raise RuntimeError(f"{worker_id} failed to load the published weights {failed} times in a row "
                               f"(pipeline.max_weight_load_failures {self.max_load_failures}): {error}")
        return failed
