"""The job's own state (prompt cursor, step, policy version, the commit a checkpoint still owes) and its
checkpoints: run_dir/checkpoints/step-NNNNNN/{learner/, state.json}, the newest named in `latest`."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunState:
    step: int = 0
    cursor: int = 0  # tasks before this index of the prompt order have entered the replay service
    policy_version: int = 0
    completions_generated: int = 0
    counters: dict = field(default_factory=dict)
    # fresh stream entries trained (already in the tiers) or dropped as stale since the last checkpoint:
    # acknowledged right after the next checkpoint, so that a crash in between redelivers them to the restored
    # learner (their tier insert is not repeated), never trains them twice.
    pending_ack: list = field(default_factory=list)

    def bump(self, name: str, by: int = 1) -> int:
        self.counters[name] = self.counters.get(name, 0) + by
        return self.counters[name]


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_state(run_dir: Path, state: RunState, learner, keep: int = 2) -> Path:
    root = checkpoints_dir(run_dir)
    folder = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learner.save_checkpoint(tmp / "learner")
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a checkpoint exists whole or not at all
    (root / "latest.tmp").write_text(folder.name)
    (root / "latest.tmp").rename(root / "latest")
    older = sorted(p for p in root.glob("step-*") if p != folder)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    marker = checkpoints_dir(run_dir) / "latest"
    if not marker.is_file():
        return None
    folder = checkpoints_dir(run_dir) / marker.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def load_state(folder: Path) -> RunState:
    data = json.loads((folder / "state.json").read_text())
    unknown = set(data) - {f for f in RunState.__dataclass_fields__}
    if unknown:
        raise ValueError(f"{folder}/state.json: written by another version of this project (unknown fields "
                         f"{sorted(unknown)}); start the stage over with --fresh")
    return RunState(**data)
