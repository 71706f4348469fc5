"""AVATAR against GRPO in miniature: generated completions until a target training accuracy.

    .venv/bin/python -m benchmarks.sample_efficiency [--seeds 3] [--steps 20] [--target 0.5] [--dry-run]

One stage-0 SFT checkpoint of the tiny Qwen2.5-Omni thinker on the synthetic audio-visual data
(configs/demo_stage0.yaml, built once and cached under the output folder), then the arms from it, each over
the same seeds (seed s sets the learner/rollout seeds and the prompt order), run one after another as
`python -m cluster.cli train configs/<arm's file> ...` subprocesses. The arms are the config files of
benchmarks/arms.py, each differing from configs/avatar_base.yaml in the mechanism it names only:

    grpo         configs/grpo_baseline.yaml         replay off (G = 8 fresh), uniform token weights, no hints
    avatar       configs/avatar_base.yaml           G_on = 4 fresh + G_off = 4 replayed, TAS parabola, hints
    tas_only     configs/ablation_tas_only.yaml     replay off (G = 8 fresh)
    replay_only  configs/ablation_replay_only.yaml  uniform token weights
    no_hints     configs/ablation_no_hints.yaml     hints off (not in the default --arms)

Every arm gets the same benchmark-scale overrides (SCALE below: stage 2 on the synthetic stage-2 data, fp32
without LoRA on CPU, 128 new tokens, 4 prompts per step, lr 1e-4, reward 0.1 format + 0.9 accuracy, staleness
0 (synchronous: the comparison is about samples, not overlap), a checkpoint (and so a commit into the replay
tiers) after every step) and the same number of learner steps (20); before anything runs, each arm's resolved
config is checked to differ from the avatar arm's in its own keys only (`--dry-run` prints those differences
and stops). Training accuracy = the accuracy reward of the freshly generated completions,
over a sliding window of the last `--window` generated completions (the same sample count for every arm, so
the same noise); "completions to target" = the cumulative generated completions at the first step where that
window reaches `--target`. Held-out accuracy: greedy decoding on 48 unseen prompts before and after.
Prints a table, writes benchmarks/results/sample_efficiency.json and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.arms import ARMS, REFERENCE, differences, unexpected
from cluster.config import load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_ARMS = "grpo,avatar,tas_only,replay_only"

# Benchmark scale, the same for every arm (none of them may touch an arm's keys; checked): the stage the paper's
# ablations run (2) on the synthetic data stage 0 was trained on (configs/demo_stage0.yaml: 64 stage-2 items),
# the CPU learner (fp32, ZeRO-1, no LoRA) and media sizes of the demo, short completions, a small buffer, the
# demo's reward weights, and a synchronous pipeline with a checkpoint (a commit into the tiers) every step.
SCALE = [
    "stage=2", "data.synth.stage=2", "data.synth.num_items=64",
    "model.dtype=float32", "processor.max_frames=8", "processor.max_pixels=12544",
    "rollout.max_new_tokens=128",
    "learner.precision=fp32", "learner.zero_stage=1", "learner.lora.enabled=false",
    "buffer.capacity=400", "buffer.min_size=8",
    "reward.weights={format: 0.1, accuracy: 0.9}",
    "pipeline.prompts_per_step=4", "pipeline.max_staleness=0", "pipeline.checkpoint_every=1",
    "pipeline.eval_items=48",
]


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _train(config: str, overrides: list[str], log: Path) -> dict:
    """One stage as a subprocess of the CLI; returns its summary.json. Cached: a finished run with the same
    overrides is not run again."""
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")))
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    folder = run_dir / name
    key = hashlib.sha256(json.dumps([config, overrides]).encode()).hexdigest()[:16]
    stamp = folder / "benchmark_key"
    summary = folder / "summary.json"
    if stamp.is_file() and stamp.read_text() == key and summary.is_file() and "after" in json.loads(summary.read_text()):
        print(f"[bench] {name}: cached ({folder})", flush=True)
        return json.loads(summary.read_text())
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_python(), "-m", "cluster.cli", "train", config, *overrides, "--fresh"]
    print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"[bench] {name} failed (exit {rc}); see {log}")
    out = json.loads(summary.read_text())
    out["wall_seconds"] = time.time() - t0
    summary.write_text(json.dumps(out, indent=2))
    stamp.write_text(key)
    print(f"[bench] {name}: done in {out['wall_seconds']:.0f} s, held-out accuracy {out['before']['accuracy']} -> "
          f"{out['after']['accuracy']}", flush=True)
    return out


def ensure_stage0(out: Path) -> str:
    """The stage-0 SFT export all arms start from (configs/demo_stage0.yaml), built once."""
    runs = out / "runs"
    summary = _train("configs/demo_stage0.yaml", [f"run_dir={runs}", "name=stage0"], out / "logs" / "stage0.log")
    return str(Path(summary["export"]).resolve() if Path(summary["export"]).is_absolute()
               else (ROOT / summary["export"]).resolve())


def shared_overrides(seed: int, steps: int, runs: Path, lr: float) -> list[str]:
    """What every arm of one seed gets, besides its name and init_from (the stage-0 export, the same for all)."""
    return [f"run_dir={runs}", f"seed={seed}", f"data.seed={seed}", *SCALE, f"pipeline.steps={steps}",
            f"learner.lr={lr}"]


def arm_overrides(arm: str, seed: int, steps: int, init_from: str | None, runs: Path, lr: float) -> list[str]:
    init = [f"init_from={init_from}"] if init_from else []
    return [f"name={arm}_s{seed}", *init, *shared_overrides(seed, steps, runs, lr)]


def arm_config(arm: str) -> str:
    """The arm's config file, relative to the repository root (as the CLI is run from there)."""
    return str(ARMS[arm].path.relative_to(ROOT))


