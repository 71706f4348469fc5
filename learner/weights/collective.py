"""Media gloo and nccl: vLLM's weight-transfer protocol, a broadcast from learner rank 0 into every rollout
engine's model, with nothing written to disk.

Both backends run the same code; only the process group differs (torch's ProcessGroupGloo or ProcessGroupNCCL
on a TCPStore), so the CPU tests of gloo exercise everything nccl runs but the backend. The wire format is
vLLM's packed protocol (vllm/distributed/weight_transfer/packed_tensor.py): the tensors in the order the
update info lists them, cut into uint8 chunks by the same rule as `pack_tensors` (a chunk closes once it holds
more than `packed_buffer_size_bytes`), one broadcast per chunk.

Sending side (learner rank 0): `CollectiveSender.publish` returns the announcement at once (address, world
size, the tensors' names, dtypes and shapes, the checksum) and broadcasts on a thread of its own, which
`finish()` waits for, bounded by learner.publish_timeout_s.

Receiving side: `PackedBroadcastEngine`, a vLLM WeightTransferEngine (a subclass of vLLM's NCCL engine: same init
info, same layerwise reload around the update) registered with WeightTransferEngineFactory as `gloo` and as
`nccl_checked` by `register_weight_engines`, which vLLM runs in every one of its processes as the general plugin
avatar_weight_engines (pyproject.toml): the engine core, where the receiver is built, runs in a process of its
own. It hashes what it
receives, so after an update the worker compares the checksum of what it holds with the announced one.
`receive` builds the engine's apply callable: join, start, update, finish, compare, leave.

Membership: a fresh group per publish, sized to the workers that answer at that moment (world = 1 + receivers,
a new port each time). A group kept between publishes would have to be torn down and rebuilt whenever a worker
dies, restarts or a node joins, and a broadcast into a group with a dead member hangs until its timeout; a
group per publish costs one rendezvous (milliseconds) and makes a restarted or new worker an ordinary member of
the next one. A worker that missed a publish gets the current version by a publish to it alone.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from . import WeightLoadError, WeightUpdate, hash_tensor, state_dict_checksum
from .shared_file import write_latest

log = logging.getLogger(__name__)

BUFFER_BYTES = 256 << 20  # per broadcast; vLLM's default is 1 GiB, smaller keeps the CPU staging copy small
ENGINE_NAMES = {"gloo": "gloo", "nccl": "nccl_checked"}  # learner.transport -> the engine vLLM is built with
PLUGIN_NAME = "avatar_weight_engines"  # the vLLM general plugin (pyproject.toml) that runs register_weight_engines


def open_store(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """The group's rendezvous: a TCPStore of its own (rank 0 hosts it), so that the group touches neither
    DeepSpeed's default group on the learner nor vLLM's groups in the engines. Rank 0 opens it before it
    announces the publish, so a receiver never knocks on a port nobody listens on yet (a client that does backs
    off for seconds)."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def make_group(store, rank: int, world_size: int, backend: str, timeout_s: float):
    """The process group on `store` (learner = rank 0, the engines 1..n): waits at most timeout_s for every
    member to join."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"weight transfer backend: expected gloo or nccl, got {backend!r}")


def broadcast(group, tensor: torch.Tensor, timeout_s: float) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    if not group.broadcast([tensor], opts).wait(timedelta(seconds=timeout_s)):
        raise TimeoutError(f"weight broadcast did not finish within {timeout_s:.0f} s")


def chunks(sizes: list[int], buffer_bytes: int) -> list[list[int]]:
    """Tensor indices per broadcast: vLLM's pack_tensors rule (add, then close once over buffer_bytes)."""
    out, current, filled = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        filled += size
        if filled > buffer_bytes:
            out.append(current)
            current, filled = [], 0
    if current:
        out.append(current)
    return out


# --- sending side ---------------------------------------------------------------------------------------------


