"""Does AVATAR beat GRPO, and the 4-fresh control, on held-out accuracy per generated completion?

    .venv/bin/python -m benchmarks.sample_efficiency [--seeds 5] [--ablation-seeds 3] [--steps 200] [--quick]

The task (built once under the output folder, `prepare_task`): 48 synthetic stage-2 audio-visual prompts to train
on ("How many beeps sound while the red circle is on screen?", "Which colour was showing when the high tone
played?"; each comes back about 17 times in 200 steps of 4), 100 unseen prompts of the same family held out for
greedy evaluation, and a stage-0 SFT policy (configs/demo_stage0.yaml) trained on the short answers
("<think>I watch and listen.</think><answer>red</answer>") of half of the training prompts only: the RL stage
starts with prompts the policy knows and prompts it does not, a spread of difficulty in which GRPO meets whole
groups answered all right or all wrong (zero advantage). The reward is the accuracy term alone (binary). The
policy memorises its training prompts and does not generalise (docs/benchmarks.md section 1): held-out accuracy is
printed, and is flat; the training-accuracy comparison with the 4-fresh control is what this task can decide.

The arms are the config files of benchmarks/arms.py, each differing from configs/avatar_base.yaml in the
mechanism it names only (checked before anything runs; --dry-run prints the differences):

    grpo         configs/grpo_baseline.yaml         replay off (G = 8 fresh), uniform token weights, no hints
    grpo4        configs/grpo_4fresh.yaml           replay off with G = 4 fresh (AVATAR's fresh completions per
                                                    step), uniform token weights, no hints: the control that
                                                    tells "replay helps" from "more learner steps per generated
                                                    completion help"
    avatar       configs/avatar_base.yaml           G_on = 4 fresh + G_off = 4 replayed, TAS parabola, hints
    tas_only     configs/ablation_tas_only.yaml     replay off (G = 8 fresh)
    replay_only  configs/ablation_replay_only.yaml  uniform token weights
    no_hints     configs/ablation_no_hints.yaml     hints off

The core comparison (grpo, grpo4, avatar) runs --seeds seeds, the ablations --ablation-seeds, seed-major (a
partial run has every arm); seed s is the same learner/rollout seed, prompt order and replay sampling seed in
every arm. Every arm gets SCALE's overrides and the same number of learner steps. Completions are counted as
generated (replayed samples are not generations). Held-out accuracy = greedy decoding on the held-out prompts
every --eval-every steps, so that arms generating 32 and 16 completions per step meet at equal generated
completions; training accuracy = the accuracy of the freshly generated completions over a sliding window of
the last --window generated completions, and of the hinted and unhinted groups apart. The statistics
(benchmarks/stats.py): means over seeds with Student-t 95% intervals, differences to avatar paired over seeds
with t intervals, completions to each training-accuracy target (medians and the seeds' range), and the
zero-advantage share, hint rate, replay fraction and tier sizes. A finished run is cached under the output
folder, keyed by its overrides and the code version (commit, and a hash of uncommitted changes).
Prints the tables, writes benchmarks/results/sample_efficiency.json (every run's curves) and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks import stats
from benchmarks.arms import ARMS, REFERENCE, differences, unexpected
from cluster.config import load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CORE_ARMS = "grpo,grpo4,avatar"
ABLATION_ARMS = "tas_only,replay_only,no_hints"

# The same for every arm (none of them may touch an arm's keys; checked): the stage the paper's ablations run
# (2), the CPU learner (fp32, ZeRO-1, no LoRA, frozen media towers) and media sizes of the demo, short
# completions (a short answer takes 16-17 tokens), a buffer larger than the run's samples, the accuracy reward
# alone, and a synchronous pipeline with a checkpoint (a commit into the tiers) every step.
SCALE = [
    "stage=2",
    "model.dtype=float32", "processor.max_frames=8", "processor.max_pixels=12544",
    "rollout.max_new_tokens=24",
    "learner.precision=fp32", "learner.zero_stage=1", "learner.lora.enabled=false",
    "buffer.capacity=4000", "buffer.min_size=8",
    "reward.weights={accuracy: 1.0}",
    "pipeline.prompts_per_step=4", "pipeline.max_staleness=0", "pipeline.checkpoint_every=1",
]
MANIFEST_KEYS = ("data.manifest", "data.eval_manifest")


@dataclass(frozen=True)
class Plan:
    """The size of one benchmark: the task's prompts, stage 0 and the RL arms."""

    steps: int = 200  # learner steps per arm
    lr: float = 1e-3
    eval_every: int = 50  # learner steps between held-out evaluations (GRPO-8 at 50 meets the others at 100)
    train_items: int = 48  # each comes back about 17 times in 200 steps of 4
    sft_items: int = 24  # the first ones of the training prompts (every question kind and level alike)
    heldout_items: int = 100
    sft_steps: int = 200
    window: int = 128  # generated completions in the training-accuracy window (4 GRPO steps, 8 AVATAR steps)
    targets: tuple[float, ...] = (0.7, 0.75, 0.8)


