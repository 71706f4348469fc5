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

    # side by side (AVATAR's Fig. 4): group advantages of fresh samples, VCRS advantages of replayed ones
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    fresh = [a for r in rows for a in r.get("advantages_fresh", [])]
    replay = [a for r in rows for a in r.get("advantages_replay", [])]
    bins = [i / 10 for i in range(-30, 31)]
    for ax, values, label, colour in ((left, fresh, "fresh (group advantage)", "C0"),
                                      (right, replay, "replayed (VCRS advantage)", "C1")):
        ax.hist(values, bins=bins, color=colour)
        zero = sum(1 for v in values if v == 0) / len(values) if values else 0.0
        ax.set_title(f"{label}: n={len(values)}, {zero:.0%} zero")
        ax.set_xlabel("advantage")
    left.set_ylabel("samples")
    fig.suptitle("Advantage distribution: fresh vs replayed samples")
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


def mechanism_summary(rows: list[dict]) -> dict:
    """How much each AVATAR mechanism acted in an RL stage, from its history rows: hints, replay, the tiers,
    staleness drops, judge calls."""
    rows = [r for r in rows if r.get("mode") == "rl"]
    if not rows:
        return {}
    replayed = [r["step"] for r in rows if r.get("replay_fraction", 0) > 0]
    last = rows[-1]
    return {
        "hint_rate_mean": sum(r.get("hint_rate", 0.0) for r in rows) / len(rows),
        "steps_with_hints": sum(1 for r in rows if r.get("hint_rate", 0.0) > 0),
        "hints_active": last.get("hints_active", 0),
        "replay_fraction_mean": sum(r.get("replay_fraction", 0.0) for r in rows) / len(rows),
        "first_replay_step": replayed[0] if replayed else None,
        "tier_sizes": last.get("tier_sizes", {}),
        "zero_adv_group_fraction_mean": sum(r.get("zero_adv_group_fraction", 0.0) for r in rows) / len(rows),
        "stale_dropped": last.get("stale_dropped_total", 0),
        "judge_requests": last.get("judge_requests_total", 0),
        "steps": len(rows),
    }


def format_mechanisms(m: dict) -> str:
    tiers = m["tier_sizes"]
    first = f"from step {m['first_replay_step']}" if m["first_replay_step"] else "never"
    return (f"hint rate {m['hint_rate_mean']:.2f} (hinted prompts on {m['steps_with_hints']} of {m['steps']} steps, "
            f"{m['hints_active']} hints on at the end); replay fraction {m['replay_fraction_mean']:.2f} ({first}); "
            f"tiers easy/medium/hard {tiers.get('easy', 0)}/{tiers.get('medium', 0)}/{tiers.get('hard', 0)}; "
            f"zero-advantage groups {m['zero_adv_group_fraction_mean']:.2f}; stale groups dropped "
            f"{m['stale_dropped']}; judge requests {m['judge_requests']}")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