def check_arms(arms: list[str], steps: int, runs: Path, lr: float, seed: int = 0) -> dict[str, dict]:
    """Each arm's resolved config against the avatar arm's, both with the same overrides (init_from left out:
    it is the same for every arm, and does not exist before stage 0 is built). Raises SystemExit when an arm
    differs in a key that is not its own or leaves one of its keys unchanged; returns the differences."""
    touched = sorted({".".join(parse_override(o)[0]) for o in shared_overrides(seed, steps, runs, lr)}
                     & {k for a in ARMS.values() for k in a.keys})
    if touched:
        raise SystemExit(f"[bench] the shared overrides set an arm's own keys: {', '.join(touched)}")
    reference = load_config(ARMS["avatar"].path, arm_overrides("avatar", seed, steps, None, runs, lr))
    out = {}
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"[bench] unknown arm {arm!r}; arms: {', '.join(ARMS)}")
        diff = differences(load_config(ARMS[arm].path, arm_overrides(arm, seed, steps, None, runs, lr)), reference)
        extra, missing = unexpected(arm, diff)
        if extra or missing:
            raise SystemExit(f"[bench] {arm_config(arm)} differs from {REFERENCE} in {extra or 'nothing else'} "
                             f"beyond its own keys; its keys left unchanged: {missing or 'none'}")
        out[arm] = {k: v for k, v in diff.items() if k != "name"}
    return out


def print_dry_run(arms: list[str], diffs: dict[str, dict], steps: int, runs: Path, lr: float) -> None:
    print("shared overrides (every arm, seed 0; init_from = the stage-0 export of configs/demo_stage0.yaml):")
    print("  " + " ".join(shared_overrides(0, steps, runs, lr)))
    for arm in arms:
        print(f"\n{arm}: python -m cluster.cli train {arm_config(arm)} name={arm}_s<seed> init_from=<stage 0> ...")
        print(f"  {ARMS[arm].what}; resolved differences from the avatar arm ({REFERENCE}):")
        for key, (ref, val) in diffs[arm].items():
            print(f"    {key}: {ref!r} -> {val!r}")
        if not diffs[arm]:
            print("    none (the reference)")


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def _split(values: list, parts: int) -> list[list]:
    """A step's fresh advantages, group after group (equal group sizes)."""
    k = len(values) // max(parts, 1)
    return [values[i * k:(i + 1) * k] for i in range(parts)] if k else []


