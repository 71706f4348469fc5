"""The processes of a local cluster (cluster/local_cluster.py) as the tests see them: to check that stopping it
by PID left none."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from cluster.local_cluster import RECORD


def cluster_processes(folder: Path) -> list[tuple[int, float]]:
    """(pid, start time) of the cluster's recorded processes and all their descendants, now."""
    found = {}
    for node in json.loads((Path(folder) / RECORD).read_text())["nodes"]:
        for entry in node["pids"]:
            try:
                proc = psutil.Process(entry["pid"])
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p.create_time()
            except psutil.NoSuchProcess:
                pass
    return sorted(found.items())


def still_running(pid: int, started: float) -> bool:
    """Whether the process that had this pid and start time still runs (a reused pid is another process; a
    zombie has exited, its parent just has not reaped it)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
