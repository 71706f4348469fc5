"""Pinning a process to CPU cores: how a rollout worker and a learner sharing one machine run as if on separate
devices (rollout.cpu_affinity, learner.cpu_affinity)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

log = logging.getLogger(__name__)


def cpu_list(cpus: list[int] | None) -> list[int] | None:
    """Validates a configured core list (load time): None, or distinct non-negative ids, sorted."""
    if cpus is None:
        return None
    if not cpus:
        raise ValueError("an empty CPU list: leave it unset (null) to use every core")
    if any(c < 0 for c in cpus) or len(set(cpus)) != len(cpus):
        raise ValueError(f"CPU ids must be distinct and non-negative, got {cpus}")
    return sorted(cpus)


# A config field of CPU ids (rollout.cpu_affinity, learner.cpu_affinity), checked by cpu_list when loaded.
CpuList = Annotated[list[int] | None, AfterValidator(cpu_list)]


def pin_process(cpus: list[int] | None, setting: str) -> None:
    """Run every thread of this process, and those it starts later, on `cpus` only; torch's intra-op threads
    become len(cpus), and vLLM-CPU, which binds its OpenMP threads itself (to every core unless told), is told
    the same cores (VLLM_CPU_OMP_THREADS_BIND, read when its engine starts). Raises ValueError naming `setting`
    when a core is not available to this process. None: nothing changes."""
    if not cpus:
        return
    available = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - available)
    if missing:
        raise ValueError(f"{setting}: CPU ids {missing} are not available on this node (available: {sorted(available)})")
    # sched_setaffinity(0) moves the calling thread only: the threads Ray started before us move one by one
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            pass
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))
    import torch

    torch.set_num_threads(len(cpus))
    log.info("pinned pid %d to CPUs %s (%s)", os.getpid(), cpus, setting)
