"""Medium object_store (the default): the shared_file medium's file, but its bytes travel through Ray's object
store, and each worker writes its own copy on its own node, so no shared filesystem is needed.

Sending side: the file is written on the learner's node (its staging copy) and its bytes put into the object
store (`blob`). Receiving side: the bytes are fetched and written into the worker's folder, then loaded as a
shared file; the folder keeps only the copy the engine holds (what it restores on a failed update).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from . import WeightUpdate
from .shared_file import SharedFileSender, file_update


class ObjectStoreSender(SharedFileSender):
    medium = "object_store"

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int, receivers: int = 0) -> dict:
        import ray

        announcement = super().publish(state_dict, version)
        announcement["blob"] = ray.put(Path(announcement["location"]).read_bytes())
        return announcement


def receive(announcement: dict, local_dir: Path, model_dir: Path) -> WeightUpdate:
    version, checksum = announcement["version"], announcement["checksum"]
    path = Path(local_dir) / f"weights-v{version:08d}.safetensors"
    from_file = file_update(path, version, checksum, model_dir)

    def check(engine) -> None:  # the bytes on this node, checked, before the engine pauses
        import ray

        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(ray.get(announcement["blob"]))
        os.replace(tmp, path)
        try:
            from_file.check(engine)
        except BaseException:
            path.unlink(missing_ok=True)  # the engine keeps the copy it holds
            raise

    def apply(engine) -> None:
        try:
            from_file.apply(engine)
        except BaseException:
            path.unlink(missing_ok=True)  # the engine restores the copy it held
            raise
        for old in Path(local_dir).glob("weights-v*.safetensors"):  # only the copy the engine now holds
            if old != path:
                old.unlink(missing_ok=True)

    return WeightUpdate(version, checksum, apply, restore=from_file.restore, describe=str(path), check=check)