# CI's smoke run: the core arms for 4 steps from the tiny random model (no stage 0: one process fewer)
QUICK = Plan(steps=4, eval_every=2, train_items=8, sft_items=0, heldout_items=8, sft_steps=0, window=16,
             targets=(0.3, 0.5))


@dataclass(frozen=True)
class Task:
    train: Path  # manifest of the RL training prompts
    sft: Path  # manifest of the stage-0 prompts (a subset of train)
    heldout: Path  # manifest of the held-out prompts


def task_paths(out: Path) -> Task:
    return Task(out / "task" / "train" / "manifest.jsonl", out / "task" / "train" / "sft.jsonl",
                out / "task" / "heldout" / "manifest.jsonl")


def task_synth():
    """The question family: the synthetic stage-2 questions ("How many beeps sound while the red circle is on
    screen?", "Which colour was showing when the high tone played?") with short answers."""
    from data.config import SynthConfig

    return SynthConfig(stage=2, short_answers=True)


def prepare_task(out: Path, plan: Plan) -> Task:
    """task_synth's prompts: plan.train_items to train on (seed 0), plan.heldout_items held out (seed 1000:
    disjoint by construction), and the stage-0 subset (the first plan.sft_items training prompts). Generated
    once; a folder made for another plan or family is made again."""
    from data.synth import generate

    synth = task_synth()
    task = task_paths(out)
    stamp = out / "task" / "plan.json"
    want = json.dumps([plan.train_items, plan.sft_items, plan.heldout_items, synth.model_dump()])
    if stamp.is_file() and stamp.read_text() == want and all(p.is_file() for p in (task.train, task.sft, task.heldout)):
        return task
    print(f"[bench] generating the task: {plan.train_items} training prompts, {plan.heldout_items} held out",
          flush=True)
    generate(synth.model_copy(update={"num_items": plan.train_items, "seed": 0}), task.train.parent)
    generate(synth.model_copy(update={"num_items": plan.heldout_items, "seed": 1000}), task.heldout.parent)
    rows = task.train.read_text().splitlines()[: plan.sft_items]
    task.sft.write_text("".join(row + "\n" for row in rows))
    stamp.write_text(want)
    return task


