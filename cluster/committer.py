"""The committer: a step's stream entries are acknowledged only after the checkpoint that contains their
training (or their staleness drop) is on disk, so a crash in between redelivers them to the restored learner
(their tier insert is not repeated) and nothing is trained twice or lost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .state import RunState, save_state


class Committer:
    def __init__(self, run_dir: Path, state: RunState, learner, ack: Callable[[list[str]], object]):
        """`learner` saves its part of the checkpoint (save_checkpoint(dir)); `ack` acknowledges stream entries
        in the replay service (idempotent there)."""
        self.run_dir, self.state, self.learner, self._ack = run_dir, state, learner, ack

    def owe(self, entry_ids: list[str]) -> None:
        """Entries trained or dropped since the last checkpoint (saved with the next one)."""
        self.state.pending_ack += list(entry_ids)

    def checkpoint(self) -> Path:
        folder = save_state(self.run_dir, self.state, self.learner)
        self.ack()
        return folder

    def ack(self) -> None:
        """Acknowledge what the last checkpoint owes (a resumed job acknowledges again what its previous run may
        have stopped before acknowledging)."""
        if self.state.pending_ack:
            self._ack(self.state.pending_ack)
        self.state.pending_ack = []
