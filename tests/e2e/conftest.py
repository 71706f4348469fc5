"""Helpers for the end-to-end tests: a job config written to disk and the driver run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def job_env() -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    return env


def write_config(tmp_path: Path, name: str, **settings) -> Path:
    """A small RL stage on the tiny Omni model: configs/demo.yaml made shorter, with `settings` on top."""
    tree = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "name": name,
        "run_dir": str(tmp_path / "runs"),
        "data": {"synth": {"num_items": 12}},
        "rollout": {"max_new_tokens": 16},
        "learner": {"lr": 1.0e-3},
        "buffer": {"min_size": 4},
        "pipeline": {"steps": 6, "prompts_per_step": 2, "replay_per_group": 2, "eval_items": 0,
                     "checkpoint_every": 1},
    }
    for key, value in settings.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def start_job(config: Path, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(config), *extra], cwd=ROOT,
                            env={**job_env(), **(env or {})}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_job(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"job timed out; log tail:\n{log.read_text()[-4000:]}") from None
    assert rc == 0, f"job failed ({rc}); log tail:\n{log.read_text()[-4000:]}"


def history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    leftovers = [p for p in Path("/dev/shm").glob("*") if p.name.startswith(("deepspeed_", "psm_", "vllm"))]
    for p in leftovers:
        p.unlink(missing_ok=True)