def curve(rows: list[dict], window: int) -> list[tuple[int, float | None]]:
    """(cumulative completions, accuracy over the last `window` fresh completions) after every step; None until
    the window is full. Each step contributes its fresh completions (groups x group size) at its mean accuracy."""
    out, recent = [], []  # recent: (n, acc) per step, newest last
    for r in rows:
        n = len(r["advantages_fresh"])
        recent.append((n, r["accuracy"]))
        # keep the newest steps that cover the window (a step is taken whole or partly, newest first)
        need, num, den = window, 0.0, 0
        for k, a in reversed(recent):
            take = min(k, need)
            num, den, need = num + take * a, den + take, need - take
            if need == 0:
                break
        out.append((r["completions_generated"], num / den if need == 0 else None))
    return out


def to_target(points: list[tuple[int, float | None]], target: float) -> int | None:
    for c, acc in points:
        if acc is not None and acc >= target - 1e-9:
            return c
    return None


def _fmt_reach(values: list[int | None], budget: int) -> str:
    reached = sorted(v for v in values if v is not None)
    if not reached:
        return f"not reached (> {budget})"
    # median over all seeds, a seed that never reached counting as above the budget
    full = sorted(v if v is not None else float("inf") for v in values)
    med = statistics.median(full)
    med_s = f"> {budget}" if med == float("inf") else f"{med:.0f}"
    return f"{med_s} [{reached[0]}-{reached[-1]}]"


def _median_or_none(values: list[int | None]) -> float | None:
    """Median with a seed that never reached the target counted as above every budget; None if that is the median."""
    med = statistics.median([v if v is not None else float("inf") for v in values])
    return None if med == float("inf") else med


def summarise(results: dict, target: float, window: int, extra_targets: list[float]) -> dict:
    table = {}
    for arm, runs in results.items():
        budget = max(r["completions"] for r in runs)
        tt = {str(t): [to_target(r["curve"], t) for r in runs] for t in [target, *extra_targets]}
        finals = [r["curve"][-1][1] for r in runs]
        table[arm] = {
            "seeds": [r["seed"] for r in runs],
            "completions_budget": budget,
            "to_target": tt,
            "reached": sum(v is not None for v in tt[str(target)]),
            "median_to_target": _median_or_none(tt[str(target)]),
            "final_train_acc_window": finals,
            "heldout_before": [r["heldout_before"] for r in runs],
            "heldout_after": [r["heldout_after"] for r in runs],
            "zero_adv_token_fraction": statistics.mean(r["zero_adv_token_fraction"] for r in runs),
            "fresh_zero_adv_fraction": statistics.mean(r["fresh_zero_adv_fraction"] for r in runs),
            "hint_rate": statistics.mean(r["hint_rate"] for r in runs),
            "wall_seconds": [round(r["wall_seconds"], 1) for r in runs],
            "diagnostics": diagnostics(runs),
        }
    return table


