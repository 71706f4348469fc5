"""The speed of the pipeline: the same AVATAR job synchronous (staleness 0) and asynchronous (staleness 1).

    .venv/bin/python -m benchmarks.pipeline [--steps 20] [--staleness 0,1] [--baseline DIR] [--engine-batch]
        [--weight-update between_requests,in_flight]

Both runs start from the demo's stage-0 checkpoint (configs/demo_stage0.yaml, built once under --out)
and are configs/demo.yaml (4 prompts x 4 fresh completions + 16 replayed per step, one rollout worker, one
learner rank, one reward worker, weights published after every step, a checkpoint every 4 steps) on the same
machine, differing only in pipeline.max_staleness. From each run's history (steps after the first, which
includes warm-up):
  trajectories/s       generated completions per second of wall time (and trained samples per second)
  learner busy         the learner's train-step seconds / wall seconds
  rollout busy         the rollout workers' generate seconds / (wall seconds x workers)
  scoring busy         the reward workers' scoring seconds / wall seconds
  per step             the driver's wall seconds by phase (cluster/driver.py `phase_seconds`): submit (prompt
                       states, handing out tasks), rollout_wait (waiting for a rollout or scoring call to finish
                       and reading the receipts), train (the learner's call: it reads the stream, samples the
                       tiers, trains and inserts), weight_sync, record, checkpoint; "other" is the rest of the
                       loop. Earlier commits (a --baseline run) also had fresh_wait (the driver's stream read),
                       scoring (the driver handing groups to the reward pool) and buffer (pushes, replay sampling,
                       tier inserts by the driver)
  weight sync share    the weight_sync phase over the step's wall time
  generation tok/s     the pipeline's own generation speed: completion tokens over the rollout workers'
                       engine seconds (the history's rollout_tokens / rollout_generate_seconds)
  stale token share    the share of the trained fresh completion tokens sampled by a version older than the one
                       trained (per token: with rollout.weight_update in_flight a completion's tokens after an
                       update count as new); "before update" is the share of generated tokens that were sampled
                       before a weight update that came in the middle of their completion
--weight-update runs each staleness once per rollout.weight_update mode (rows "<staleness>/<mode>").
--baseline DIR runs the same job, with the same overrides and the same stage-0 checkpoint, in DIR (a checkout of
an earlier commit, e.g. `git worktree add ../avatar-f620750 f620750`) right after each of this checkout's runs, and prints
the speed-up in seconds per step. --engine-batch also measures the engine alone (benchmarks/rollout.py's batched
call: 8 prompts x G completions in one vLLM call) on the same stage-0 model and max_new_tokens, so the pipeline's
generation tokens/s can be read against it.
Prints a table, writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.sample_efficiency import RESULTS, ROOT, _python, ensure_stage0, read_history

# the driver's phases; an earlier commit's (a --baseline run) had fresh_wait, scoring and buffer in the driver too,
# which are now inside the learner's train call and the reward workers
PHASES = ["submit", "rollout_wait", "fresh_wait", "scoring", "buffer", "train", "weight_sync", "record", "checkpoint"]


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
        "weight_sync_share": statistics.mean(r.get("phase_seconds", {}).get("weight_sync", 0.0) for r in body)
        / step_wall,
        "generation_tokens_per_second": _generation_speed(first, last),
        # the rollout workers' own weight-load time per step (on their timeline, at the start of a rollout call;
        # absent from older histories)
        "worker_load_seconds_per_step": statistics.mean(r.get("weight_load_seconds") or 0.0 for r in body),
        "staleness_max": max(r["staleness_max"] for r in body),
        "stale_token_share": statistics.mean(r.get("stale_token_share", 0.0) for r in body),
        "tokens_before_update_share": _delta_share(first, last, "rollout_tokens_before_update", "rollout_tokens"),
        "updates_in_flight": last.get("rollout_updates_in_flight", 0) - first.get("rollout_updates_in_flight", 0),
        "staleness_mean": statistics.mean(r["staleness_max"] for r in body),
        "phase_seconds_per_step": per_step,
        # the synchronous run's two halves, for the overlap's ceiling: the worker's engine seconds and the
        # learner's train seconds per step
        "generate_seconds_per_step": (last["rollout_generate_seconds"] - first["rollout_generate_seconds"])
        / (len(body) * workers),
        "train_seconds_per_step": statistics.mean(r["step_seconds"] for r in body),
        "accuracy_mean": statistics.mean(r["accuracy"] for r in rows),
        "completions_generated": last["completions_generated"],
    }


def _generation_speed(first: dict, last: dict) -> float | None:
    """Completion tokens per engine second between two history rows (None for histories without token counts)."""
    if "rollout_tokens" not in last:
        return None
    seconds = last["rollout_generate_seconds"] - first["rollout_generate_seconds"]
    return (last["rollout_tokens"] - first["rollout_tokens"]) / seconds if seconds > 0 else None


def _delta_share(first: dict, last: dict, part: str, whole: str) -> float:
    """(part's growth) / (whole's growth) between two history rows (0 for histories without them)."""
    grown = last.get(whole, 0) - first.get(whole, 0)
    return (last.get(part, 0) - first.get(part, 0)) / grown if grown else 0.0


def engine_batch_speed(model: str, group: int, max_new_tokens: int, log: Path) -> float:
    """benchmarks/rollout.py's batched vLLM call (8 prompts x `group` completions) on `model`: tokens/s."""
    out = log.with_suffix(".json")
    cmd = [_python(), "-m", "benchmarks.rollout", "--model", model, "--prompts", "8", "--group", str(group),
           "--max-new-tokens", str(max_new_tokens), "--out", str(out)]
    print(f"[bench] engine alone: {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"[bench] benchmarks.rollout failed (exit {rc}); see {log}")
    rows = json.loads(out.read_text())["rows"]
    return next(r["tokens_per_s"] for r in rows if r["engine"] == "vllm" and r["prompts"] == "multimodal")


def run_job(checkout: Path, overrides: list[str], log: Path, history: Path) -> dict:
    """`cluster.cli train configs/demo.yaml` in `checkout` (its own packages first on the path, this venv's
    Python), sampling the driver process's CPU seconds (psutil) every 50 ms against the history's length: the
    driver's CPU per trained group is the CPU spent between the first and the last recorded step over the groups
    trained in between (start-up, evaluations and shutdown left out). Works for any commit: nothing in the job
    measures itself."""
    import psutil

    cmd = [_python(), "-m", "cluster.cli", "train", "configs/demo.yaml", *overrides, "--fresh"]
    print(f"[bench] {checkout}: {' '.join(cmd[1:])}", flush=True)
    # the checkout's packages first; what the caller's path adds (e.g. an installed plugin's folder) after them
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])}
    first = last = None  # (rows, driver CPU seconds) when the first and the latest row appeared
    pinned = {}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT)
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                cpu = sum(driver.cpu_times()[:2])
            except psutil.NoSuchProcess:
                break
            rows = len(history.read_text().splitlines()) if history.is_file() else 0
            if rows and first is None:
                first = (rows, cpu)
                pinned = actor_affinity()
            if rows and (last is None or rows > last[0]):
                last = (rows, cpu)
            time.sleep(0.05)
    if proc.wait() != 0:
        raise SystemExit(f"[bench] run failed (exit {proc.returncode}); see {log}")
    return {"driver_cpu_seconds": last[1] - first[1], "rows_between": last[0] - first[0], "actor_cpus": pinned}


