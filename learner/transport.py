"""Weight publishing: one method, `publish(state_dict, version)`, one implementation per medium.

- SafetensorsTransport (CPU, or any shared filesystem): one safetensors file per version, written atomically,
  with the version and a checksum in its metadata, and a LATEST pointer. Receivers read it with
  load_published() and apply it with the vLLM reload recipe (docs/architecture.md, "vLLM on CPU").
- CollectiveTransport (NCCL on GPU, gloo on CPU): a private process group between the learner (rank 0) and
  the receivers, outside DeepSpeed's default group; a JSON header then the tensors in flat byte buckets.
  receive_broadcast() is the receiving side. NOT WIRED INTO THE JOB: no option selects it
  (learner.transport accepts only "safetensors"; "nccl" is refused at config load), nothing builds the
  group between the learner and the rollout workers, and the workers (actors/) have no receiving side
  (vLLM would have to call receive_broadcast inside its engine worker, as collective_rpc cannot carry
  tensors). It is a tested building block (tests/integration/test_learner.py, over gloo) for that work.

Both bound the publish by a timeout. The state dict carries checkpoint key names (exactly those of the
exported Hugging Face folder), so a receiver loads it as it would load that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "LATEST.json"


@dataclass
class PublishedWeights:
    version: int
    checksum: str
    location: str  # a file path, or "broadcast"
    num_bytes: int
    seconds: float


class WeightTransport(Protocol):
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PublishedWeights: ...


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def state_dict_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in sorted name order: equal iff the weights are equal."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t.reshape(-1)) if t.numel() else b"")
    return h.hexdigest()


def _with_timeout(fn, timeout_s: float, what: str):
    """Run fn in a thread and raise TimeoutError if it has not finished in time (the thread is abandoned)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


# --- Safetensors files ----------------------------------------------------------------------------------------


class SafetensorsTransport:
    """Publishes `weights-v<version>.safetensors` into `directory`, keeping the last `keep` versions."""

    def __init__(self, directory: str | Path, timeout_s: float, keep: int = 2):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.keep = max(keep, 1)

    def path_for(self, version: int) -> Path:
        return self.directory / f"weights-v{version:08d}.safetensors"

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PublishedWeights:
        start = time.perf_counter()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        checksum = state_dict_checksum(tensors)
        final = self.path_for(version)

        def write():
            tmp = final.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt", "version": str(version), "checksum": checksum})
            os.replace(tmp, final)  # readers never see a half-written file
            pointer = self.directory / (LATEST + ".tmp")
            pointer.write_text(json.dumps({"version": version, "path": final.name, "checksum": checksum}))
            os.replace(pointer, self.directory / LATEST)

        _with_timeout(write, self.timeout_s, f"publishing weights v{version} to {final}")
        for old in sorted(self.directory.glob("weights-v*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        return PublishedWeights(version, checksum, str(final), size, time.perf_counter() - start)


def latest_published(directory: str | Path) -> tuple[int, Path] | None:
    """(version, file) of the newest publish in `directory`, or None before the first one."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    return int(info["version"]), Path(directory) / info["path"]


def load_published(path: str | Path, verify: bool = True) -> tuple[int, dict[str, torch.Tensor], str]:
    """Read a published file: (version, state_dict, checksum). With verify, the checksum is recomputed and a
    mismatch raises ValueError naming the file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "version" not in meta or "checksum" not in meta:
        raise ValueError(f"{path}: not a published weights file (no version/checksum metadata)")
    state_dict = load_file(str(path))
    if verify and state_dict_checksum(state_dict) != meta["checksum"]:
        raise ValueError(f"{path}: checksum mismatch, the file is corrupt or was modified")
    return int(meta["version"]), state_dict, meta["checksum"]


# --- Collective broadcast (NCCL on GPU, gloo on CPU) ----------------------------------------------------------


def init_weight_group(
    host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
) -> torch.distributed.ProcessGroup:
    """A process group of its own (learner = rank 0, receivers 1..n-1) built on a TCPStore, so that it does
    not touch DeepSpeed's default group on the learner or vLLM's groups on the receivers."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"transport backend: expected gloo or nccl, got {backend!r}")


def _broadcast(group, tensor: torch.Tensor, src: int, timeout_s: float) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = src
    work = group.broadcast([tensor], opts)
    if not work.wait(timedelta(seconds=timeout_s)):
        raise TimeoutError(f"weight broadcast did not finish within {timeout_s:.0f} s")


def _buckets(names: list[str], sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    buckets, current, filled = [], [], 0
    for i, size in enumerate(sizes):
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        buckets.append(current)
    return buckets


class CollectiveTransport:
    """Broadcasts the weights from rank `src` of `group` in buckets of about `bucket_bytes`. Not used by the
    job yet (see the module docstring): only safetensors reaches the rollout workers."""

    def __init__(self, group, timeout_s: float, src: int = 0, device: str | torch.device = "cpu",
                 bucket_bytes: int = 256 << 20):
        self.group, self.src, self.device = group, src, torch.device(device)
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> PublishedWeights:
        start = time.perf_counter()
        names = sorted(state_dict)
        tensors = [state_dict[n].detach().contiguous() for n in names]
        checksum = state_dict_checksum(dict(zip(names, tensors)))
        header = json.dumps({
            "version": version, "checksum": checksum, "bucket_bytes": self.bucket_bytes,
            "tensors": [[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in zip(names, tensors)],
        }).encode()
        _broadcast(self.group, torch.tensor([len(header)], dtype=torch.long, device=self.device), self.src,
                   self.timeout_s)
        _broadcast(self.group, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device), self.src,
                   self.timeout_s)
        sizes = [t.numel() * t.element_size() for t in tensors]
        for bucket in _buckets(names, sizes, self.bucket_bytes):
            flat = torch.cat([tensors[i].to(self.device).reshape(-1).view(torch.uint8) for i in bucket])
            _broadcast(self.group, flat, self.src, self.timeout_s)
        return PublishedWeights(version, checksum, "broadcast", sum(sizes), time.perf_counter() - start)


def receive_broadcast(group, timeout_s: float, src: int = 0, device: str | torch.device = "cpu",
                      verify: bool = True) -> tuple[int, dict[str, torch.Tensor], str]:
    """The receiving side of CollectiveTransport.publish: (version, state_dict, checksum)."""
    device = torch.device(device)
    length = torch.zeros(1, dtype=torch.long, device=device)
    _broadcast(group, length, src, timeout_s)
    raw = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    _broadcast(group, raw, src, timeout_s)
    header = json.loads(bytes(raw.cpu().numpy()).decode())
    specs = [(n, getattr(torch, d), tuple(s)) for n, d, s in header["tensors"]]
    sizes = [torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, d, s in specs]
    state_dict: dict[str, torch.Tensor] = {}
    for bucket in _buckets([n for n, _, _ in specs], sizes, header["bucket_bytes"]):
        flat = torch.empty(sum(sizes[i] for i in bucket), dtype=torch.uint8, device=device)
        _broadcast(group, flat, src, timeout_s)
        offset = 0
        for i in bucket:
            name, dtype, shape = specs[i]
            state_dict[name] = flat[offset : offset + sizes[i]].view(dtype).reshape(shape).clone()
            offset += sizes[i]
    if verify and state_dict_checksum(state_dict) != header["checksum"]:
        raise ValueError(f"weights v{header['version']}: checksum mismatch after broadcast")
    return int(header["version"]), state_dict, header["checksum"]
