"""Weight media: how the learner's published weights reach the rollout engines. One module per medium, with
both of its ends:

- object_store.py: a safetensors file whose bytes travel through Ray's object store (no shared filesystem);
- shared_file.py: the same file read where the learner wrote it (a filesystem every node shares);
- collective.py: vLLM's weight-transfer protocol, a broadcast from learner rank 0 into every engine's model
  (backend gloo on any cluster, nccl on GPUs);
- lora.py: the LoRA adapter only (peft format), served by vLLM as a LoRA request.

Each medium has a sending side (learner rank 0: `publish(state, version, receivers)` returns the announcement, a
dict with the medium, the version, the checksum and what a receiver needs; `finish()` waits until it is
delivered) and a receiving side (`receive(announcement, local_dir)` returns a WeightUpdate: the version, the
checksum, an optional `check` that the rollout engine runs before it pauses, and the `apply` callable that it
runs between its pause and resume: actors/engines.py, `update_weights`). `learner.transport`
picks the medium here, in `make_sender`; the announcement names its medium, so a receiver needs no setting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

# media whose announcement a worker can act on later (its next rollout call): the bytes wait for it
PULLABLE = ("object_store", "shared_file", "lora")
COLLECTIVE = ("gloo", "nccl")


class WeightLoadError(RuntimeError):
    """The weights of a version could not be loaded; the engine still serves its previous version."""


@dataclass
class WeightUpdate:
    """One update as the engine applies it (the medium of that update, as the engine sees it). `check(engine)`,
    where the medium has one, runs before the engine pauses and refuses (WeightLoadError) without touching
    anything. `apply(engine)` does the medium's work inside the paused engine; raising WeightLoadError means it
    refused before touching the weights, any other error that it may have touched them (the engine then restores
    the last weights it can restore). `restore(engine)`, where the medium can, brings these weights back later (a
    file on this node): the engine keeps it as its fallback after this update."""

    version: int
    checksum: str
    apply: Callable[[Any], None]
    restore: Callable[[Any], None] | None = None
    describe: str = ""
    check: Callable[[Any], None] | None = None


class Sender(Protocol):
    medium: str

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int, receivers: int) -> dict: ...

    def finish(self) -> dict: ...


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def hash_tensor(h, name: str, t: torch.Tensor) -> None:
    """Adds one named tensor to a running sha256 (the unit of state_dict_checksum, so a receiver that sees the
    tensors one at a time, in sorted name order, computes the same checksum)."""
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_tensor_bytes(t.reshape(-1)) if t.numel() else b"")


def state_dict_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in sorted name order: equal iff the weights are equal."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        hash_tensor(h, name, state_dict[name])
    return h.hexdigest()


def make_sender(transport: str, publish_dir: str | Path, timeout_s: float, host: str = "127.0.0.1",
                adapter_config: dict | None = None) -> Sender:
    """The sending side of a medium (learner rank 0): `learner.transport`'s, or lora (adapter_config: the
    adapter's peft config)."""
    if transport == "lora":
        from .lora import LoraSender

        return LoraSender(publish_dir, timeout_s, adapter_config or {})
    if transport == "object_store":
        from .object_store import ObjectStoreSender

        return ObjectStoreSender(publish_dir, timeout_s)
    if transport == "shared_file":
        from .shared_file import SharedFileSender

        return SharedFileSender(publish_dir, timeout_s)
    if transport in COLLECTIVE:
        from .collective import CollectiveSender

        return CollectiveSender(transport, publish_dir, host, timeout_s)
    raise ValueError(f"learner.transport: unknown medium {transport!r}")


def receive(announcement: dict, local_dir: Path, model_dir: Path) -> WeightUpdate:
    """The receiving side for an announcement (on a rollout worker): the update its engine applies."""
    medium = announcement["medium"]
    if medium == "object_store":
        from .object_store import receive as receive_object

        return receive_object(announcement, local_dir, model_dir)
    if medium == "shared_file":
        from .shared_file import receive as receive_file

        return receive_file(announcement, model_dir)
    if medium in COLLECTIVE:
        from .collective import receive as receive_collective

        return receive_collective(announcement)
    if medium == "lora":
        from .lora import receive as receive_lora

        return receive_lora(announcement, local_dir)
    raise WeightLoadError(f"weights v{announcement.get('version')}: unknown medium {medium!r}")
