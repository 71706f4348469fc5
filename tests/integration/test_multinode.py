"""A job's components on a local cluster of two Ray nodes (cluster.local_cluster, both on 127.0.0.1): the head
advertises learner_node, reward_node and judge_node, the second node rollout_node. With a `placement` section
asking for those resources, start_components puts every actor on the node that has its resource (asked inside
each actor with ray.get_runtime_context().get_node_id()); one task then goes through the data plane across the
two nodes (rollout worker -> reward worker -> Redis -> learner step -> weights back to the worker). A real
Prometheus scrapes every component's own /metrics endpoint on its node, found through the job's target file.
Stopping the cluster by PID leaves none of its processes."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import ray

from actors.tasks import PromptTask
from cluster.components import start_components
from cluster.config import load_config
from cluster.local_cluster import RECORD, local_cluster
from cluster.metrics import MetricsTargets, write_scrape_config
from cluster.placement import reserve
from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from learner.distributed import free_port
from policy.config import TinyModelConfig
from policy.tiny import build_tiny_model
from tests.cluster_processes import cluster_processes, still_running

pytestmark = [pytest.mark.integration, pytest.mark.isolated]

NODES = ["head:learner_node=1,reward_node=1,judge_node=1,cpus=1", "rollout:rollout_node=1,cpus=1"]
PLACEMENT = [
    "placement.rollout={num_cpus: 1, resources: {rollout_node: 1}}",
    "placement.learner={num_cpus: 1, resources: {learner_node: 1}}",
    "placement.reward.resources={reward_node: 1}",
    "placement.judge.resources={judge_node: 1}",
]
ROLE_RESOURCE = {"rollout": "rollout_node", "learner": "learner_node", "reward": "reward_node",
                 "judge": "judge_node"}


def node_of(actor) -> str:
    """The id of the node the actor runs on, as the actor itself sees it."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=300)


def listening_addresses(processes: list[tuple[int, float]]) -> dict[str, set[str]]:
    """The addresses the processes listen on, each with the names of the processes listening there."""
    found: dict[str, set[str]] = {}
    for pid, _ in processes:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="inet"):
                if c.status == "LISTEN":
                    found.setdefault(c.laddr.ip, set()).add(f"{proc.name()}:{c.laddr.port}")
        except psutil.Error:  # ended meanwhile
            pass
    return found


