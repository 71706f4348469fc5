"""Which rollout workers answer. A worker whose call died with its process or its node (RayActorError) is away
until a call to it answers again: Ray restarts it in place, or, when its node died, once a node with its
placement bundle's resources joins the cluster. The driver goes on with the workers that answer (they take the
away worker's tasks) and logs, every `log_every_s`, whom it still waits for. With no worker answering it waits at
most `wait_s` (pipeline.worker_wait_s), then stops the job with WorkersLost naming the workers. Pure bookkeeping:
the driver (cluster/driver.py) asks Ray, this decides."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkersLost(RuntimeError):
    """No rollout worker answered for longer than pipeline.worker_wait_s."""


class Availability:
    def __init__(self, names: list[str], wait_s: float, log_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.names, self.wait_s, self.log_every_s, self.clock = names, wait_s, log_every_s, clock
        self.away: dict[int, float] = {}  # worker index -> since when
        self._none_since: float | None = None  # since when no worker answers
        self._logged = 0.0

    def live(self) -> list[int]:
        return [i for i in range(len(self.names)) if i not in self.away]

    def lost(self, i: int) -> bool:
        """Worker i's call died; True when it was answering until now."""
        if i in self.away:
            return False
        now = self.clock()
        self.away[i] = self._logged = now
        if not self.live():
            self._none_since = now
        return True

    def back(self, i: int) -> float:
        """Worker i answers again; returns the seconds it was away."""
        self._none_since = None
        return self.clock() - self.away.pop(i)

    def check(self) -> None:
        """Log whom the job still waits for (every log_every_s); raise WorkersLost once no worker has answered
        for longer than wait_s."""
        if not self.away:
            return
        now = self.clock()
        if self._none_since is not None and now - self._none_since > self.wait_s:
            raise WorkersLost(
                f"no rollout worker answered for {now - self._none_since:.0f} s (pipeline.worker_wait_s "
                f"{self.wait_s:g}): {self.describe()}. Their processes or nodes died and no node with their "
                "placement resources joined the cluster again")
        if now - self._logged >= self.log_every_s:
            self._logged = now
            if self._none_since is None:
                log.warning("going on with %s; still waiting for %s", ", ".join(self.names[i] for i in self.live()),
                            self.describe())
            else:
                log.warning("no rollout worker answers; waiting for %s (the job stops after %g s without any)",
                            self.describe(), self.wait_s)

    def describe(self) -> str:
        now = self.clock()
        return ", ".join(f"{self.names[i]} (away {now - since:.0f} s)" for i, since in sorted(self.away.items()))