def actor_affinity() -> dict[str, list[int]]:
    """The CPUs each rollout worker and learner process may run on, read from the running job (Ray names an
    actor's process ray::<Class>...): what --affinity did, seen from outside."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
            for actor in ("RolloutWorker", "LearnerWorker"):
                if title.startswith(f"ray::{actor}"):
                    out[actor] = sorted(proc.cpu_affinity())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def affinity_overrides(spec: str) -> list[str]:
    """"0:1" -> rollout on CPU 0, learner on CPU 1; "0-1:2-3" -> ranges."""
    def cpus(part: str) -> list[int]:
        out = []
        for piece in part.split(","):
            lo, _, hi = piece.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
        return out

    rollout, sep, learner = spec.partition(":")
    if not sep:
        raise SystemExit(f"--affinity {spec!r}: expected ROLLOUT:LEARNER core lists, e.g. 0:1")
    r, l_ = cpus(rollout), cpus(learner)
    if set(r) & set(l_):
        raise SystemExit(f"--affinity {spec!r}: the rollout and learner cores overlap")
    return [f"rollout.cpu_affinity={r}", f"learner.cpu_affinity={l_}"]


def overlap_table(results: dict, pinned: list[str]) -> list[str]:
    """Each staleness against the synchronous run and against the ceiling of overlapping its two halves:
    (generate + train) / max(generate, train), from the synchronous run's own per-step times."""
    sync = results[0]
    gen, train = sync["generate_seconds_per_step"], sync["train_seconds_per_step"]
    ceiling = (gen + train) / max(gen, train)
    seen = "; ".join(f"staleness {s}: {r.get('actor_cpus')}" for s, r in results.items())
    lines = ["", f"on disjoint cores ({' '.join(pinned)}; the CPUs the actors' processes were allowed, read during the "
                 f"runs: {seen}): the synchronous run generates {gen:.3f} s and trains "
                 f"{train:.3f} s per step, so overlapping them can at most give {ceiling:.2f}x", "",
             "| staleness | trajectories/s | speed-up over staleness 0 | share of the ceiling | mean training accuracy "
             "(same number of generated completions) |", "|---|---|---|---|---|"]
    for s, r in results.items():
        up = r["trajectories_per_second"] / sync["trajectories_per_second"]
        lines.append(f"| {s} | {r['trajectories_per_second']:.2f} | {up:.2f}x | {up / ceiling:.2f} | "
                     f"{r['accuracy_mean']:.3f} ({r['completions_generated']}) |")
        r["speedup_over_sync"], r["share_of_ceiling"] = up, up / ceiling
    sync["overlap_ceiling"] = ceiling
    return lines