class CollectiveSender:
    """Learner rank 0's end: one broadcast group per publish (module docstring)."""

    def __init__(self, backend: str, directory: str | Path, host: str, timeout_s: float,
                 buffer_bytes: int = BUFFER_BYTES):
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("learner.transport nccl: learner rank 0 sees no CUDA device, and NCCL moves GPU "
                               "memory only; use learner.transport gloo (the same protocol over CPU) on this cluster")
        self.medium, self.backend, self.host = backend, backend, host
        self.directory = Path(directory)  # only the LATEST pointer: the version a resumed job starts after
        self.directory.mkdir(parents=True, exist_ok=True)
        self.timeout_s, self.buffer_bytes = timeout_s, buffer_bytes
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._thread: threading.Thread | None = None
        self._outcome: dict = {}

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int, receivers: int) -> dict:
        from learner.distributed import free_port

        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("a weight broadcast is still running")
        start = time.perf_counter()
        names = sorted(state_dict)
        tensors = [state_dict[n].detach().contiguous() for n in names]
        checksum = state_dict_checksum(dict(zip(names, tensors)))
        sizes = [t.numel() * t.element_size() for t in tensors]
        announcement = {
            "medium": self.medium, "version": version, "checksum": checksum, "num_bytes": sum(sizes),
            "master_address": self.host, "master_port": free_port(), "world_size": 1 + receivers,
            "names": names, "dtype_names": [str(t.dtype).removeprefix("torch.") for t in tensors],
            "shapes": [list(t.shape) for t in tensors], "buffer_bytes": self.buffer_bytes,
            "timeout_s": self.timeout_s,
        }
        write_latest(self.directory, version, checksum)
        self._outcome = {"started": start}
        if receivers:
            store = open_store(self.host, announcement["master_port"], 0, 1 + receivers, self.timeout_s)
            self._thread = threading.Thread(target=self._send, args=(store, announcement, tensors, sizes),
                                            daemon=True, name=f"weights-v{version}")
            self._thread.start()
        return announcement

    def _send(self, store, a: dict, tensors: list[torch.Tensor], sizes: list[int]) -> None:
        try:
            group = make_group(store, 0, a["world_size"], self.backend, self.timeout_s)
            for chunk in chunks(sizes, self.buffer_bytes):
                flat = torch.cat([tensors[i].reshape(-1).view(torch.uint8) for i in chunk]).to(self.device)
                broadcast(group, flat, self.timeout_s)
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            self._outcome["seconds"] = time.perf_counter() - self._outcome["started"]
        except BaseException as exc:  # handed to finish()
            self._outcome["error"] = exc

    def finish(self) -> dict:
        """Wait until every receiver holds the broadcast; raises TimeoutError or the broadcast's error."""
        if self._thread is None:
            return {}
        self._thread.join(self.timeout_s + 5)  # the group's own timeouts fire first
        thread, self._thread = self._thread, None
        if thread.is_alive():
            raise TimeoutError(f"weight broadcast did not finish within {self.timeout_s:.0f} s")
        if "error" in self._outcome:
            raise RuntimeError(f"weight broadcast failed: {self._outcome['error']}") from self._outcome["error"]
        return {"seconds": self._outcome["seconds"]}


# --- receiving side: the vLLM engine --------------------------------------------------------------------------


