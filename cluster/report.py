"""`python -m cluster.cli report RUN_DIR`: PNG plots from the job's history (history.jsonl, one line per
learner step, written by the driver): reward and accuracy against generated completions, the advantage
histogram of fresh vs replayed samples (AVATAR's Fig. 4), and the replay tier sizes over time."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no history.jsonl in {run_dir}: run `train` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    rows = [r for r in read_history(run_dir) if r.get("mode") == "rl"]
    if not rows:
        raise ValueError(f"{run_dir}/history.jsonl holds no RL steps")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["completions_generated"] for r in rows]
    ax.plot(x, [r["reward_mean"] for r in rows], marker="o", label="mean reward (fresh groups)")
    ax.plot(x, [r["accuracy"] for r in rows], marker="s", label="accuracy term")
    ax.set_xlabel("completions generated")
    ax.set_ylabel("value")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Reward and accuracy against generated completions")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "reward_vs_completions.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    fresh = [a for r in rows for a in r.get("advantages_fresh", [])]
    replay = [a for r in rows for a in r.get("advantages_replay", [])]
    bins = [i / 10 for i in range(-30, 31)]
    ax.hist(fresh, bins=bins, alpha=0.6, label=f"fresh (n={len(fresh)})")
    if replay:
        ax.hist(replay, bins=bins, alpha=0.6, label=f"replayed (n={len(replay)})")
    ax.set_xlabel("advantage")
    ax.set_ylabel("samples")
    ax.set_title("Advantage distribution: fresh vs replayed samples")
    ax.legend()
    paths.append(_save(fig, out / "advantage_histogram.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for tier in ("easy", "medium", "hard"):
        ax.plot(steps, [r.get("tier_sizes", {}).get(tier, 0) for r in rows], marker=".", label=tier)
    ax.set_xlabel("learner step")
    ax.set_ylabel("entries")
    ax.set_title("Replay tier sizes")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "tier_sizes.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