def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def code_version() -> str:
    """The commit the runs were made with (git rev-parse HEAD), and with uncommitted changes to tracked files a
    hash of them (`<commit>-dirty-<hash>`): a cached run made by other code is run again. "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        head, diff = git("rev-parse", "HEAD").strip(), git("diff", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty-{hashlib.sha256(diff.encode()).hexdigest()[:12]}" if diff else head


def _train(config: str, overrides: list[str], log: Path) -> dict:
    """One stage as a subprocess of the CLI; returns its summary.json. Cached: a finished run with the same
    overrides and the same code version is not run again."""
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")))
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    folder = run_dir / name
    key = hashlib.sha256(json.dumps([config, overrides, code_version()]).encode()).hexdigest()[:16]
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
    """The demo's stage-0 SFT export (configs/demo_stage0.yaml: 64 synthetic items), built once; the pipeline and
    fleet benchmarks start from it."""
    summary = _train("configs/demo_stage0.yaml", [f"run_dir={out / 'runs'}", "name=stage0"], out / "logs" / "stage0.log")
    return _export_path(summary)


def ensure_task_stage0(out: Path, task: Task, plan: Plan) -> str:
    """This benchmark's stage 0: configs/demo_stage0.yaml on the short answers of the stage-0 prompts, evaluated
    on the held-out prompts. Built once."""
    ov = [f"run_dir={out / 'runs'}", "name=stage0", f"data.manifest={task.sft}", f"data.eval_manifest={task.heldout}",
          f"pipeline.steps={plan.sft_steps}", f"pipeline.eval_items={plan.heldout_items}", "rollout.max_new_tokens=24",
          f"pipeline.checkpoint_every={plan.sft_steps}"]
    return _export_path(_train("configs/demo_stage0.yaml", ov, out / "logs" / "stage0.log"))


def _export_path(summary: dict) -> str:
    export = Path(summary["export"])
    return str(export.resolve() if export.is_absolute() else (ROOT / export).resolve())


def shared_overrides(seed: int, plan: Plan, task: Task, runs: Path) -> list[str]:
    """What every arm of one seed gets, besides its name and init_from (the stage-0 export, the same for all)."""
    return [f"run_dir={runs}", f"seed={seed}", f"data.seed={seed}", *SCALE, f"data.manifest={task.train}",
            f"data.eval_manifest={task.heldout}", f"pipeline.eval_items={plan.heldout_items}",
            f"pipeline.eval_every={plan.eval_every}", f"pipeline.steps={plan.steps}", f"learner.lr={plan.lr}"]


def arm_overrides(arm: str, seed: int, plan: Plan, task: Task, init_from: str | None, runs: Path) -> list[str]:
    init = [f"init_from={init_from}"] if init_from else []
    return [f"name={arm}_s{seed}", *init, *shared_overrides(seed, plan, task, runs)]


def arm_config(arm: str) -> str:
    """The arm's config file, relative to the repository root (as the CLI is run from there)."""
    return str(ARMS[arm].path.relative_to(ROOT))


def check_arms(arms: list[str], plan: Plan, task: Task, runs: Path, seed: int = 0) -> dict[str, dict]:
    """Each arm's resolved config against the avatar arm's, both with the same overrides (init_from left out:
    it is the same for every arm, and does not exist before stage 0 is built; the manifests need not exist yet).
    Raises SystemExit when an arm differs in a key that is not its own or leaves one of its keys unchanged;
    returns the differences."""
    touched = sorted({".".join(parse_override(o)[0]) for o in shared_overrides(seed, plan, task, runs)}
                     & {k for a in ARMS.values() for k in a.keys})
    if touched:
        raise SystemExit(f"[bench] the shared overrides set an arm's own keys: {', '.join(touched)}")

    def resolved(arm: str):
        return load_config(ARMS[arm].path, arm_overrides(arm, seed, plan, task, None, runs),
                           unchecked_paths=MANIFEST_KEYS)

    reference = resolved("avatar")
    out = {}
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"[bench] unknown arm {arm!r}; arms: {', '.join(ARMS)}")
        diff = differences(resolved(arm), reference)
        extra, missing = unexpected(arm, diff)
        if extra or missing:
            raise SystemExit(f"[bench] {arm_config(arm)} differs from {REFERENCE} in {extra or 'nothing else'} "
                             f"beyond its own keys; its keys left unchanged: {missing or 'none'}")
        out[arm] = {k: v for k, v in diff.items() if k != "name"}
    return out


def print_dry_run(arms: list[str], diffs: dict[str, dict], plan: Plan, task: Task, runs: Path) -> None:
    print("shared overrides (every arm, seed 0; init_from = this benchmark's stage-0 export):")
    print("  " + " ".join(shared_overrides(0, plan, task, runs)))
    for arm in arms:
        print(f"\n{arm}: python -m cluster.cli train {arm_config(arm)} name={arm}_s<seed> init_from=<stage 0> ...")
        print(f"  {ARMS[arm].what}; resolved differences from the avatar arm ({REFERENCE}):")
        for key, (ref, val) in diffs[arm].items():
            print(f"    {key}: {ref!r} -> {val!r}")
        if not diffs[arm]:
            print("    none (the reference)")


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def run_record(seed: int, summary: dict, rows: list[dict], window: int) -> dict:
    """What the analysis needs of one run, from its summary.json and history."""
    steps = [(r["completions_generated"], r["accuracy"], len(r["advantages_fresh"])) for r in rows]
    heldout = [(0, summary["before"]["accuracy"])]
    heldout += [(r["completions_generated"], r["heldout_accuracy"]) for r in rows if r.get("heldout_accuracy") is not None]
    heldout.append((rows[-1]["completions_generated"] if rows else 0, summary["after"]["accuracy"]))
    return {
        "seed": seed,
        "completions": rows[-1]["completions_generated"] if rows else 0,
        "steps": steps,
        "curve": stats.window_curve(steps, window),
        "heldout": heldout,
        "zero_adv_groups": [r["zero_adv_group_fraction"] for r in rows],
        "group_accuracy": [r["group_accuracy"] for r in rows],
        "hint_rate": [r["hint_rate"] for r in rows],
        # the accuracy of the fresh groups with and without a hint, apart (a hint may make its prompt easier)
        "hinted_accuracy": [a for r in rows for a, h in zip(r["group_accuracy"], r["group_hinted"]) if h],
        "unhinted_accuracy": [a for r in rows for a, h in zip(r["group_accuracy"], r["group_hinted"]) if not h],
        "replay_fraction": [r["replay_fraction"] for r in rows],
        "tiers": [r["tier_sizes"] for r in rows],
        "advantages_fresh": [a for r in rows for a in r["advantages_fresh"]],
        "advantages_replay": [a for r in rows for a in r["advantages_replay"]],
        "wall_seconds": summary.get("wall_seconds", 0.0),
    }