def print_table(table: dict, target: float, window: int, extra: list[float]) -> list[str]:
    lines = [f"completions generated until the training accuracy over the last {window} completions reaches "
             f"{target:.2f} (median [min-max of the seeds that reached it]); held-out = greedy, 48 prompts",
             "",
             "| arm | seeds reaching | completions to target | final train acc (window) | held-out before -> after "
             "(mean, per seed) | zero-adv token frac | hint rate | wall s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, t in table.items():
        tt = t["to_target"][str(target)]
        finals = ", ".join(f"{v:.2f}" for v in t["final_train_acc_window"])
        after = t["heldout_after"]
        lines.append(
            f"| {arm} | {t['reached']}/{len(tt)} | {_fmt_reach(tt, t['completions_budget'])} | {finals} | "
            f"{statistics.mean(t['heldout_before']):.3f} -> {statistics.mean(after):.3f} "
            f"({', '.join(f'{a:.3f}' for a in after)}) | {t['zero_adv_token_fraction']:.2f} | {t['hint_rate']:.2f} | "
            f"{statistics.mean(t['wall_seconds']):.0f} |")
    lines.append("")
    for x in extra:
        cells = [f"{arm} {_fmt_reach(t['to_target'][str(x)], t['completions_budget'])}" for arm, t in table.items()]
        lines.append(f"other target {x:.2f}: " + "; ".join(cells))
    if "grpo" in table and "avatar" in table:
        for x in [target, *extra]:
            g = statistics.median([v if v is not None else float("inf") for v in table["grpo"]["to_target"][str(x)]])
            a = statistics.median([v if v is not None else float("inf") for v in table["avatar"]["to_target"][str(x)]])
            if a == float("inf") and g == float("inf"):
                ratio = "undefined (neither median reached)"
            elif a == float("inf"):
                ratio = f"< 1 (AVATAR's median did not reach it; GRPO {g:.0f})"
            elif g == float("inf"):
                ratio = f"> {table['grpo']['completions_budget'] / a:.2f} (GRPO's median did not reach it in " \
                        f"{table['grpo']['completions_budget']})"
            else:
                ratio = f"{g / a:.2f}"
            lines.append(f"ratio GRPO/AVATAR of median completions to {x:.2f}: {ratio}")
    lines += ["", "diagnostics (all steps, all seeds): fresh groups whose advantages are all zero, mean |advantage| of "
              "fresh and replayed samples, share of replayed samples with a positive advantage, replay tiers at the end",
              "", "| arm | zero-adv fresh groups | mean abs adv fresh | mean abs adv replayed | replayed adv > 0 | "
              "tiers easy/medium/hard (seed 0) |", "|---|---|---|---|---|---|"]
    for arm, t in table.items():
        d = t["diagnostics"]
        rep = "-" if d["replay_abs_adv"] is None else f"{d['replay_abs_adv']:.2f}"
        pos = "-" if d["replay_positive"] is None else f"{d['replay_positive']:.2f}"
        tiers = "/".join(str(d["tiers_seed0"].get(k, 0)) for k in ("easy", "medium", "hard"))
        lines.append(f"| {arm} | {d['zero_adv_groups']:.2f} | {d['fresh_abs_adv']:.2f} | {rep} | {pos} | {tiers} |")
    for line in lines:
        print(line)
    return lines


def diagnostics(runs: list[dict]) -> dict:
    groups = [g for r in runs for g in r["fresh_groups"]]
    fresh = [a for r in runs for a in r["adv_fresh"]]
    rep = [a for r in runs for a in r["adv_replay"]]
    return {
        "zero_adv_groups": sum(all(a == 0 for a in g) for g in groups) / max(len(groups), 1),
        "fresh_abs_adv": statistics.mean(abs(a) for a in fresh) if fresh else 0.0,
        "replay_abs_adv": statistics.mean(abs(a) for a in rep) if rep else None,
        "replay_positive": sum(a > 0 for a in rep) / len(rep) if rep else None,
        "tiers_seed0": runs[0]["tier_sizes_final"],
    }


def plot(results: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"grpo": "tab:gray", "avatar": "tab:red", "tas_only": "tab:blue", "replay_only": "tab:green",
               "no_hints": "tab:purple"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm, runs in results.items():
        for i, r in enumerate(runs):
            pts = [(c, a) for c, a in r["curve"] if a is not None]
            ax.plot([c for c, _ in pts], [a for _, a in pts], color=colours.get(arm), alpha=0.8,
                    label=arm if i == 0 else None, lw=1.2)
    ax.axhline(target, ls="--", color="k", lw=0.8, label=f"target {target:.2f}")
    ax.set_xlabel("completions generated")
    ax.set_ylabel("training accuracy (sliding window)")
    ax.legend()
    ax.set_title("accuracy against generated completions (one line per seed)")
    for arm in ("grpo", "avatar"):
        if arm not in results:
            continue
        fresh = [a for r in results[arm] for a in r["adv_fresh"]]
        ax2.hist(fresh, bins=40, range=(-3, 3), alpha=0.5, label=f"{arm} fresh", color=colours[arm])
        rep = [a for r in results[arm] for a in r["adv_replay"]]
        if rep:
            ax2.hist(rep, bins=40, range=(-3, 3), alpha=0.5, label=f"{arm} replayed", color="tab:orange")
    ax2.set_xlabel("advantage")
    ax2.set_title("advantages of trained samples (all steps, all seeds)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="learner steps per arm (every arm the same)")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--extra-targets", default="0.4,0.6")
    ap.add_argument("--window", type=int, default=64, help="completions in the training-accuracy window")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of: {', '.join(ARMS)}")
    ap.add_argument("--out", default=str(RESULTS / "sample_efficiency"), help="runs, logs, cached stage 0")
    ap.add_argument("--dry-run", action="store_true",
                    help="check and print each arm's resolved differences from the avatar arm, run nothing")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    arms = args.arms.split(",")
    extra = [float(x) for x in args.extra_targets.split(",") if x]
    diffs = check_arms(arms, args.steps, out / "runs", args.lr)
    if args.dry_run:
        print_dry_run(arms, diffs, args.steps, out / "runs", args.lr)
        return
    t_start = time.time()
    init_from = ensure_stage0(out)
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in range(args.seeds):  # seed-major: a partial run still has every arm
        for arm in arms:
            ov = arm_overrides(arm, seed, args.steps, init_from, out / "runs", args.lr)
            summary = _train(arm_config(arm), ov, out / "logs" / f"{arm}_s{seed}.log")
            rows = read_history(out / "runs" / f"{arm}_s{seed}")
            fresh = [a for r in rows for a in r["advantages_fresh"]]
            results[arm].append({
                "seed": seed,
                "completions": rows[-1]["completions_generated"] if rows else 0,
                "curve": curve(rows, args.window),
                "train_acc_per_step": [r["accuracy"] for r in rows],
                "heldout_before": summary["before"]["accuracy"], "heldout_after": summary["after"]["accuracy"],
                "zero_adv_token_fraction": statistics.mean(r["zero_adv_token_fraction"] for r in rows),
                "fresh_zero_adv_fraction": sum(a == 0 for a in fresh) / max(len(fresh), 1),
                "hint_rate": statistics.mean(r["hint_rate"] for r in rows),
                "adv_fresh": fresh, "adv_replay": [a for r in rows for a in r["advantages_replay"]],
                "fresh_groups": [g for r in rows for g in _split(r["advantages_fresh"], len(r["trained_groups"]))],
                "tier_sizes_final": rows[-1]["tier_sizes"] if rows else {},
                "wall_seconds": summary.get("wall_seconds", 0.0),
            })
    table = summarise(results, args.target, args.window, extra)
    lines = print_table(table, args.target, args.window, extra)
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, png = RESULTS / "sample_efficiency.json", RESULTS / "sample_efficiency.png"
    js.write_text(json.dumps({"args": vars(args), "init_from": init_from, "table": table, "printed": lines,
                              "runs": results, "total_seconds": time.time() - t_start}, indent=1))
    plot(results, args.target, png)
    print(f"total {time.time() - t_start:.0f} s")
    print(f"wrote {js}\nwrote {png}")


if __name__ == "__main__":
    main()
