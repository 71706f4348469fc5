"""The bounded soak (by hand, not in CI): the demo job with every fault injected in turn for `--minutes`,
then the ledger check and the RSS of each component sampled over time (it must not grow without bound).

    .venv/bin/python -m tests.faults.soak --minutes 20            # the issue's soak
    .venv/bin/python -m tests.faults.soak --minutes 4 --steps 40  # a shortened one

Faults, in turn, one every --every seconds: rollout worker (mid-generation), reward worker, learner (the job
stops with exit 3 and is resumed with the same command), weight publish hang, redis-server (exit 3, resume
from the AOF), driver (SIGKILL, resume). Writes soak.json (faults, RSS samples, ledger) into the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil

from tests.e2e.conftest import start_job, write_config
from tests.faults import harness as h

TITLES = ("RolloutWorker", "RewardWorker", "LearnerWorker", "ReplayService", "JudgeEngineActor")


def rss_sample(driver_pid: int) -> dict[str, float]:
    """RSS in MiB per component kind (the driver, redis-server, each Ray actor kind summed with its children)."""
    out: dict[str, float] = {}
    try:
        out["driver"] = psutil.Process(driver_pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return out
    redis = h.find_redis(driver_pid)
    if redis is not None:
        out["redis"] = redis.memory_info().rss / 2**20
    for title in TITLES:
        total = 0.0
        for p in h.find(driver_pid, f"ray::{title}"):
            try:
                total += sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20
            except psutil.NoSuchProcess:
                pass
        if total:
            out[title] = total
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=200, help="RL steps of the job: choose about the soak length (faults stop 4 steps before the end)")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between faults")
    ap.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="avatar-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(work, "soak", stage=3, **{
        "data.synth.stage": 3, "data.synth.num_items": 48, "pipeline.steps": args.steps,
        "pipeline.max_staleness": 1, "pipeline.checkpoint_every": 2,
        "learner.publish_timeout_s": 3.0, "reward.judge.timeout_s": 10.0, "reward.judge.allow_tiny": True,
        "reward.weights": {"format": 0.2, "accuracy": 0.5, "judge": 0.3},  # the demo's weights leave the judge out
        "buffer.capacity": 100_000})  # nothing evicted: the ledger finds every committed trajectory in the tiers
    run_dir, log = work / "runs" / "soak", work / "soak.log"
    job = start_job(config, log)
    records, samples, faults = [], [], ["rollout", "reward", "learner", "publish", "redis", "driver", "judge"]
    t_end = time.time() + args.minutes * 60
    next_fault, i = time.time() + args.every, 0
    try:
        h.wait_for(lambda: h.steps_done(run_dir) >= 1, 600, "the first step")
        while time.time() < t_end and h.steps_done(run_dir) < args.steps - 4:
            samples.append({"t": time.time(), "step": h.steps_done(run_dir), **rss_sample(job.pid)})
            if job.poll() is not None:  # stopped by a fault that needs a resume: the documented command
                assert job.returncode in (3, -9), f"job failed ({job.returncode}):\n{log.read_text()[-3000:]}"
                job = start_job(config, log)
            if time.time() >= next_fault:
                kind, n = faults[i % len(faults)], h.steps_done(run_dir)
                i += 1
                rec = h.FaultRecord(kind, time.time())
                if kind == "rollout":
                    rec.detail = str(h.kill_component(job.pid, "RolloutWorker", "rollout"))
                elif kind == "reward":
                    rec.detail = str(h.kill_component(job.pid, "RewardWorker", "score_and_push", 10))
                elif kind == "judge":
                    rec.detail = str(h.kill_component(job.pid, "JudgeEngineActor"))
                elif kind == "learner":
                    rec.detail = str(h.kill_component(job.pid, "LearnerWorker", "train_from_buffer", 10))
                elif kind == "redis":
                    driver = job.pid
                    rec.detail = str(h.kill(h.wait_for(lambda d=driver: h.find_redis(d), 60, "redis")))
                elif kind == "driver":
                    os.kill(job.pid, signal.SIGKILL)
                    job.wait(30)
                elif kind == "publish":
                    def failures() -> int:
                        return log.read_text(errors="replace").count("weight publish failed")
                    fifo, running, before = h.hang_next_publish(run_dir), job, failures()
                    h.wait_for(lambda j=running, b=before: failures() > b or j.poll() is not None, 300,
                               "the publish timeout")
                    fifo.unlink(missing_ok=True)
                while h.steps_done(run_dir) <= n:  # recovered: a step trained after the fault
                    if job.poll() is not None:
                        assert job.returncode in (3, -9), f"job failed:\n{log.read_text()[-3000:]}"
                        job = start_job(config, log)
                    time.sleep(0.5)
                rec.recovered_at = time.time()
                records.append(rec)
                print(f"[soak] {kind}: recovered in {rec.recovered_s:.1f} s", flush=True)
                next_fault = time.time() + args.every
            time.sleep(2)
        # finish the job: set its steps to what was reached is not possible mid-run; let it run to the end
        print("[soak] fault window over; letting the job finish", flush=True)
        while job.poll() is None or job.returncode in (3, -9):
            if job.poll() is not None:
                job = start_job(config, log)
            time.sleep(2)
            samples.append({"t": time.time(), "step": h.steps_done(run_dir), **rss_sample(job.pid)})
        assert job.returncode == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    led = h.build_ledger(run_dir, config)
    h.print_table(records, led, work / "soak_table.txt")
    growth = {}
    for key in {k for s in samples for k in s} - {"t", "step"}:
        series = [s[key] for s in samples if key in s]
        if len(series) >= 4:
            q = len(series) // 4
            growth[key] = {"first_quarter_mib": max(series[:q]), "last_quarter_mib": max(series[-q:])}
    print(f"\n{'component':<18} {'RSS max, first quarter':>23} {'RSS max, last quarter':>22}  (MiB)")
    for key, g in sorted(growth.items()):
        print(f"{key:<18} {g['first_quarter_mib']:>23.0f} {g['last_quarter_mib']:>22.0f}")
    # "does not grow without bound": the last quarter may not exceed the first by more than noise
    # (allocator caches, a restarted actor's warm-up): 30 % + 100 MiB
    grown = {k: g for k, g in growth.items() if g["last_quarter_mib"] > 1.3 * g["first_quarter_mib"] + 100}
    (work / "soak.json").write_text(json.dumps({
        "faults": [r.__dict__ | {"recovered_s": r.recovered_s} for r in records], "rss": samples, "growth": growth,
        "ledger": led.summary()}, indent=1))
    h.assert_ledger(led)
    assert not grown, f"RSS grew: {grown}"
    print(f"[soak] ok; work folder {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