def _quarters(per_step: list[list[float]]) -> tuple[float, float, float]:
    """Mean over all steps and seeds, over the first quarter of the steps, over the last quarter."""
    n = min(len(s) for s in per_step)
    q = max(n // 4, 1)
    flat = [v for s in per_step for v in s]
    first = [v for s in per_step for v in s[:q]]
    last = [v for s in per_step for v in s[n - q:n]]
    return statistics.fmean(flat), statistics.fmean(first), statistics.fmean(last)


def run_metrics(r: dict, plan: Plan, start: float, end: float, points: list[int]) -> dict:
    """One run's numbers that the per-arm and the paired statistics share."""
    heldout = dict(r["heldout"])
    return {
        "to_target": {str(t): stats.to_target(r["curve"], t) for t in plan.targets},
        "mean_train_acc": stats.mean_over(r["curve"], start, end),
        # per learner step instead of per generated completion: every arm runs the same number of steps
        "mean_step_acc": statistics.fmean(acc for _, acc, _ in r["steps"]),
        "heldout_at": {str(c): heldout[c] for c in points},
    }


def analyse(results: dict[str, list[dict]], plan: Plan, reference: str = "avatar") -> dict:
    """Per-arm statistics and each arm against the reference arm (paired over the seeds both ran)."""
    every = [r for runs in results.values() for r in runs]
    # the range of generated completions every run's training-accuracy window covers
    start = max(next(c for c, acc in r["curve"] if acc is not None) for r in every)
    end = min(r["completions"] for r in every)
    points = sorted(set.intersection(*[{c for c, _ in r["heldout"]} for r in every]))
    metrics = {arm: {r["seed"]: run_metrics(r, plan, start, end, points) for r in runs} for arm, runs in results.items()}

    def column(arm: str, seeds, key: str, sub: str | None = None) -> list[float]:
        return [metrics[arm][s][key] if sub is None else metrics[arm][s][key][sub] for s in seeds]

    arms = {}
    for arm, runs in results.items():
        seeds = [r["seed"] for r in runs]
        tiers = {k: statistics.median(r["tiers"][-1].get(k, 0) for r in runs) for k in ("easy", "medium", "hard")}
        arms[arm] = {
            "seeds": seeds,
            "completions_per_run": statistics.median(r["completions"] for r in runs),
            "to_target": {str(t): column(arm, seeds, "to_target", str(t)) for t in plan.targets},
            "mean_train_acc": column(arm, seeds, "mean_train_acc"),
            "mean_step_acc": column(arm, seeds, "mean_step_acc"),
            "heldout_at": {str(c): column(arm, seeds, "heldout_at", str(c)) for c in points},
            "heldout_final": [r["heldout"][-1][1] for r in runs],
            "zero_adv_groups": _quarters([r["zero_adv_groups"] for r in runs]),
            "hint_rate": _quarters([r["hint_rate"] for r in runs]),
            "train_acc_unhinted": [_mean_or_nan(r["unhinted_accuracy"]) for r in runs],
            "train_acc_hinted": [_mean_or_nan(r["hinted_accuracy"]) for r in runs],
            "replay_fraction": _quarters([r["replay_fraction"] for r in runs]),
            "tiers_final_median": tiers,
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs),
        }

    def paired_difference(arm: str, seeds, key: str, sub: str | None = None) -> dict:
        mine, ref = column(arm, seeds, key, sub), column(reference, seeds, key, sub)
        return {"diff": stats.difference_of_means(ref, mine), "ci": stats.paired_t_interval(ref, mine)}

    vs = {}
    for arm in results:
        seeds = [s for s in metrics[arm] if s in metrics.get(reference, {})]
        if arm == reference or not seeds:
            continue
        out = {"seeds": seeds, "to_target": {}}
        for t in map(str, plan.targets):
            a, b = column(arm, seeds, "to_target", t), column(reference, seeds, "to_target", t)
            out["to_target"][t] = {"ratio": stats.ratio_of_medians(a, b)}
        out["mean_train_acc"] = paired_difference(arm, seeds, "mean_train_acc")
        out["mean_step_acc"] = paired_difference(arm, seeds, "mean_step_acc")
        out["heldout_at"] = {str(c): paired_difference(arm, seeds, "heldout_at", str(c)) for c in points}
        vs[arm] = out
    return {"common_completions": end, "window_start": start, "heldout_points": points, "arms": arms, "vs_reference": vs,
            "reference": reference}


