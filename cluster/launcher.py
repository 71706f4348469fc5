"""Where the job runs: embedded (a private Ray on 127.0.0.1 and a private redis-server in the run folder)
or attached to a cluster (an existing Ray via RAY_ADDRESS / `ray job submit`, an existing Redis by URL).
Everything started here is stopped here, in reverse order, by PID."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from buffer_service.config import RedisConfig
from buffer_service.redis_server import LocalRedis, start_redis


@dataclass
class Launch:
    redis: RedisConfig
    embedded: bool
    local_redis: LocalRedis | None = None
    started_ray: bool = False
    notes: list[str] = field(default_factory=list)


def _on_cluster() -> bool:
    # `ray job submit` sets RAY_ADDRESS for the entrypoint; an explicit address means a cluster too.
    return bool(os.environ.get("RAY_ADDRESS"))


def _previous_password(folder: Path) -> str | None:
    conf = folder / "redis.conf"
    if not conf.is_file():
        return None
    for line in conf.read_text().splitlines():
        if line.startswith("requirepass "):
            return line.split(" ", 1)[1].strip()
    return None


def start(run_dir: Path, redis_cfg: RedisConfig, num_cpus: int | None = None) -> Launch:
    import ray

    embedded = not _on_cluster()
    local = None
    if redis_cfg.url is None:
        # The embedded default: a private redis-server whose AOF lives in the run folder, so a resumed job
        # finds its buffer again. Same port and password on resume: they are kept in the run folder.
        local = start_redis(run_dir / "redis", password=_previous_password(run_dir / "redis"))
        redis_cfg = local.config(key_prefix=redis_cfg.key_prefix)
    if not ray.is_initialized():
        if embedded:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # vLLM-CPU repeats a harmless thread-binding warning on every call; Ray workers inherit this.
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                     log_to_driver=True, configure_logging=False)
        else:
            ray.init(address="auto")
        started = True
    else:
        started = False
    return Launch(redis=redis_cfg, embedded=embedded, local_redis=local, started_ray=started)


def stop(launch: Launch) -> None:
    import ray

    if launch.started_ray and ray.is_initialized():
        ray.shutdown()
    if launch.local_redis is not None:
        launch.local_redis.stop()
    # vLLM-CPU and DeepSpeed leave shared-memory segments behind when a process dies abruptly.
    for leftover in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.remove(leftover)
        except OSError:
            pass
