"""Medium shared_file: one safetensors file per version, read where the learner wrote it (learner.run_dir on a
filesystem every node shares).

Sending side: the file, written atomically, with the version and the checksum in its metadata, and a LATEST
pointer; the last `keep` versions stay. Receiving side: the file's version and checksum are checked against the
announcement and its tensors against the model's checkpoint before anything is touched, then the engine reloads
its weights from the file (`engine.reload_file`, the vLLM reload recipe of docs/architecture.md, "vLLM on CPU").
The state dict carries checkpoint key names (those of the exported Hugging Face folder).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import WeightLoadError, WeightUpdate, state_dict_checksum

LATEST = "LATEST.json"


def with_timeout(fn, timeout_s: float, what: str):
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


class SharedFileSender:
    """Publishes `weights-v<version>.safetensors` into `directory`, keeping the last `keep` versions."""

    medium = "shared_file"

    def __init__(self, directory: str | Path, timeout_s: float, keep: int = 2):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.keep = max(keep, 1)

    def path_for(self, version: int) -> Path:
        return self.directory / f"weights-v{version:08d}.safetensors"

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int, receivers: int = 0) -> dict:
        start = time.perf_counter()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        checksum = state_dict_checksum(tensors)
        final = self.path_for(version)

        def write():
            tmp = final.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt", "version": str(version), "checksum": checksum})
            os.replace(tmp, final)  # readers never see a half-written file
            write_latest(self.directory, version, checksum, final.name)

        with_timeout(write, self.timeout_s, f"publishing weights v{version} to {final}")
        for old in sorted(self.directory.glob("weights-v*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        return {"medium": self.medium, "version": version, "checksum": checksum, "location": str(final),
                "num_bytes": size, "seconds": time.perf_counter() - start}

    def finish(self) -> dict:
        return {}


def write_latest(directory: Path, version: int, checksum: str, name: str = "") -> None:
    """The LATEST pointer: the newest version published (and its file, where the medium writes one), which a
    resumed job reads to keep versions monotonic."""
    pointer = directory / (LATEST + ".tmp")
    pointer.write_text(json.dumps({"version": version, "path": name, "checksum": checksum}))
    os.replace(pointer, directory / LATEST)


def latest_published(directory: str | Path) -> tuple[int, Path] | None:
    """(version, file) of the newest publish in `directory` (the folder itself for a broadcast), or None before
    the first one."""
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


# --- receiving side -------------------------------------------------------------------------------------------


def read_published(path: str | Path, version: int, checksum: str) -> dict[str, torch.Tensor]:
    """The state dict of a published file, after checking that it is the announced version with the announced
    checksum (recomputed over the bytes). Raises WeightLoadError otherwise."""
    try:
        file_version, state_dict, file_checksum = load_published(path, verify=True)
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"weights v{version} at {path}: {exc}") from exc
    if file_version != version or file_checksum != checksum:
        raise WeightLoadError(
            f"weights at {path}: announced v{version} checksum {checksum[:12]}, file holds v{file_version} "
            f"checksum {file_checksum[:12]}"
        )
    return state_dict


def _tensor_specs(files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    specs = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                specs[name] = tuple(handle.get_slice(name).get_shape())
    return specs


def check_fits(path: str | Path, model_dir: str | Path) -> None:
    """Refuse a weights file that would half-load: every tensor of the model checkpoint (talker aside; a tied
    lm_head may be left out) must be there with its shape, and nothing else. Raises WeightLoadError."""
    want = {
        k: v
        for k, v in _tensor_specs(sorted(Path(model_dir).glob("*.safetensors"))).items()
        if not k.startswith(("talker.", "token2wav."))
    }
    have = _tensor_specs([Path(path)])
    missing = sorted(k for k in set(want) - set(have) if not k.endswith("lm_head.weight"))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{what}: {names[:3]}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            if names
        )
        raise WeightLoadError(f"weights at {path} do not fit the model in {model_dir}: {detail}")


def file_update(path: str | Path, version: int, checksum: str, model_dir: str | Path) -> WeightUpdate:
    """The update that loads a published file on this node into an engine (checked first, then reloaded)."""
    path = str(path)

    def check(engine) -> None:  # refused before the engine pauses
        read_published(path, version, checksum)
        check_fits(path, model_dir)

    return WeightUpdate(version, checksum, apply=lambda engine: engine.reload_file(path),
                        restore=lambda engine: engine.reload_file(path), describe=path, check=check)


def receive(announcement: dict, model_dir: Path) -> WeightUpdate:
    return file_update(announcement["location"], announcement["version"], announcement["checksum"], model_dir)