def _mean_or_nan(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _ci(values: list[float], digits: int = 3) -> str:
    """The mean over seeds and its t interval (seeds without a value, NaN, left out)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    lo, hi = stats.t_interval(values)
    return f"{stats.fmt(statistics.fmean(values), digits)} [{stats.fmt(lo, digits)}, {stats.fmt(hi, digits)}]"


def _range(values: list[float]) -> str:
    """The median over seeds and the seeds' range (a few seeds' medians get no interval)."""
    return f"{stats.fmt(stats.median(values), 0)} ({stats.fmt(min(values), 0)}-{stats.fmt(max(values), 0)})"


def print_tables(a: dict, plan: Plan) -> list[str]:
    ref, arms, end = a["reference"], a["arms"], a["common_completions"]
    points = a["heldout_points"]
    lines = [f"### Held-out accuracy (greedy, {plan.heldout_items} unseen prompts) at equal generated completions", "",
             f"mean over seeds [95% t interval]; diff = {ref} - arm, paired over seeds [95% t interval]", "",
             "| arm | seeds | " + " | ".join(f"at {c} | diff" for c in points) + " |",
             "|---|---|" + "---|---|" * len(points)]
    for arm, t in arms.items():
        v = a["vs_reference"].get(arm)
        cells = []
        for c in points:
            cells += [_ci(t["heldout_at"][str(c)]), "-" if v is None else _diff(v["heldout_at"][str(c)])]
        lines.append(f"| {arm} | {len(t['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", f"### Training accuracy: over generated completions {a['window_start']}-{end} (the area under the "
              f"last-{plan.window}-completions curve / its width), per learner step, and of unhinted and hinted "
              "groups apart (whole run)", "",
              f"mean [95% t interval]; diff = {ref} - arm, paired over seeds [95% t interval]", "",
              "| arm | per generated completion | diff | per learner step | diff | unhinted groups | hinted groups |",
              "|---|---|---|---|---|---|---|"]
    for arm, t in arms.items():
        v = a["vs_reference"].get(arm)
        lines.append(f"| {arm} | {_ci(t['mean_train_acc'])} | {'-' if v is None else _diff(v['mean_train_acc'])} | "
                     f"{_ci(t['mean_step_acc'])} | {'-' if v is None else _diff(v['mean_step_acc'])} | "
                     f"{_ci(t['train_acc_unhinted'])} | {_ci(t['train_acc_hinted'])} |")
    lines += ["", "### The runs", "",
              "| arm | seeds | completions per run | zero-adv groups: all (first, last quarter) | hint rate | replay "
              "fraction | tiers easy/medium/hard at the end | held-out before -> after (mean [95% t interval]) | "
              "wall s/run |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arm, t in arms.items():
        z, h, r = t["zero_adv_groups"], t["hint_rate"], t["replay_fraction"]
        before = statistics.fmean(t["heldout_at"]["0"]) if "0" in t["heldout_at"] else math.nan
        tiers = "/".join(f"{t['tiers_final_median'][k]:.0f}" for k in ("easy", "medium", "hard"))
        lines.append(f"| {arm} | {len(t['seeds'])} | {t['completions_per_run']:.0f} | {z[0]:.2f} ({z[1]:.2f}, {z[2]:.2f}) "
                     f"| {h[0]:.2f} | {r[0]:.2f} | {tiers} | {before:.3f} -> {_ci(t['heldout_final'])} | "
                     f"{t['wall_seconds']:.0f} |")
    lines += ["", f"### Completions generated until the training accuracy (last {plan.window} generated completions) "
              "reaches a target", "", "median over seeds (the seeds' range); inf = not reached within the run; "
              f"ratio = the arm's median / {ref}'s median (> 1: {ref} needed fewer)", "",
              "| arm | " + " | ".join(f"to {t:.2f} | ratio to {ref}" for t in plan.targets) + " |",
              "|---|" + "---|---|" * len(plan.targets)]
    for arm, t in arms.items():
        cells = []
        for target in plan.targets:
            vals = t["to_target"][str(target)]
            reached = sum(v != stats.INF for v in vals)
            cells.append(f"{_range(vals)} ({reached}/{len(vals)} reached)")
            v = a["vs_reference"].get(arm, {}).get("to_target", {}).get(str(target))
            cells.append("-" if v is None else stats.fmt(v["ratio"]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for line in lines:
        print(line)
    return lines


def _diff(d: dict) -> str:
    lo, hi = d["ci"]
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if not math.isnan(lo) else f"{d['diff']:+.3f}"


COLOURS = {"grpo": "tab:gray", "grpo4": "tab:brown", "avatar": "tab:red", "tas_only": "tab:blue", "replay_only": "tab:green",
           "no_hints": "tab:purple"}


def plot(results: dict[str, list[dict]], plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_train, ax_held, ax_zero, ax_mech = axes.flat
    for arm, runs in results.items():
        colour = COLOURS.get(arm)
        top = max(r["completions"] for r in runs)
        grid = [plan.window + (top - plan.window) * i / 99 for i in range(100)]
        ys = [[stats.value_at(r["curve"], x) for r in runs] for x in grid]
        ok = [(x, y) for x, y in zip(grid, ys) if all(v is not None for v in y)]
        ax_train.plot([x for x, _ in ok], [statistics.median(y) for _, y in ok], color=colour, label=f"{arm} ({len(runs)} seeds)")
        ax_train.fill_between([x for x, _ in ok], [min(y) for _, y in ok], [max(y) for _, y in ok], color=colour, alpha=0.15)
        points = sorted({c for r in runs for c, _ in r["heldout"]})
        held = [[dict(r["heldout"]).get(c) for r in runs] for c in points]
        held = [(c, [v for v in h if v is not None]) for c, h in zip(points, held)]
        ax_held.plot([c for c, _ in held], [statistics.fmean(h) for _, h in held], "o-", color=colour, label=arm)
        ax_held.fill_between([c for c, _ in held], [min(h) for _, h in held], [max(h) for _, h in held], color=colour, alpha=0.15)
        n = min(len(r["zero_adv_groups"]) for r in runs)
        done = [runs[0]["steps"][i][0] for i in range(n)]
        ax_zero.plot(done, _smooth([statistics.fmean(r["zero_adv_groups"][i] for r in runs) for i in range(n)]),
                     color=colour, label=arm)
    if "avatar" in results:
        runs = results["avatar"]
        n = min(len(r["hint_rate"]) for r in runs)
        steps = list(range(1, n + 1))
        ax_mech.plot(steps, _smooth([statistics.fmean(r["hint_rate"][i] for r in runs) for i in range(n)]), color="tab:red", label="hint rate")
        ax_mech.plot(steps, [statistics.fmean(r["replay_fraction"][i] for r in runs) for i in range(n)], color="tab:orange", label="replay fraction")
        ax_mech.set_ylabel("share of the step's groups / samples")
        twin = ax_mech.twinx()
        for tier, style in (("easy", ":"), ("medium", "--"), ("hard", "-")):
            twin.plot(steps, [statistics.fmean(r["tiers"][i].get(tier, 0) for r in runs) for i in range(n)], style,
                      color="k", lw=0.9, label=f"tier {tier}")
        twin.set_ylabel("samples in the tier")
        twin.legend(loc="center right", fontsize=8)
        ax_mech.legend(loc="upper left", fontsize=8)
        ax_mech.set_xlabel("learner step")
        ax_mech.set_title("AVATAR's mechanisms in the avatar arm (mean of seeds)")
    for t in plan.targets:
        ax_train.axhline(t, ls="--", color="k", lw=0.5)
    ax_train.set(xlabel="completions generated", ylabel=f"training accuracy (last {plan.window} completions)",
                 title="training accuracy: median of seeds, band min-max")
    ax_held.set(xlabel="completions generated", ylabel=f"held-out accuracy (greedy, {plan.heldout_items} prompts)",
                title="held-out accuracy: mean of seeds, band min-max")
    ax_zero.set(xlabel="completions generated", ylabel="fresh groups with equal rewards (GRPO advantage 0)",
                title="zero-advantage share (10-step moving mean)")
    for ax in (ax_train, ax_held, ax_zero):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(values: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def _finite(tree):
    """JSON without Infinity/NaN: inf -> "inf", nan -> null."""
    if isinstance(tree, float):
        return "inf" if tree == math.inf else None if math.isnan(tree) else tree
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_finite(v) for v in tree]
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the core arms")
    ap.add_argument("--ablation-seeds", type=int, default=3, help="seeds of the ablation arms (0: none)")
    ap.add_argument("--arms", default=CORE_ARMS, help=f"core arms, comma-separated, of: {', '.join(ARMS)}")
    ap.add_argument("--ablations", default=ABLATION_ARMS)
    ap.add_argument("--steps", type=int, default=Plan.steps, help="learner steps per arm (every arm the same)")
    ap.add_argument("--lr", type=float, default=Plan.lr)
    ap.add_argument("--quick", action="store_true", help="a smoke run: a small task, no stage 0, 4 steps, 1 seed, "
                    "no ablations")
    ap.add_argument("--out", default=None, help="runs, logs, the task and stage 0 (default results/sample_efficiency[_quick])")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON and the PNG are written")
    ap.add_argument("--dry-run", action="store_true",
                    help="check and print each arm's resolved differences from the avatar arm, run nothing")
    args = ap.parse_args()
    plan = replace(QUICK if args.quick else Plan(), **({} if args.quick else {"steps": args.steps, "lr": args.lr}))
    seeds = 1 if args.quick else args.seeds
    ablation_seeds = 0 if args.quick else args.ablation_seeds
    name = "sample_efficiency_quick" if args.quick else "sample_efficiency"
    out = Path(args.out or RESULTS / name).resolve()
    core = [a for a in args.arms.split(",") if a]
    ablations = [a for a in args.ablations.split(",") if a and a not in core] if ablation_seeds else []
    task = task_paths(out)
    diffs = check_arms(core + ablations, plan, task, out / "runs")
    if args.dry_run:
        print_dry_run(core + ablations, diffs, plan, task, out / "runs")
        return
    t_start = time.time()
    task = prepare_task(out, plan)
    init_from = ensure_task_stage0(out, task, plan) if plan.sft_steps else None
    results: dict[str, list[dict]] = {a: [] for a in core + ablations}
    schedule = [(s, a) for s in range(seeds) for a in core] + [(s, a) for s in range(ablation_seeds) for a in ablations]
    for i, (seed, arm) in enumerate(schedule):  # seed-major: a partial run still has every arm
        print(f"[bench] run {i + 1}/{len(schedule)}: {arm}, seed {seed} ({time.time() - t_start:.0f} s so far)", flush=True)
        ov = arm_overrides(arm, seed, plan, task, init_from, out / "runs")
        summary = _train(arm_config(arm), ov, out / "logs" / f"{arm}_s{seed}.log")
        results[arm].append(run_record(seed, summary, read_history(out / "runs" / f"{arm}_s{seed}"), plan.window))
    analysis = analyse(results, plan)
    lines = print_tables(analysis, plan)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    js, png = results_dir / f"{name}.json", results_dir / f"{name}.png"
    js.write_text(json.dumps(_finite({"args": vars(args), "plan": asdict(plan), "init_from": init_from,
                                      "analysis": analysis, "printed": lines, "runs": results,
                                      "code_version": code_version(), "total_seconds": time.time() - t_start}), indent=1))
    plot(results, plan, png)
    print(f"total {time.time() - t_start:.0f} s")
    print(f"wrote {js}\nwrote {png}")


if __name__ == "__main__":
    main()
