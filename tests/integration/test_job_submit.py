"""`ray job submit` of the demo curriculum (stage-0 SFT, then the RL stage) to a local cluster of two Ray nodes
that runs as a production cluster would: Ray's token authentication on (a token made for the cluster, in its
folder), the replay service on an external, password-protected redis-server given by URL (the password through the
job's runtime env), the roles placed on their nodes by the configs' placement sections. The real `ray` CLI submits
from a subprocess; a client without the token is refused; afterwards nothing of the cluster is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.local_cluster import RECORD, SHM_PREFIXES, _shm_in_use, local_cluster
from tests.cluster_processes import cluster_processes, still_running

pytestmark = [pytest.mark.integration, pytest.mark.isolated, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
NODES = ["head:learner_node=1,cpus=1", "rollout:rollout_node=1,reward_node=1,cpus=1"]
STAGES = ["configs/demo_stage0_two_nodes.yaml", "configs/demo_two_nodes.yaml"]
# short on purpose: the test checks that the curriculum runs on the cluster, not that it learns
SHORT = ["pipeline.steps=2", "pipeline.eval_items=2", "data.synth.num_items=8"]
ROLE_NODE = {"LearnerWorker": "head", "RolloutWorker": "rollout", "RewardWorker": "rollout"}


def ray_cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_job_submit_runs_the_demo_curriculum_on_two_nodes_with_token_auth_and_external_redis(tmp_path, redis_server):
    from ray.util.state import list_actors

    user_token = Path.home() / ".ray" / "auth_token"
    user_token_before = user_token.read_bytes() if user_token.is_file() else None
    shm_before = set(os.listdir("/dev/shm"))
    folder, runs = tmp_path / "cluster", tmp_path / "runs"
    started = time.monotonic()
    with local_cluster(folder, NODES, dashboard=True, auth="token") as cluster:
        token = Path(cluster.token_path)
        assert token.parent == folder.resolve() and token.stat().st_mode & 0o777 == 0o600
        assert len(token.read_text()) == 64
        env = {**os.environ, **cluster.client_env(), "PYTHONUNBUFFERED": "1"}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)

        # a client without the cluster's token is refused, by the job server and by the GCS
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        refused = ray_cli(["job", "list", "--address", cluster.dashboard_url],
                          {**no_token, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0 and "Missing authentication token" in refused.stderr, refused.stderr[-2000:]
        wrong = ray_cli(["job", "list", "--address", cluster.dashboard_url], {**no_token, "RAY_AUTH_TOKEN": "0" * 64})
        assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stderr, wrong.stderr[-2000:]
        gcs = ray_cli(["status", "--address", cluster.address], {**no_token, "RAY_AUTH_MODE": "disabled"})
        assert gcs.returncode != 0 and "InvalidAuthToken" in gcs.stderr, gcs.stderr[-2000:]

        runtime_env = {"env_vars": {"AVATAR_REDIS_PASSWORD": redis_server.password, "PYTHONUNBUFFERED": "1"}}
        submit = ray_cli(["job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
                          "--runtime-env-json", json.dumps(runtime_env), "--",
                          sys.executable, "-m", "cluster.cli", "demo", *STAGES, f"run_dir={runs}",
                          f"buffer.redis.url={redis_server.url}", *SHORT], env, timeout=900)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in log, log[-6000:]
        assert redis_server.password not in submit.stdout  # the driver logs the Redis URL without it

        actors = list_actors(address=cluster.dashboard_url, detail=True, limit=1000, raise_on_missing_output=False)
        processes = cluster_processes(folder)
    took = time.monotonic() - started

    # both stages ran, on the cluster: stage 0 trained its SFT steps, the RL stage generated and trained
    sft, rl = runs / "demo_stage0_two_nodes", runs / "demo_two_nodes"
    sft_rows = [json.loads(line) for line in (sft / "history.jsonl").read_text().splitlines()]
    rl_rows = [json.loads(line) for line in (rl / "history.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["step"]) for r in sft_rows] == [("sft", 1), ("sft", 2)]
    assert [r["step"] for r in rl_rows] == [1, 2]
    sft_summary, rl_summary = (json.loads((d / "summary.json").read_text()) for d in (sft, rl))
    assert sft_summary["stage"] == 0 and sft_summary["steps"] == 2
    assert rl_summary["stage"] == 2 and rl_summary["steps"] == 2 and rl_summary["completions_generated"] > 0
    assert f"init_from: {sft_summary['export']}" in (rl / "config.yaml").read_text()  # RL started from the SFT
    assert f"stage 2: 2 steps, {rl_summary['completions_generated']} completions generated" in log
    # the replay service used the external Redis, not a private one in the run folder
    assert not (sft / "redis").exists() and not (rl / "redis").exists()
    assert any(redis_server.client().scan_iter("avatar:*", count=1000))

    # every actor of the job ran on the node that advertises its role's resource, in both stages
    node_name = {n["node_id"]: n["name"] for n in cluster.nodes}
    placed = [(a["class_name"], node_name[a["node_id"]]) for a in actors if a["class_name"] in ROLE_NODE]
    assert sorted({c for c, _ in placed}) == sorted(ROLE_NODE), placed
    assert all(node == ROLE_NODE[c] for c, node in placed), placed
    assert sum(c == "LearnerWorker" for c, _ in placed) == 2  # one per stage

    # stopped by PID: none of the cluster's processes is left, nor its token, and no new shared-memory segment
    # remains that no live process uses (other tests of the machine may hold theirs)
    assert len(processes) >= 10
    assert [pid for pid, t in processes if still_running(pid, t)] == []
    assert not token.exists() and not (folder / RECORD).exists()
    assert not [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                if cluster.nodes[0]["temp_dir"].rsplit("/", 1)[0] in " ".join(p.info["cmdline"] or [])
                or f"--address={cluster.address}" in " ".join(p.info["cmdline"] or [])]
    left = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith(SHM_PREFIXES)} - _shm_in_use()
    assert not left, left
    assert (user_token.read_bytes() if user_token.is_file() else None) == user_token_before  # ~/.ray untouched
    assert took < 600, f"cluster up, job and cluster down took {took:.0f} s"