def phase_table(title: str, runs: dict) -> list[str]:
    """The printed table of per-step phase seconds, one row per staleness."""
    lines = ["", title, "", "| staleness | " + " | ".join(PHASES + ["other"]) + " |", "|---" * (len(PHASES) + 2) + "|"]
    for s, r in runs.items():
        ph = r["phase_seconds_per_step"]
        lines.append(f"| {s} | " + " | ".join(f"{ph[p]:.3f}" for p in PHASES + ["other"]) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--staleness", default="0,1")
    ap.add_argument("--out", default=str(RESULTS / "demo_stage0"), help="where the demo stage-0 checkpoint is cached")
    ap.add_argument("--baseline", default=None, metavar="DIR", help="a checkout of an earlier commit to compare with")
    ap.add_argument("--engine-batch", action="store_true", help="also time the engine alone on a batched call")
    ap.add_argument("--weight-update", default=None, metavar="MODES",
                    help="rollout.weight_update modes to run each staleness with, e.g. between_requests,in_flight")
    ap.add_argument("--affinity", default=None, metavar="ROLLOUT:LEARNER",
                    help="pin the rollout worker and the learner to disjoint cores, e.g. 0:1 or 0-1:2-3 "
                         "(rollout.cpu_affinity, learner.cpu_affinity), as if on separate devices")
    args = ap.parse_args()
    pinned = affinity_overrides(args.affinity) if args.affinity else []
    out = Path(args.out).resolve()
    init_from = ensure_stage0(out)
    from cluster.config import load_config

    per_step = load_config(str(ROOT / "configs" / "demo.yaml")).pipeline.prompts_per_step  # groups per step
    results, baseline = {}, {}
    modes = args.weight_update.split(",") if args.weight_update else [None]
    for s, mode in [(int(x), m) for x in args.staleness.split(",") for m in modes]:
        name = f"pipeline_staleness{s}" + (f"_{mode}" if mode else "")
        ov = [f"run_dir={out / 'runs'}", f"name={name}", f"init_from={init_from}", f"pipeline.steps={args.steps}",
              f"pipeline.max_staleness={s}", "pipeline.eval_items=0", *pinned,
              *([f"rollout.weight_update={mode}"] if mode else [])]
        key = f"{s}/{mode}" if mode else s
        # timings are never taken from a cache, and each run starts from an empty folder (an earlier commit's
        # --fresh kept the previous run's replay buffer, whose seen ids refused every group)
        for folder in (name, f"baseline_staleness{s}"):
            shutil.rmtree(out / "runs" / folder, ignore_errors=True)
        runs = {name: (ROOT, results)}
        if args.baseline:
            runs[f"baseline_staleness{s}"] = (Path(args.baseline).resolve(), baseline)
        for run, (checkout, into) in runs.items():
            t0 = time.time()
            cpu = run_job(checkout, [o.replace(f"name={name}", f"name={run}") for o in ov], out / "logs" / f"{run}.log",
                          out / "runs" / run / "history.jsonl")
            into[key] = {**analyse(read_history(out / "runs" / run), workers=1), "job_wall_seconds": time.time() - t0,
                       "actor_cpus": cpu["actor_cpus"],
                       "driver_cpu_ms_per_group": 1000 * cpu["driver_cpu_seconds"] / (cpu["rows_between"] * per_step)
                       if cpu["rows_between"] else None}
    engine_tps = engine_batch_speed(init_from, 4, 128, out / "logs" / "engine_batch.log") if args.engine_batch else None

    lines = ["| staleness | s/step | trajectories/s | trained samples/s | learner busy | rollout busy | scoring busy "
             "| max staleness seen | stale token share | tokens before update | updates in flight | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in results.items():
        lines.append(f"| {s} | {r['seconds_per_step']:.2f} | {r['trajectories_per_second']:.2f} | "
                     f"{r['trained_samples_per_second']:.2f} | {r['learner_busy']:.2f} | {r['rollout_busy']:.2f} | "
                     f"{r['scoring_busy']:.3f} | {r['staleness_max']} | {r['stale_token_share']:.3f} | "
                     f"{r['tokens_before_update_share']:.3f} | {r['updates_in_flight']} | {r['accuracy_mean']:.3f} |")
    lines += phase_table("driver wall seconds per step by phase (mean over the measured steps)", results)
    if baseline:
        commit = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        lines += ["", f"this checkout against the baseline checkout (commit {commit}), same job, same machine, "
                      "one run after the other", "",
                  "| staleness | s/step here | s/step baseline | speed-up | weight sync share here | "
                  "weight sync share baseline | worker load s/step here | driver CPU ms/group here | "
                  "driver CPU ms/group baseline |", "|---|---|---|---|---|---|---|---|---|"]
        for s, b in baseline.items():
            r = results[s]
            lines.append(f"| {s} | {r['seconds_per_step']:.2f} | {b['seconds_per_step']:.2f} | "
                         f"{b['seconds_per_step'] / r['seconds_per_step']:.2f}x | {r['weight_sync_share']:.3f} | "
                         f"{b['weight_sync_share']:.3f} | {r['worker_load_seconds_per_step']:.3f} | "
                         f"{r['driver_cpu_ms_per_group']:.2f} | {b['driver_cpu_ms_per_group']:.2f} |")
        lines += phase_table("baseline driver wall seconds per step by phase", baseline)
    lines += ["", "generation tokens/s inside the pipeline (completion tokens / engine seconds)" +
              (f" against the engine alone on one batched call of 8 prompts x 4: {engine_tps:.0f}" if engine_tps
               else ""), ""]
    for s, r in results.items():
        tps = r["generation_tokens_per_second"]
        ratio = f" (engine alone / pipeline: {engine_tps / tps:.2f})" if engine_tps and tps else ""
        lines.append(f"staleness {s}: {tps:.0f} tokens/s{ratio}" if tps else f"staleness {s}: not recorded")
    keys = list(results)
    if pinned and 0 in results:
        lines += overlap_table(results, pinned)
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
                              "baseline": baseline, "engine_batch_tokens_per_second": engine_tps,
                              "printed": lines, "time": time.time()}, indent=1))
    print(f"wrote {js}")


if __name__ == "__main__":
    main()
