"""Folders the job reads (the model, the prompt data) reaching every node without a shared filesystem.

On a cluster of several nodes the driver packs each such folder once into Ray's object store (`ship_folder`);
a component on any node maps a path of the driver's node to its own node's copy (`NodePaths`), which the first
component of that node to need it unpacks into the node's temp folder (`local_copy`), keyed by the folder's
content digest. So a component never reads a file another node wrote. Folders named in `storage.shared_paths`
(a shared filesystem, or copied to every node beforehand) and every folder on a one-node cluster are read where
they are: `NodePaths()` maps nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ShipError(ValueError):
    """A folder cannot be shipped (missing, or larger than storage.max_ship_mb)."""


@dataclass(frozen=True)
class ShippedFolder:
    origin: str  # the folder's absolute path on the driver's node
    digest: str  # sha256 of the packed bytes: the name of every node's copy
    blob: object  # ray.ObjectRef of the packed (tar) bytes
    size: int


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ship_folder(path: str | Path, max_mb: float) -> ShippedFolder:
    """Pack a folder (symlinks followed) into Ray's object store, once; refused above max_mb."""
    import ray

    folder = Path(path).resolve()
    if not folder.is_dir():
        raise ShipError(f"cannot ship {folder}: not a folder")
    size = folder_size(folder)
    if size > max_mb * 2**20:
        raise ShipError(f"{folder} is {size / 2**20:.0f} MiB, over storage.max_ship_mb {max_mb:g}: put it on a path "
                        "every node has and name that path in storage.shared_paths")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", dereference=True) as tar:
        for f in sorted(folder.rglob("*")):  # sorted: the same folder gives the same bytes, hence the same digest
            if f.is_file():
                info = tar.gettarinfo(str(f), arcname=str(f.relative_to(folder)))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with f.open("rb") as fh:
                    tar.addfile(info, fh)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    log.info("shipping %s (%.1f MiB) to the other nodes through the object store", folder, len(data) / 2**20)
    return ShippedFolder(str(folder), digest, ray.put(data), len(data))


def _copies_prefix() -> str:
    """Copies are the job's own (a job id of Ray's): removed when it stops, never shared with another job."""
    import ray

    return f"avatar-files-{ray.get_runtime_context().get_job_id()}-"


def local_copy(shipped: ShippedFolder) -> Path:
    """This node's copy of a shipped folder, unpacked by the first process of the node that asks (a file lock
    keeps the others waiting) and kept for the later ones, until the job removes its copies."""
    import ray

    root = Path(tempfile.gettempdir())
    target = root / f"{_copies_prefix()}{shipped.digest[:16]}"
    if target.is_dir():
        return target
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=root))
            try:
                with tarfile.open(fileobj=io.BytesIO(ray.get(shipped.blob)), mode="r") as tar:
                    tar.extractall(partial, filter="data")  # no absolute paths, no .., no links out
                os.replace(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            log.info("unpacked %s on this node into %s", shipped.origin, target)
    return target


def remove_copies() -> list[str]:
    """Remove this job's copies on this node (what `remove_job_copies` runs on each node); returns their names."""
    removed = []
    for entry in Path(tempfile.gettempdir()).glob(f"{_copies_prefix()}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        else:  # its lock file
            entry.unlink(missing_ok=True)
    return removed


def remove_job_copies(timeout_s: float = 60.0) -> int:
    """Remove the job's copies on every alive node (a task pinned to each); returns how many copies went."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(remove_copies)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in ray.nodes() if n["Alive"]]
    return sum(len(r) for r in ray.get(refs, timeout=timeout_s))


@dataclass(frozen=True)
class NodePaths:
    """Where this node has the driver node's folders: a path under a shipped folder's origin maps to the same
    place under this node's copy; any other path is left as it is (shared, or on a one-node cluster)."""

    folders: tuple[ShippedFolder, ...] = ()

    def path(self, p: str | Path | None) -> Path | None:
        if p is None:
            return None
        p = Path(p)
        for folder in self.folders:
            origin = Path(folder.origin)
            if p == origin or origin in p.parents:
                return local_copy(folder) / p.relative_to(origin)
        return p

    def sample(self, sample):
        """A PromptSample with its media paths on this node."""
        if not self.folders:
            return sample
        return dataclasses.replace(sample, video=self.path(sample.video), audio=self.path(sample.audio))
