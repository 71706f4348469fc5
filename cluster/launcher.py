"""Where the job runs: embedded (a private Ray on 127.0.0.1 and a private redis-server in the run folder)
or attached to a cluster (an existing Ray via RAY_ADDRESS / `ray job submit`, an existing Redis by URL).
Everything started here is stopped here, in reverse order, by PID."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from buffer_service.config import RedisConfig
from buffer_service.redis_server import LocalRedis, start_redis

from .local_cluster import keep_ray_on_loopback, kill_all

log = logging.getLogger(__name__)


@dataclass
class Launch:
    redis: RedisConfig
    embedded: bool
    local_redis: LocalRedis | None = None
    started_ray: bool = False
    run_dir: Path | None = None


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


def _ray_temp_dir(run_dir: Path) -> str:
    # Short on purpose: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"avatar-ray-{digest}")


def _clean_after_crash(run_dir: Path) -> None:
    """A driver killed abruptly leaves its redis-server (and, embedded, its private Ray) running: stop them by
    PID (the recorded redis PID; Ray's processes by their session folder) before this run starts its own."""
    record = run_dir / "launch.json"
    if not record.is_file():
        return
    info = json.loads(record.read_text())
    if psutil.pid_exists(info.get("driver_pid", -1)) and info["driver_pid"] != os.getpid():
        try:
            if "cluster" in " ".join(psutil.Process(info["driver_pid"]).cmdline()):
                raise RuntimeError(f"{run_dir} is in use by a running driver (pid {info['driver_pid']})")
        except psutil.NoSuchProcess:
            pass
    victims = []
    temp = info.get("ray_temp_dir")
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if (temp and temp in cmd) or (proc.info["pid"] == info.get("redis_pid") and "redis-server" in cmd):
            victims.append(proc)
        elif temp and cmd.startswith("ray::"):
            # Ray's agents (DashboardAgent, RuntimeEnvAgent) rename themselves and no longer name the session
            # folder. Those that outlive a dead raylet still hold its log files open; the others are found below,
            # as children of a victim.
            try:
                if any(f.path.startswith(temp) for f in proc.open_files()):
                    victims.append(proc)
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                pass
    for proc in list(victims):
        try:
            victims += [c for c in proc.children(recursive=True) if c not in victims]
        except psutil.NoSuchProcess:
            pass
    kill_all(victims)
    if victims:
        log.info(f"stopped {len(victims)} processes left by a previous driver of {run_dir}")


def start(run_dir: Path, redis_cfg: RedisConfig, num_cpus: int | None = None, with_redis: bool = True) -> Launch:
    embedded = not _on_cluster()
    # A driver on a cluster dies abruptly too (its head died: Ray ends it once the GCS stays unreachable), leaving
    # its redis-server running on the run folder's AOF; embedded, its private Ray as well.
    _clean_after_crash(run_dir)
    local = None
    if redis_cfg.url is None and with_redis:
        # The embedded default: a private redis-server whose AOF lives in the run folder, so a resumed job
        # finds its buffer again. Same port and password on resume: they are kept in the run folder.
        # appendfsync always: a write Redis acknowledged survives a kill -9 of redis-server (with everysec the
        # last second could vanish, e.g. a pushed group the driver already counted as in the buffer).
        local = start_redis(run_dir / "redis", password=_previous_password(run_dir / "redis"), appendfsync="always")
        redis_cfg = local.config(key_prefix=redis_cfg.key_prefix)
    try:
        started = _start_ray(run_dir, embedded, num_cpus)
    except BaseException:
        if local is not None:  # Ray did not start: the job ends here, and so does the redis-server it started
            local.stop()
        raise
    (run_dir / "launch.json").write_text(json.dumps({
        "driver_pid": os.getpid(), "redis_pid": local.pid if local else None,
        "ray_temp_dir": _ray_temp_dir(run_dir) if started and embedded else None,
    }))
    return Launch(redis=redis_cfg, embedded=embedded, local_redis=local, started_ray=started, run_dir=run_dir)


def _start_ray(run_dir: Path, embedded: bool, num_cpus: int | None) -> bool:
    """ray.init unless Ray is up in this process already; True if this call started it."""
    import ray

    if not ray.is_initialized():
        if embedded:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            keep_ray_on_loopback()  # else Ray 2.60 registers, and listens on, the machine's outward address
            # vLLM-CPU repeats a harmless thread-binding warning on every call; Ray workers inherit this.
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                     _temp_dir=_ray_temp_dir(run_dir), log_to_driver=True, configure_logging=False)
        else:
            ray.init(address="auto")
        return True
    return False


def stop(launch: Launch) -> None:
    import ray

    if launch.started_ray and ray.is_initialized():
        ray.shutdown()
    if launch.local_redis is not None:
        launch.local_redis.stop()
    if launch.run_dir is not None:
        (launch.run_dir / "launch.json").unlink(missing_ok=True)
    # vLLM-CPU and DeepSpeed leave shared-memory segments behind when a process dies abruptly.
    for leftover in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.remove(leftover)
        except OSError:
            pass
