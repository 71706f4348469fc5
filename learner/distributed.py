"""Process-group setup for the DeepSpeed learner: CPU (gloo, DS_ACCELERATOR=cpu) or GPU (NCCL)."""

from __future__ import annotations

import os
import socket

import torch


def setup_accelerator_env() -> None:
    """DeepSpeed reads DS_ACCELERATOR at import: pick the CPU accelerator where there is no GPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                     master_port: int | None = None) -> None:
    """Join (or create) the learner's default process group. A no-op when one exists already."""
    setup_accelerator_env()
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if master_port is None:
        if world_size > 1:
            raise ValueError("learner: master_port is required when world_size > 1")
        master_port = free_port()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank if torch.cuda.is_available() else 0),
                      WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # DeepSpeed caches the old groups in module globals; a later learner in this process (tests) must not
    # find them, or its first collective names a destroyed group.
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (a Python object over the process group; other ranks pass anything)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
