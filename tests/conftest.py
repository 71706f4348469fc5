"""Shared fixtures. Redis: a private redis-server per test (127.0.0.1, random port, password, AOF with
appendfsync always, files under tmp_path), stopped by PID and its files removed afterwards."""

from __future__ import annotations

import shutil

import pytest

from buffer_service.config import BufferConfig
from buffer_service.records import Trajectory
from buffer_service.redis_server import start_redis
from buffer_service.service import ReplayService
from cluster.local_cluster import keep_ray_on_loopback

keep_ray_on_loopback()  # every Ray the tests start registers and listens on 127.0.0.1 only


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (and counted as skipped) on machines without one."""
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:  # a missing service is a failure, never a skip
        pytest.fail("redis-server is not installed (make setup, scripts/setup.sh, installs it)")
    folder = tmp_path / "redis"
    server = start_redis(folder, appendfsync="always")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_service(redis_server):
    """make_service(**buffer_overrides) -> ReplayService on the test's Redis (min_size 0 unless given)."""

    def make(**overrides) -> ReplayService:
        overrides.setdefault("min_size", 0)
        overrides.setdefault("redis", redis_server.config())
        return ReplayService(BufferConfig(**overrides))

    return make


def make_traj(tid: str, prompt_id: str, reward: float = 0.0, group_id: str | None = None, **kw) -> Trajectory:
    """A small valid trajectory (3 completion tokens)."""
    kw.setdefault("completion_token_ids", [5, 6, 7])
    kw.setdefault("behaviour_logprobs", [-0.5, -0.25, -1.0])
    return Trajectory(
        trajectory_id=tid,
        group_id=group_id or f"{prompt_id}/g",
        prompt_id=prompt_id,
        prompt_token_ids=kw.pop("prompt_token_ids", [1, 2]),
        policy_version=kw.pop("policy_version", 0),
        reward=reward,
        **kw,
    )


@pytest.fixture
def traj():
    return make_traj
