"""The task ledger: which tasks of the prompt order are handed out, which have their group in the replay
service, which will bring none; from it the prompt cursor and how many tasks the staleness bound allows.

A task may start only if it will be trained at most `max_staleness` policy versions after the version that
generates it: with `per_step` groups per step, the tasks up to (step + 1 + max_staleness) x per_step, plus one
more for every task that brings no group (another takes its place). The cursor (saved with every checkpoint) is
the first task whose group is not in the buffer yet: a resumed job hands out from there, and the buffer drops
the groups of tasks after it that it already holds (their ids derive from the task key)."""

from __future__ import annotations

import logging

from .state import RunState

log = logging.getLogger(__name__)


class TaskLedger:
    def __init__(self, state: RunState, per_step: int, max_staleness: int, max_in_flight: int, dedup_window: int):
        self.state = state
        self.per_step, self.max_staleness, self.max_in_flight = per_step, max_staleness, max_in_flight
        self.dedup_window = dedup_window
        self.submitted = state.cursor  # tasks handed out so far (their index in the prompt order)
        self.not_pushed: dict[str, int] = {}  # key -> index: handed out, group not in the buffer yet
        # Tasks that will bring no group here (unreadable media, scoring given up, a dead-lettered record).
        # Those at or after the cursor are counted per run (a resumed job meets them again); those the cursor
        # has passed move into the checkpointed counter `lost_before_cursor`.
        self.lost_here: dict[str, int] = {}
        self._warned = False

    @property
    def lost(self) -> int:
        c = self.state.counters
        return c.get("lost_before_cursor", 0) + c.get("stale_dropped", 0) + len(self.lost_here)

    def allowed(self) -> int:
        """Tasks that may have been handed out by now, under the staleness bound."""
        return (self.state.step + 1 + self.max_staleness) * self.per_step + self.lost

    def next_indices(self, in_flight: int) -> range:
        """The tasks to hand out now: within the bound and within max_prompts_in_flight."""
        room = max(self.max_in_flight - in_flight, 0)
        return range(self.submitted, min(self.allowed(), self.submitted + room))

    def handed_out(self, key: str) -> None:
        self.not_pushed[key] = self.submitted
        self.submitted += 1

    def in_buffer(self, key: str) -> None:
        self.not_pushed.pop(key, None)

    def no_group(self, key: str) -> None:
        """The task brings no group (skipped media, a dead-lettered record): the cursor may pass it."""
        self.lost_here[key] = self.not_pushed.pop(key)

    def given_up(self, key: str) -> None:
        """Scoring given up: another task takes its place in this run, but the cursor stays before it, so a
        resumed job generates and scores it again."""
        self.lost_here[key] = self.not_pushed[key]

    def advance(self) -> None:
        """Move the cursor to the first task whose group is not in the buffer yet."""
        self.state.cursor = min(self.not_pushed.values(), default=self.submitted)
        for key in [k for k, i in self.lost_here.items() if i < self.state.cursor]:
            del self.lost_here[key]
            self.state.bump("lost_before_cursor")
        if self.submitted - self.state.cursor > self.dedup_window and not self._warned:
            self._warned = True  # a group stuck before the cursor: a resume would regenerate too much
            log.warning(f"{self.submitted - self.state.cursor} tasks handed out past the cursor (held back by "
                        f"{min(self.not_pushed, key=self.not_pushed.get)}), more than buffer.dedup_window_groups; a "
                        "resume could accept some of their groups twice")