def prometheus_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def scrape(run_dir, tmp_path, queries: list[str], timeout_s: float = 90) -> dict[str, list]:
    """Start Prometheus on the job's scrape config and wait until every query has results; returns them."""
    port = free_port()
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={run_dir / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found: dict[str, list] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(found) < len(queries) and time.monotonic() < deadline:
            time.sleep(2)
            for q in queries:
                try:
                    if q not in found and (result := prometheus_query(port, q)):
                        found[q] = result
                except OSError:  # not up yet
                    pass
    finally:
        prometheus.terminate()
        prometheus.wait(10)
    return found


def test_each_role_lands_on_the_node_that_has_its_resource(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    model_dir = build_tiny_model(TinyModelConfig(kind="omni"), tmp_path / "omni")
    samples, _ = load_manifest(generate(SynthConfig(num_items=2, stage=2, seconds=2.0, size=64), tmp_path / "data"))
    cfg = load_config(None, [
        "name=multinode", f"run_dir={tmp_path}", "stage=3", "seed=0",
        # the judge: the tiny text model on the transformers engine (one vLLM engine in this test is enough)
        "reward.judge.allow_tiny=true", "reward.judge.engine=hf", "reward.judge.num_frames=0",
        "reward.judge.max_model_len=1024", "reward.num_workers=1",
        "rollout.num_workers=1", "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.max_model_len=1024",
        "processor.max_frames=4", f"processor.max_pixels={56 * 56}", "processor.max_audio_seconds=4.0",
        "learner.num_ranks=1", "buffer.min_size=0", "pipeline.steps=1",
        *PLACEMENT,
    ])
    run_dir = tmp_path / "multinode"
    run_dir.mkdir()
    folder = tmp_path / "cluster"
    with local_cluster(folder, NODES) as cluster:
        assert cluster.address.startswith("127.0.0.1:")
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            assert sorted(resources) == sorted(n["node_id"] for n in cluster.nodes)
            assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"] * 2
            # a role asking for a resource no node has is refused at once, not after placement.timeout_s
            with pytest.raises(RuntimeError, match="no node of the cluster can hold"):
                reserve(load_config(None, ["placement.rollout.resources={gpu_box: 1}"]), needs_judge=False)
            comps = start_components(cfg, run_dir, model_dir, samples, redis_server.config(), rl=True)
            try:
                # The model, the judge's model and the media were made on the driver's node: shipped through the
                # object store. Take the originals away, so that a component reading a path of the driver's node
                # instead of its own node's copy fails (no hidden shared path).
                shipped = sorted(Path(f.origin).name for f in comps.paths.folders)
                [judge_model] = [p.name for p in (tmp_path / "_models").iterdir()]
                for made_here in (model_dir, tmp_path / "data", tmp_path / "_models"):
                    made_here.rename(made_here.with_name(made_here.name + "-gone"))
                landed = {"rollout": node_of(comps.workers[0]), "learner": node_of(comps.learner.workers[0]),
                          "reward": node_of(comps.rewards.workers[0]), "judge": node_of(comps.judge_engine)}
                buffer_node = node_of(comps.buffer)
                # one task across the nodes: generated on the rollout node, scored on the head, trained on the head,
                # the new weights loaded back on the rollout node
                report = ray.get(comps.workers[0].rollout.remote([PromptTask(f"{samples[0].id}#0", samples[0])],
                                                                  comps.rewards.workers), timeout=300)
                summary = comps.learner.train_from_buffer(1, 0, 0, block_ms=10_000)
                version = comps.publish_weights()
                worker_version = ray.get(comps.workers[0].version.remote(), timeout=60)
                # every component serves its own /metrics on its node; the target file lists them all
                comps.metrics = MetricsTargets(run_dir, "multinode")
                comps.refresh_metrics_targets()
                write_scrape_config(run_dir)
                targets = json.loads(comps.metrics.path.read_text())
                scraped = scrape(run_dir, tmp_path, ['up{role="rollout"} == 1', 'up{role="reward"} == 1',
                                                     'up{role="learner"} == 1', 'up{role="replay"} == 1',
                                                     "avatar_completions_total", "avatar_learner_steps_total",
                                                     "avatar_groups_scored_total", "avatar_buffer_tier_size"])
                processes = cluster_processes(folder)
                listening = listening_addresses(processes)
            finally:
                comps.stop()
            copies_left = list(Path(tempfile.gettempdir()).glob("avatar-files-*"))  # each node's copies removed
        finally:
            ray.shutdown()

    for role, node_id in landed.items():
        assert ROLE_RESOURCE[role] in resources[node_id], f"{role} landed on {node_id}: {resources[node_id]}"
    assert landed["rollout"] == cluster.node_id("rollout")
    assert landed["learner"] == landed["reward"] == landed["judge"] == cluster.node_id("head")
    # the replay service asks for nothing: it is kept on the driver's node (this process's: the head), not left to
    # land on a rollout node whose loss would take the buffer with it
    assert buffer_node == cluster.node_id("head")

    assert shipped == sorted([model_dir.name, "media", judge_model]), shipped
    assert copies_left == []
    # Prometheus scraped each component where it runs: the completions from the rollout node, the learner's
    # steps, the scoring and the tiers from the head
    assert sorted(t["labels"]["component"] for t in targets) == ["learner", "replay", "reward-0", "rollout-0"]
    assert all(t["targets"][0].startswith("127.0.0.1:") for t in targets)
    nodes = {t["labels"]["component"]: t["labels"]["node"] for t in targets}
    assert nodes["rollout-0"] == cluster.node_id("rollout") and nodes["learner"] == cluster.node_id("head")
    for q in ('up{role="rollout"} == 1', 'up{role="reward"} == 1', 'up{role="learner"} == 1', 'up{role="replay"} == 1'):
        assert q in scraped, f"no target of {q} up: {sorted(scraped)}"
    [completions] = scraped["avatar_completions_total"]
    assert completions["metric"]["node"] == cluster.node_id("rollout") and float(completions["value"][1]) == 2
    [steps] = scraped["avatar_learner_steps_total"]
    assert steps["metric"]["node"] == cluster.node_id("head") and float(steps["value"][1]) == 1
    [scored] = scraped["avatar_groups_scored_total"]
    assert scored["metric"]["component"] == "reward-0" and float(scored["value"][1]) == 1
    assert {r["metric"]["tier"] for r in scraped["avatar_buffer_tier_size"]} == {"easy", "medium", "hard"}

    [receipt] = report.receipts
    assert receipt.lost is None and receipt.skipped is None and receipt.answer.accepted == 2
    assert summary["trained"] and summary["entry_ids"]
    assert version == worker_version == 1

    # Ray's processes and the actors listen on loopback only. The exception is not the cluster's: rank 0's
    # torch.distributed store (the learner's rendezvous, gloo) listens on all interfaces, with or without a
    # cluster; torch offers no bind address for it.
    wide = {ip: names for ip, names in listening.items() if ip not in ("127.0.0.1", "::ffff:127.0.0.1")}
    assert listening and all(n.startswith("ray::LearnerWorker:") for names in wide.values() for n in names), wide
    # stopped by PID: nothing of the cluster is left (raylets, GCS, agents, the actors' worker processes)
    assert len(processes) >= 6
    assert [pid for pid, started in processes if still_running(pid, started)] == []
    assert not (folder / RECORD).exists()
    assert not any(cluster.nodes[0]["temp_dir"].rsplit("/", 1)[0] in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))
