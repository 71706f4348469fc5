"""learner.transport gloo in the job's own parts (Ray): the learner group publishes, Components hands the
announcement to the rollout workers, each joins a fresh group. A worker killed and restarted by Ray joins a
group of its own and receives the current version; a publish whose group never fills (a receiver that never
joins) times out within learner.publish_timeout_s and the version goes through object_store instead."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from actors.config import RolloutConfig
from actors.worker import rollout_worker_actor
from cluster.components import Components
from learner.actor import LearnerGroup
from learner.config import LearnerConfig
from policy.config import TinyModelConfig
from policy.tiny import build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.isolated]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_media_ray")
    model_dir = build_tiny_model(TinyModelConfig(kind="text"), root / "text")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    try:
        yield dict(root=root, model_dir=str(model_dir))
    finally:
        ray.shutdown()


@ray.remote(max_concurrency=2)
class NeverJoins:
    """A receiver that takes the announcement and never joins the group (a hung worker)."""

    def load_weights(self, weights: dict) -> float:
        if weights["medium"] == "gloo":
            time.sleep(40)
        return 0.0


def test_broadcast_reaches_a_restarted_worker_and_falls_back_when_a_receiver_never_joins(cluster):
    group = LearnerGroup(LearnerConfig(transport="gloo", zero_stage=0, publish_timeout_s=10.0), cluster["model_dir"],
                         total_steps=4, publish_dir=cluster["root"] / "published", num_cpus_per_rank=0)
    worker = rollout_worker_actor(num_cpus=0, max_restarts=1).remote(
        "w0", cluster["model_dir"], RolloutConfig(group_size=1, max_new_tokens=4, max_model_len=512), None,
        "float32", 0, None, "gloo")
    comps = Components(buffer=None, learner=group, workers=[worker], transport="gloo")
    try:
        assert ray.get(worker.version.remote(), timeout=300) == 0  # its engine is up (a job's workers are, too)
        assert comps.publish_weights(wait=False) == 1  # a broadcast reaches the workers now, whatever wait says
        assert comps.weights["medium"] == "gloo" and ray.get(worker.version.remote(), timeout=60) == 1
        assert comps.publish_weights() == 2 and ray.get(worker.version.remote()) == 2

        # killed: Ray restarts it with the base weights; it joins a group of its own for the current version
        os.kill(ray.get(worker.pid.remote()), signal.SIGKILL)
        comps.ready_worker(worker)
        assert ray.get(worker.version.remote()) == 2 and comps.weights["medium"] == "gloo"

        # a receiver that never joins: the group times out, the version goes through the object store
        comps.workers = [worker, NeverJoins.remote()]
        started = time.monotonic()
        assert comps.publish_weights() == 3
        assert comps.weights["medium"] == "object_store" and "blob" in comps.weights
        assert ray.get(worker.version.remote()) == 3
        assert time.monotonic() - started < 60  # bounded by publish_timeout_s (+ the receivers' own bound)

        comps.workers = [worker]  # the next publish is a broadcast again
        assert comps.publish_weights() == 4 and comps.weights["medium"] == "gloo"
        assert ray.get(worker.version.remote()) == 4
    finally:
        ray.get(worker.shutdown.remote(), timeout=60)
        group.shutdown()
