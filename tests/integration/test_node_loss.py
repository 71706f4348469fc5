"""Losing a node: a real job (`python -m cluster.cli train`, tiny Omni model, vLLM-CPU, DeepSpeed, its own
redis-server) attached to a local cluster of three Ray nodes on 127.0.0.1: the head holds the learner, the reward
worker, the replay service and the driver's node; two nodes advertise rollout_node, one rollout worker each. One
rollout node's raylet and every process of it are SIGKILLed by PID mid-run (cluster.local_cluster.kill_node).

- the job goes on: the surviving worker takes the dead worker's tasks, steps are recorded while it is away;
- the node is started again (add_node: a new node with the same resources): Ray places the worker's bundle on it
  and restarts the worker there; the driver notices it answers and hands it tasks (history shows it on the new
  node with completions). The driver is paused (SIGSTOP) during the restart only so that the short job cannot
  end before it;
- the id ledger of tests/faults: every task trained once, 0 lost, 0 duplicated;
- with no rollout node left the job waits pipeline.worker_wait_s and then stops with exit 3 naming the worker.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from cluster.local_cluster import add_node, kill_node, local_cluster
from tests.e2e.conftest import start_job, write_config
from tests.faults import harness as h

pytestmark = [pytest.mark.integration, pytest.mark.isolated, pytest.mark.long]

HEAD = "head:learner_node=1,reward_node=1,cpus=1"
PLACEMENT = {"rollout": {"num_cpus": 1, "resources": {"rollout_node": 1}},
             "learner": {"num_cpus": 1, "resources": {"learner_node": 1}},
             "reward": {"resources": {"reward_node": 1}}}


def _config(tmp_path, name: str, **settings):
    return write_config(tmp_path, name, **{
        "rollout.num_workers": 2, "reward.num_workers": 1, "placement": PLACEMENT,
        "pipeline.max_staleness": 1, "pipeline.checkpoint_every": 4,
        "buffer.capacity": 100_000,  # no eviction: the ledger finds every trained group in the tiers
        **settings})


def _start(config, log, cluster, **env):
    return start_job(config, log, env={**cluster.client_env(), **env})


def _log_has(log, text: str) -> bool:
    return text in log.read_text(errors="replace")


def _worker_on(rows: list[dict], node_id: str) -> str | None:
    """The rollout worker that the latest history row shows on node `node_id`."""
    for row in reversed(rows):
        for wid, seen in row.get("rollout_workers", {}).items():
            if seen["node"] == node_id:
                return wid
    return None


def _idle_worker_on(node: dict) -> bool:
    """A rollout worker has started on `node` and finished its __init__ (its process title is then
    `ray::RolloutWorker`, `ray::RolloutWorker.__init__` before)."""
    for entry in node["pids"]:
        try:
            raylet = psutil.Process(entry["pid"])
            if "raylet" not in raylet.name():
                continue
            return any(" ".join(c.cmdline()).strip() == "ray::RolloutWorker" for c in raylet.children())
        except psutil.Error:
            continue
    return False


def _leftovers(*names: str) -> list[str]:
    """Processes whose command line names any of `names` (the run folder, the cluster's GCS address: the head's
    Ray client server names only that)."""
    return [" ".join(p.info["cmdline"] or [])[:120] for p in psutil.process_iter(["cmdline"])
            if any(n in " ".join(p.info["cmdline"] or []) for n in names)]


def test_a_rollout_node_dies_and_joins_again(tmp_path):
    steps = 40
    config = _config(tmp_path, "nodeloss", **{"pipeline.steps": steps})
    run_dir = tmp_path / "runs" / "nodeloss"
    log = tmp_path / "nodeloss.log"
    folder = tmp_path / "cluster"
    times: dict[str, float] = {}
    t_start = time.monotonic()
    with local_cluster(folder, [HEAD, "rolla:rollout_node=1,cpus=1", "rollb:rollout_node=1,cpus=1"]) as cluster:
        job = _start(config, log, cluster)
        try:
            # rollb's worker has generated: kill rollb (raylet, agents, the worker and its vLLM engine) by PID
            victim = h.wait_for(lambda: job.poll() is None and h.steps_done(run_dir) >= 2
                                and _worker_on(h.history(run_dir), cluster.node_id("rollb")), 400,
                                "two steps and rollb's worker in the history")
            survivor = ({"rollout-0", "rollout-1"} - {victim}).pop()
            killed_at_step = h.steps_done(run_dir)
            pids = kill_node(folder, "rollb")
            t_kill = time.monotonic()
            assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
            h.wait_for(lambda: _log_has(log, f"{victim} is gone") or job.poll() is not None, 120,
                       f"the driver noticing {victim} is gone")
            times["detected"] = time.monotonic() - t_kill

            # the job goes on with rolla's worker alone
            def away_rows():
                return [r for r in h.history(run_dir) if r.get("rollout_workers_away") == [victim]]
            h.wait_for(lambda: len(away_rows()) >= 3 or job.poll() is not None, 120, f"three steps without {victim}")
            away = away_rows()
            assert len(away) >= 3, f"{len(away)} steps recorded while {victim} was away:\n{log.read_text()[-4000:]}"
            done = [r["rollout_workers"][survivor]["completions"] for r in away]
            assert done[-1] > done[0], f"{survivor} generated nothing while {victim} was away: {done}"

            # rollb joins again: a new node with the same resources; Ray places the worker's bundle there and
            # restarts the worker (a new vLLM engine), without the driver. The driver is paused (SIGSTOP) only
            # meanwhile, so that this short job cannot end first (the restart took 30-45 s here, 70 steps on
            # a quiet machine); resumed, it must notice the worker answers and hand it tasks.
            os.kill(job.pid, signal.SIGSTOP)
            try:
                published = h.history(run_dir)[-1]["policy_version"]  # the driver hands these on, at least
                t_join = time.monotonic()
                node = add_node(folder, "rollb:rollout_node=1,cpus=1")
                assert node["node_id"] != cluster.node_id("rollb")
                h.wait_for(lambda: _idle_worker_on(node), 240, f"{victim} restarted on the new node")
                times["worker_restarted_after_join"] = time.monotonic() - t_join
            finally:
                os.kill(job.pid, signal.SIGCONT)
            t_resume = time.monotonic()

            def back_on_new_node():
                for r in h.history(run_dir):
                    seen = r.get("rollout_workers", {}).get(victim)
                    if seen and seen["node"] == node["node_id"] and seen["completions"] > 0:
                        return r
                return None
            row = h.wait_for(lambda: back_on_new_node() or job.poll() is not None, 120,
                             f"{victim} generating on the new node")
            assert isinstance(row, dict), f"job ended first:\n{log.read_text()[-4000:]}"
            times["generating_after_resume"] = time.monotonic() - t_resume
            assert row["step"] < steps and row["rollout_workers_away"] == []
            # it came back with the base weights (v0) and loaded the published ones with its first call
            assert row["rollout_workers"][victim]["version"] >= published > 0, (published, row["rollout_workers"])
            assert _log_has(log, f"{victim} answers again")
            assert h.finish(job, log, 400) == 0, log.read_text()[-4000:]
            # Prometheus finds the worker where it came back: the target file lists it on the new node
            targets = {t["labels"]["component"]: t["labels"]["node"]
                       for t in json.loads((run_dir / "prometheus_targets.json").read_text())}
            assert targets[victim] == node["node_id"], targets
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    times["total"] = time.monotonic() - t_start

    assert pids and killed_at_step < steps
    assert _log_has(log, f"{victim} died on") and _log_has(log, "resubmitting")  # a call was in flight
    led = h.build_ledger(run_dir, config)
    rec = h.FaultRecord("rollout node killed (raylet + its workers)", 0.0, times["worker_restarted_after_join"],
                        detail=", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    h.print_table([rec], led, tmp_path / "node_loss.txt")
    h.assert_ledger(led)
    # the job never resumed: no stream entry may have reached the learner twice (the driver sits paused for up
    # to a minute or more above, longer than buffer.reclaim_idle_ms once: the learner got its own trained entries
    # back, dropped them as stale, and the ledger found those tasks trained and dropped)
    assert led.reclaimed == 0, led.summary()
    assert not _leftovers(str(tmp_path / "runs"), cluster.address)


def test_with_no_rollout_node_left_the_job_stops_after_worker_wait_s(tmp_path):
    config = _config(tmp_path, "noworker", **{"pipeline.steps": 30, "rollout.num_workers": 1,
                                              "pipeline.worker_wait_s": 15})
    run_dir = tmp_path / "runs" / "noworker"
    log = tmp_path / "noworker.log"
    folder = tmp_path / "cluster"
    with local_cluster(folder, [HEAD, "rolla:rollout_node=1,cpus=1"]) as cluster:
        job = _start(config, log, cluster)
        try:
            h.wait_for(lambda: h.steps_done(run_dir) >= 1 or job.poll() is not None, 400, "the first step")
            assert job.poll() is None, log.read_text()[-4000:]
            kill_node(folder, "rolla")
            t_kill = time.monotonic()
            rc = h.finish(job, log, 240)
            stopped_after = time.monotonic() - t_kill
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert rc == 3, text[-4000:]  # JobInterrupted: resumable from the last checkpoint
    assert "no rollout worker answered for" in text and "rollout-0 (away" in text, text[-4000:]
    assert "waiting for rollout-0" in text or "waiting for one" in text
    assert h.steps_done(run_dir) < 30
    assert stopped_after >= 15, f"stopped {stopped_after:.1f} s after the kill, before worker_wait_s"
    print(f"\nno rollout node left: the job stopped {stopped_after:.1f} s after the kill (worker_wait_s 15)")
    assert not _leftovers(str(tmp_path / "runs"), cluster.address)
