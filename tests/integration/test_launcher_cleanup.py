"""The launcher starts the embedded redis-server before Ray: when Ray does not start, the job ends there and
must not leave that redis-server running (it did: a Ray start that timed out under load left one per try)."""

from __future__ import annotations

import psutil
import pytest
import ray

from buffer_service.config import RedisConfig
from cluster import launcher

pytestmark = pytest.mark.integration


def test_a_ray_start_that_fails_stops_the_redis_server_it_started(tmp_path, monkeypatch):
    started = []
    real_start_redis = launcher.start_redis

    def recording_start_redis(*args, **kwargs):
        started.append(real_start_redis(*args, **kwargs))
        return started[-1]

    def failing_ray_init(*args, **kwargs):  # a failpoint: Ray's raylet did not come up in time
        raise TimeoutError("raylet did not start within 30 s")

    monkeypatch.setattr(launcher, "start_redis", recording_start_redis)
    monkeypatch.setattr(ray, "init", failing_ray_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(TimeoutError, match="raylet"):
        launcher.start(tmp_path / "run", RedisConfig())
    assert len(started) == 1 and not ray.is_initialized()
    assert not psutil.pid_exists(started[0].pid) or psutil.Process(started[0].pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "run" / "launch.json").exists()
