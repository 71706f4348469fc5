"""Medium lora: with learner.lora.enabled (and lora.publish adapter, the default) only the trained LoRA adapter
is published, in peft's format, and vLLM serves it as a LoRA request over the base weights it loaded at start;
the media towers carry no adapters (they stay frozen). A few hundred KB to tens of MB per publish instead of
every weight of the model.

Sending side (learner rank 0): `adapter_model.safetensors` (peft's key names under the checkpoint's prefix, e.g.
`base_model.model.thinker.model.layers.0.self_attn.q_proj.lora_A.weight`) written on the learner's node, its
bytes put into Ray's object store; the adapter's config travels in the announcement. Receiving side: the folder
written on the worker's node, its checksum checked, then the engine serves it (`engine.serve_lora`: a new
LoRARequest per version, the previous one removed). A refused adapter leaves the previous one serving.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import WeightLoadError, WeightUpdate, state_dict_checksum
from .shared_file import with_timeout, write_latest

ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


class LoraSender:
    medium = "lora"

    def __init__(self, directory: str | Path, timeout_s: float, adapter_config: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.timeout_s, self.adapter_config = timeout_s, adapter_config

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int, receivers: int = 0) -> dict:
        import ray

        start = time.perf_counter()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        checksum = state_dict_checksum(tensors)
        path = self.directory / f"adapter-v{version:08d}.safetensors"

        def write():
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt", "version": str(version), "checksum": checksum})
            os.replace(tmp, path)
            write_latest(self.directory, version, checksum, path.name)

        with_timeout(write, self.timeout_s, f"publishing adapter v{version} to {path}")
        for old in sorted(self.directory.glob("adapter-v*.safetensors"))[:-2]:
            old.unlink(missing_ok=True)
        # through Ray's object store in a job; a process without Ray (a test, a benchmark) reads the file
        blob = ray.put(path.read_bytes()) if ray.is_initialized() else None
        return {"medium": self.medium, "version": version, "checksum": checksum, "location": str(path),
                "blob": blob, "adapter_config": self.adapter_config,
                "num_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "seconds": time.perf_counter() - start}

    def finish(self) -> dict:
        return {}


def receive(announcement: dict, local_dir: Path) -> WeightUpdate:
    version, checksum = announcement["version"], announcement["checksum"]
    folder = Path(local_dir) / f"lora-v{version:08d}"

    def check(engine) -> None:  # the adapter on this node, checked, before the engine pauses
        import ray

        folder.mkdir(parents=True, exist_ok=True)
        blob = announcement["blob"]
        (folder / ADAPTER_FILE).write_bytes(ray.get(blob) if blob is not None else
                                            Path(announcement["location"]).read_bytes())
        (folder / CONFIG_FILE).write_text(json.dumps(announcement["adapter_config"]))
        held = state_dict_checksum(load_file(str(folder / ADAPTER_FILE)))
        if held != checksum:
            shutil.rmtree(folder, ignore_errors=True)
            raise WeightLoadError(f"adapter v{version}: its checksum is {held[:12]}, the learner announced "
                                  f"{checksum[:12]}")

    def apply(engine) -> None:
        try:
            engine.serve_lora(version, str(folder))
        except Exception as exc:  # the previous adapter keeps serving
            shutil.rmtree(folder, ignore_errors=True)
            raise WeightLoadError(f"adapter v{version}: vLLM did not take it: {exc}") from exc
        for old in Path(local_dir).glob("lora-v*"):  # only the adapter being served
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    return WeightUpdate(version, checksum, apply, restore=lambda engine: engine.serve_lora(version, str(folder)),
                        describe=f"LoRA adapter {folder}", check=check)
