"""The embedded launch (what `make run` starts): a private Ray that registers, and listens, on 127.0.0.1 only.
Ray 2.60 replaces 127.0.0.1 by the machine's outward address unless its cluster mode is off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when ray is imported): the launcher turns it off."""

from __future__ import annotations

import psutil
import pytest
import ray
from ray._private import ray_constants

from buffer_service.config import RedisConfig
from cluster import launcher
from cluster.local_cluster import LOOPBACK_ENV

# isolated: it starts and stops a Ray of its own in this pytest process
pytestmark = [pytest.mark.integration, pytest.mark.isolated]


def test_the_embedded_ray_is_on_loopback_only(tmp_path, monkeypatch):
    for key in LOOPBACK_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # as a plain `import ray` leaves it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "run").mkdir()
    launch = launcher.start(tmp_path / "run", RedisConfig(), num_cpus=1, with_redis=False)
    try:
        assert launch.embedded and launch.started_ray
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        # this Ray's processes are this process's children (other Rays on the machine are not looked at)
        ray_pids = {p.pid for p in psutil.Process().children(recursive=True)}
        listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.pid in ray_pids}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    finally:
        launcher.stop(launch)
    assert not ray.is_initialized()



def test_on_a_cluster_the_next_start_stops_a_dead_drivers_redis_server(tmp_path, monkeypatch):
    """A driver attached to a cluster dies abruptly when the head dies (Ray ends it once the GCS stays
    unreachable, about 60 s): its redis-server lives on, on the run folder's AOF. The next start on a cluster
    stops it by its recorded PID before starting its own, as an embedded start does."""
    import json
    import subprocess
    import sys

    from buffer_service.redis_server import start_redis
    from cluster.local_cluster import local_cluster

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    orphan = start_redis(run_dir / "redis", appendfsync="always")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / "launch.json").write_text(json.dumps({"driver_pid": int(dead.stdout), "redis_pid": orphan.pid,
                                                     "ray_temp_dir": None}))
    try:
        with local_cluster(tmp_path / "cluster", ["head:cpus=1"]) as cluster:
            for key, value in cluster.client_env().items():
                monkeypatch.setenv(key, value)
            launch = launcher.start(run_dir, RedisConfig())
            try:
                assert not launch.embedded and launch.local_redis is not None
                assert orphan.process.poll() is not None  # ended (SIGKILL) by the start
                assert json.loads((run_dir / "launch.json").read_text())["redis_pid"] == launch.local_redis.pid
            finally:
                launcher.stop(launch)
            assert not (run_dir / "launch.json").exists()
    finally:
        orphan.stop()
