"""Redis for the replay service: a private redis-server for the embedded default, or a connection to an existing one.

start_redis(folder) starts redis-server on 127.0.0.1 at a free port with a generated password and AOF on, all its
files (config, AOF, dump) in `folder`; the password goes in a 0600 config file, not on the command line. The
returned LocalRedis has url, password, pid, stop() (SIGTERM by PID, then SIGKILL) and kill() (SIGKILL, for
crash tests). Starting again on the same folder, port and password replays the AOF.

connect(RedisConfig) opens a client to an existing Redis by URL, with password (config or the environment
variable AVATAR_REDIS_PASSWORD) and TLS options; it raises RedisAuthError with a clear message when the
password is refused, and refuses a Redis that accepts clients without a password unless the config says
throwaway_local.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from buffer_service.config import RedisConfig

PASSWORD_ENV = "AVATAR_REDIS_PASSWORD"


class RedisAuthError(RuntimeError):
    """Redis refused our credentials, or accepts anyone and the config does not allow that."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalRedis:
    """A redis-server this process started."""

    folder: Path
    port: int
    password: str
    process: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def config(self, **overrides) -> RedisConfig:
        return RedisConfig(url=self.url, password=self.password, **overrides)

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID (redis flushes the AOF and exits), SIGKILL if it does not exit in time."""
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL by PID: a crash, nothing flushed beyond what appendfsync already wrote."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)


def start_redis(
    folder: str | Path,
    *,
    port: int | None = None,
    password: str | None = None,
    appendfsync: str = "everysec",
    executable: str = "redis-server",
    timeout: float = 10.0,
) -> LocalRedis:
    """Start a private redis-server on 127.0.0.1 with AOF on, files in `folder`; wait until it answers PING."""
    binary = shutil.which(executable)
    if binary is None:
        raise FileNotFoundError(f"'{executable}' not found on PATH (Debian: apt-get install redis-server)")
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    # a letter first: a generated password that began with "-" (1 in 64) was read as an option by command lines
    # such as `buffer inspect --password ...` (found as a flaky CI failure)
    password = password or "p" + secrets.token_urlsafe(24)
    # A free port can be taken between probing and binding: retry a few times when no port was asked for.
    attempts = 1 if port is not None else 5
    last_error = ""
    for _ in range(attempts):
        chosen = port or _free_port()
        conf = folder / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {chosen}",
                    "protected-mode yes",
                    f"requirepass {password}",
                    f'dir "{folder}"',
                    "appendonly yes",
                    f"appendfsync {appendfsync}",
                    'save ""',
                    "daemonize no",
                    f'logfile "{folder / "redis.log"}"',
                    "",
                ]
            )
        )
        conf.chmod(0o600)
        process = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = LocalRedis(folder=folder, port=chosen, password=password, process=process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.alive():
            try:
                # Wait until the AOF is loaded too: PING answers LOADING errors while it replays.
                if server.client(socket_timeout=1).ping():
                    return server
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                time.sleep(0.02)
        server.kill()
        log = folder / "redis.log"
        last_error = log.read_text()[-2000:] if log.exists() else ""
    raise RuntimeError(f"redis-server did not start in {folder}:\n{last_error}")


def _client_from_config(cfg: RedisConfig, password: str | None) -> redis.Redis:
    kwargs: dict = {"socket_timeout": 30, "socket_connect_timeout": 10, "health_check_interval": 30}
    if password is not None:
        kwargs["password"] = password
    url = cfg.url
    if cfg.tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://") :]
    if url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = "required"
        if cfg.tls_ca_certs:
            kwargs["ssl_ca_certs"] = cfg.tls_ca_certs
    return redis.Redis.from_url(url, **kwargs)


def accepts_anonymous(client: redis.Redis) -> bool:
    """True when the server behind `client` answers a client that gives no password."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs.pop("password", None)
    kwargs.pop("username", None)
    kwargs.pop("credential_provider", None)
    probe = redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=client.connection_pool.connection_class, **kwargs
        )
    )
    try:
        return bool(probe.ping())
    except redis.AuthenticationError:
        return False
    except redis.ResponseError as exc:  # NOAUTH on older servers comes as a plain error
        if "NOAUTH" in str(exc) or "auth" in str(exc).lower():
            return False
        raise
    finally:
        probe.close()


def check_client(client: redis.Redis, throwaway_local: bool, where: str = "Redis") -> None:
    """PING with our credentials; then refuse a password-less server unless it is declared a throwaway."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        if client.connection_pool.connection_kwargs.get("password") is None:
            raise RedisAuthError(
                f"{where} requires a password and none was given; set buffer.redis.password or ${PASSWORD_ENV}"
            ) from None
        raise RedisAuthError(
            f"{where} refused the password ({exc}); check buffer.redis.password or ${PASSWORD_ENV}"
        ) from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise RedisAuthError(f"{where} refused the password ({exc})") from None
        raise
    if not throwaway_local and accepts_anonymous(client):
        raise RedisAuthError(
            f"{where} accepts clients without a password; configure requirepass (or an ACL user), "
            "or set buffer.redis.throwaway_local=true for a throwaway local Redis"
        )


def connect(cfg: RedisConfig) -> redis.Redis:
    """A checked client to the Redis at cfg.url (see the module docstring)."""
    if not cfg.url:
        raise ValueError(
            "buffer.redis.url is not set (None means: start a private redis-server with start_redis)"
        )
    password = cfg.password or os.environ.get(PASSWORD_ENV) or None
    client = _client_from_config(cfg, password)
    where = f"Redis at {redact(cfg.url)}"
    try:
        check_client(client, cfg.throwaway_local, where)
    except redis.ConnectionError as exc:
        raise ConnectionError(f"cannot reach {where}: {exc}") from None
    return client
