"""Security properties of the embedded default and of everything that reads from Redis or the network:
Redis with a password on loopback only, nothing unpickled, metrics served read-only on loopback, manifest media
paths confined to the manifest's folder (tests/unit/test_fuzz_inputs.py tests that part)."""

from __future__ import annotations

import ast
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis

from buffer_service.config import RedisConfig
from buffer_service.redis_server import RedisAuthError, connect

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_redis_has_a_password_and_listens_on_loopback_only(redis_server):
    conf = (redis_server.folder / "redis.conf").read_text().splitlines()
    assert "bind 127.0.0.1" in conf and "protected-mode yes" in conf
    password = next(line.split(" ", 1)[1] for line in conf if line.startswith("requirepass "))
    assert len(password) >= 24
    assert oct((redis_server.folder / "redis.conf").stat().st_mode & 0o777) == "0o600"  # the password file
    listening = {c.laddr.ip for c in psutil.Process(redis_server.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}
    with pytest.raises(redis.AuthenticationError):  # no password: refused
        redis.Redis(host="127.0.0.1", port=redis_server.port).ping()
    with pytest.raises(RedisAuthError, match="requires a password"):
        connect(RedisConfig(url=redis_server.url, password=None))
    with pytest.raises(RedisAuthError, match="refused the password"):
        connect(RedisConfig(url=redis_server.url, password="wrong"))
    assert connect(RedisConfig(url=redis_server.url, password=redis_server.password)).ping()


def test_a_redis_without_password_is_refused_unless_declared_throwaway(tmp_path):
    import shutil
    import subprocess

    from buffer_service.redis_server import _free_port

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make setup, scripts/setup.sh, installs it)")
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                import time

                time.sleep(0.05)
        with pytest.raises(RedisAuthError, match="without a password"):
            connect(RedisConfig(url=url))
        assert connect(RedisConfig(url=url, throwaway_local=True)).ping()
    finally:
        proc.kill()
        proc.wait(10)


# Packages whose code touches bytes from Redis, the network (judge endpoint, Ray object store of our records)
# or dataset files: none may deserialise with pickle (or anything that runs code on load).
UNSAFE_CALLS = {("pickle", "loads"), ("pickle", "load"), ("cloudpickle", "loads"), ("dill", "loads"),
                ("marshal", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"), ("numpy", "load"), ("np", "load")}
UNSAFE_IMPORTS = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}


@pytest.mark.parametrize("package", ["buffer_service", "reward_workers", "data", "cluster", "actors", "policy",
                                     "learner"])
def test_nothing_read_from_redis_or_the_network_is_unpickled(package):
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.name}:{node.lineno} import {n}" for n in names if n.split(".")[0] in UNSAFE_IMPORTS]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                    node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in UNSAFE_CALLS:
                kw = {k.arg: k.value for k in node.keywords}
                if node.func.attr == "load" and node.func.value.id in ("np", "numpy") and isinstance(
                        kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False:
                    continue
                found.append(f"{path.name}:{node.lineno} {node.func.value.id}.{node.func.attr}")
            # torch.load(weights_only=False) unpickles: allowed only on the learner's own local checkpoint files
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" and package != "learner":
                found.append(f"{path.name}:{node.lineno} torch.load")
    assert not found, found


def test_metrics_endpoint_is_read_only_and_on_loopback():
    from cluster.metrics import DriverMetrics

    metrics = DriverMetrics()
    metrics.row = {"prompts_in_flight": 7}
    address = metrics.endpoint.address()
    port = int(address.rsplit(":", 1)[1])
    url = f"http://{address}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "avatar_prompts_in_flight 7.0" in body
    for method in ("POST", "PUT", "DELETE"):
        req = urllib.request.Request(url, data=b"avatar_prompts_in_flight 99", method=method)
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except urllib.error.HTTPError:
            pass
    assert "avatar_prompts_in_flight 7.0" in urllib.request.urlopen(url, timeout=5).read().decode()  # unchanged
    listening = {c.laddr for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", port) in {(a.ip, a.port) for a in listening}
    assert ("0.0.0.0", port) not in {(a.ip, a.port) for a in listening}
