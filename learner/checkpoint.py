"""Checkpoints of the learner (resume) and export of the policy to a plain Hugging Face folder (serve)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from .learner import Learner


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(learner: Learner, directory: str | Path) -> Path:
    """Model, optimizer and lr scheduler (DeepSpeed's own format, every ZeRO stage), plus step, policy
    version and each rank's RNG. All ranks must call. Returns the tag folder."""
    directory = Path(directory)
    tag = f"step{learner.step:08d}"
    client = {"step": learner.step, "policy_version": learner.policy_version,
              "config": learner.cfg.model_dump(mode="json")}
    learner.engine.save_checkpoint(str(directory), tag=tag, client_state=client)
    torch.save(_rng_state(), directory / tag / f"rng_rank{learner.rank}.pt")
    return directory / tag


def load_checkpoint(learner: Learner, directory: str | Path, tag: str | None = None) -> dict:
    """Resume from `directory` (its latest tag unless given). Returns the client state."""
    path, client = learner.engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint to resume from")
    learner.step = int(client["step"])
    learner.policy_version = int(client["policy_version"])
    rng = Path(path).parent / f"rng_rank{learner.rank}.pt"
    if not rng.is_file():  # DeepSpeed returns the model-states file path; the tag folder holds ours
        rng = Path(directory) / (tag or (Path(directory) / "latest").read_text().strip()) / f"rng_rank{learner.rank}.pt"
    _set_rng_state(torch.load(rng, weights_only=False))
    return client


_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt")


def export_hf(state_dict: dict[str, torch.Tensor], base_dir: str | Path, out_dir: str | Path, prefix: str) -> Path:
    """Write a Hugging Face folder: the base folder's config, tokenizer and processor files, and one
    model.safetensors with the trained weights under the base checkpoint's names. Weights of the base that
    the learner does not train (e.g. the Qwen2.5-Omni talker, outside `prefix`) are copied over unchanged."""
    from safetensors import safe_open

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = {p.name for pattern in _WEIGHT_FILES for p in base_dir.glob(pattern)}
    for item in base_dir.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copy2(item, out_dir / item.name)
    tensors = dict(state_dict)
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if not key.startswith(prefix) and key not in tensors:
                    tensors[key] = h.get_tensor(key)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