def register_weight_engines() -> None:
    """Register PackedBroadcastEngine with vLLM's factory (idempotent): call it in every vLLM process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name in ENGINE_NAMES.values():
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, engine_class())


@functools.cache
def engine_class():
    """PackedBroadcastEngine, built on first use so that the learner's side never imports vLLM."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

    @dataclass(kw_only=True)
    class CollectiveInitInfo(NCCLWeightTransferInitInfo):
        """vLLM's NCCL init info plus the backend of the group and the bound on joining and each broadcast."""

        backend: str = "gloo"
        timeout_s: float = 120.0

    class PackedBroadcastEngine(NCCLWeightTransferEngine):
        """Receives vLLM's packed broadcast over a gloo or NCCL group (init_info.backend) and loads it with the
        layerwise reload of vLLM's NCCL engine; keeps the sha256 of what it received (`received_checksum`)."""

        init_info_cls = CollectiveInitInfo

        def init_transfer_engine(self, init_info: CollectiveInitInfo) -> None:
            pc = self.parallel_config
            rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
            self.buffer_bytes, self.timeout_s = init_info.packed_buffer_size_bytes, init_info.timeout_s
            self.received_checksum = None
            store = open_store(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                               init_info.timeout_s)
            self.model_update_group = make_group(store, rank, init_info.world_size, init_info.backend,
                                                 init_info.timeout_s)

        def update_weights(self, update_info: dict) -> None:
            self.receive_weights(self.parse_update_info(update_info))
            if self.device.type == "cuda":
                torch.cuda.synchronize()

        def receive_weights(self, update_info) -> None:
            if self.model_update_group is None:
                raise RuntimeError("weight transfer: init_transfer_engine first")
            dtypes = [getattr(torch, d) for d in update_info.dtype_names]
            sizes = [torch.Size(s).numel() * d.itemsize for s, d in zip(update_info.shapes, dtypes)]
            h = hashlib.sha256()
            for chunk in chunks(sizes, self.buffer_bytes):
                flat = torch.empty(sum(sizes[i] for i in chunk), dtype=torch.uint8, device=self.device)
                broadcast(self.model_update_group, flat, self.timeout_s)
                named = unpack_tensor(flat, [update_info.names[i] for i in chunk],
                                      [update_info.shapes[i] for i in chunk], [dtypes[i] for i in chunk],
                                      [sizes[i] for i in chunk])
                for name, tensor in named:
                    hash_tensor(h, name, tensor)
                self.model.load_weights(named)
            self.received_checksum = h.hexdigest()

        def finish_weight_update(self) -> None:
            from actors.engines import refresh_tied_lm_head

            super().finish_weight_update()
            refresh_tied_lm_head(self.model)

        def shutdown(self) -> None:
            self.model_update_group = None  # a group of its own: dropped with its last reference

    return PackedBroadcastEngine


def _received_checksum(worker) -> str | None:
    """Runs in vLLM's worker (collective_rpc): the checksum of the last update it received."""
    return getattr(worker.weight_transfer_engine, "received_checksum", None)


def receive(announcement: dict) -> WeightUpdate:
    """The apply callable for a collective announcement; the driver adds this worker's `rank_offset`."""
    a = announcement
    version, checksum = a["version"], a["checksum"]
    init_info = {
        "master_address": a["master_address"], "master_port": a["master_port"], "rank_offset": a["rank_offset"],
        "world_size": a["world_size"], "packed": True, "packed_buffer_size_bytes": a["buffer_bytes"],
        "backend": a["medium"], "timeout_s": a["timeout_s"],
    }
    update_info = {"names": a["names"], "dtype_names": a["dtype_names"], "shapes": a["shapes"]}

    def apply(engine) -> None:
        try:
            engine.rpc("init_weight_transfer_engine", init_info=init_info)
        except Exception as exc:  # nothing touched yet
            raise WeightLoadError(f"weights v{version}: could not join the {a['medium']} group: {exc}") from exc
        try:
            engine.rpc("start_weight_update")
            engine.rpc("update_weights", update_info=update_info)
            engine.rpc("finish_weight_update")
            held = engine.rpc(_received_checksum)
        finally:
            try:
                engine.rpc("shutdown_weight_transfer_engine")
            except Exception as exc:  # an update still marked active: the next init replaces the group anyway
                log.warning("weights v%d: leaving the group: %s", version, exc)
        if any(c != checksum for c in held):
            raise ValueError(f"weights v{version}: received checksum {str(held[0])[:12]}, the learner announced "
                             f"{checksum[:12]}")

    return WeightUpdate(version, checksum, apply, describe=f"{a['medium']} broadcast")
