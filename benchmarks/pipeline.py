"""The speed of the pipeline: the same AVATAR job synchronous (staleness 0) and asynchronous (staleness 1).

    .venv/bin/python -m benchmarks.pipeline [--steps 20] [--staleness 0,1]

Both runs start from the stage-0 checkpoint that benchmarks/sample_efficiency.py builds (built here if missing)
and are configs/demo.yaml (4 prompts x 4 fresh completions + 16 replayed per step, one rollout worker, one
learner rank, one reward worker, weights published after every step, a checkpoint every 4 steps) on the same
machine, differing only in pipeline.max_staleness. From each run's history (steps after the first, which
includes warm-up):
  trajectories/s       generated completions per second of wall time (and trained samples per second)
  learner busy         the learner's train-step seconds / wall seconds
  rollout busy         the rollout workers' generate seconds / (wall seconds x workers)
  scoring busy         the reward workers' scoring seconds / wall seconds
  per step             the driver's wall seconds by phase (cluster/driver.py `phase_seconds`): rollout_wait
                       (polling the rollout workers, 0.1 s at a time), fresh_wait (the fresh-stream read, which
                       blocks up to 0.1 s for scored groups), scoring (handing groups to the reward pool and
                       polling it), buffer (prompt states, push, replay sampling, commit), train, weight_sync,
                       record, checkpoint; "other" is the rest of the loop
Prints a table, writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from benchmarks.sample_efficiency import RESULTS, _train, ensure_stage0, read_history

PHASES = ["rollout_wait", "fresh_wait", "scoring", "buffer", "train", "weight_sync", "record", "checkpoint"]


def analyse(rows: list[dict], workers: int) -> dict:
    first, last = rows[0], rows[-1]
    body = rows[1:]
    wall = last["time"] - first["time"]
    gen = last["completions_generated"] - first["completions_generated"]
    trained = sum(len(r["advantages_fresh"]) + len(r["advantages_replay"]) for r in body)
    per_step = {p: statistics.mean(r.get("phase_seconds", {}).get(p, 0.0) for r in body) for p in PHASES}
    step_wall = wall / len(body)
    per_step["other"] = step_wall - sum(per_step.values())
    return {
        "steps_measured": len(body),
        "wall_seconds": wall,
        "seconds_per_step": step_wall,
        "trajectories_per_second": gen / wall,
        "trained_samples_per_second": trained / wall,
        "learner_busy": sum(r["step_seconds"] for r in body) / wall,
        "rollout_busy": (last["rollout_generate_seconds"] - first["rollout_generate_seconds"]) / (wall * workers),
        "scoring_busy": (last["reward_scoring_seconds"] - first["reward_scoring_seconds"]) / wall,
        "staleness_max": max(r["staleness_max"] for r in body),
        "staleness_mean": statistics.mean(r["staleness_max"] for r in body),
        "phase_seconds_per_step": per_step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--staleness", default="0,1")
    ap.add_argument("--out", default=str(RESULTS / "sample_efficiency"), help="where the stage-0 checkpoint is cached")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    init_from = ensure_stage0(out)
    results = {}
    for s in [int(x) for x in args.staleness.split(",")]:
        name = f"pipeline_staleness{s}"
        ov = [f"run_dir={out / 'runs'}", f"name={name}", f"init_from={init_from}", f"pipeline.steps={args.steps}",
              f"pipeline.max_staleness={s}", "pipeline.eval_items=0"]
        summary = _train("configs/demo.yaml", ov, out / "logs" / f"{name}.log")
        rows = read_history(out / "runs" / name)
        results[s] = {**analyse(rows, workers=1), "job_wall_seconds": summary.get("wall_seconds")}

    lines = ["| staleness | s/step | trajectories/s | trained samples/s | learner busy | rollout busy | scoring busy "
             "| max staleness seen |", "|---|---|---|---|---|---|---|---|"]
    for s, r in results.items():
        lines.append(f"| {s} | {r['seconds_per_step']:.2f} | {r['trajectories_per_second']:.2f} | "
                     f"{r['trained_samples_per_second']:.2f} | {r['learner_busy']:.2f} | {r['rollout_busy']:.2f} | "
                     f"{r['scoring_busy']:.3f} | {r['staleness_max']} |")
    lines += ["", "driver wall seconds per step by phase (mean over the measured steps)", "",
              "| staleness | " + " | ".join(PHASES + ["other"]) + " |", "|---" * (len(PHASES) + 2) + "|"]
    for s, r in results.items():
        ph = r["phase_seconds_per_step"]
        lines.append(f"| {s} | " + " | ".join(f"{ph[p]:.3f}" for p in PHASES + ["other"]) + " |")
    keys = list(results)
    if len(keys) >= 2:
        a, b = results[keys[0]], results[keys[-1]]
        lines += ["", f"speed-up of staleness {keys[-1]} over {keys[0]} in trajectories/s: "
                      f"{b['trajectories_per_second'] / a['trajectories_per_second']:.2f}x"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs visible, {platform.processor() or platform.platform()}"
    lines += [f"machine: {machine}; {args.steps} steps per run, the first excluded"]
    for line in lines:
        print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    js = RESULTS / "pipeline.json"
    js.write_text(json.dumps({"args": vars(args), "init_from": init_from, "machine": machine, "results": results,
                              "printed": lines, "time": time.time()}, indent=1))
    print(f"wrote {js}")


if __name__ == "__main__":
    main()
