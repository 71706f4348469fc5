"""The committer: a step's stream entries are acknowledged only after the checkpoint that contains their
training (or their staleness drop) is on disk, so a crash in between redelivers them to the restored learner
(their tier insert is not repeated) and nothing is trained twice or lost."""

from __future__ import annotations

from pathlib import Path

import ray

from .components import Components
from .state import RunState, save_state


class Committer:
    def __init__(self, run_dir: Path, comps: Components, state: RunState):
        self.run_dir, self.comps, self.state = run_dir, comps, state

    def owe(self, entry_ids: list[str]) -> None:
        """Entries trained or dropped since the last checkpoint (saved with the next one)."""
        self.state.pending_ack += list(entry_ids)

    def checkpoint(self) -> Path:
        folder = save_state(self.run_dir, self.state, self.comps.learner)
        self.ack()
        return folder

    def ack(self) -> None:
        """Acknowledge what the last checkpoint owes (idempotent in the service: a resumed job acknowledges
        again what its previous run may have stopped before acknowledging)."""
        if self.state.pending_ack:
            ray.get(self.comps.buffer.ack.remote(self.state.pending_ack))
        self.state.pending_ack = []
