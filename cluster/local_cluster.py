"""A Ray cluster of several nodes on this machine, for tests and for trying a multi-node layout: a head node and
worker nodes, each its own `ray start` bound to 127.0.0.1 with its own CPU count, custom resources and temp
folder. Started and stopped by PID: `stop_cluster` ends exactly the processes of this cluster (never `ray stop`,
which would end every Ray cluster of the machine) and removes the shared-memory segments they left behind.

A node is written `[NAME:]KEY=VALUE[,KEY=VALUE...]`; the first node is the head. Keys: `cpus` (logical CPUs the
node advertises; default Ray's, the machine's core count), `gpus`, `object_store_mb` (default 512), and any other
key is a custom resource (a number > 0), e.g. `head:learner_node=1,cpus=1 rollout:rollout_node=1,cpus=1`.
NAME defaults to `head` for the first node and `node<i>` for the others; `NAME:` alone is a node without custom
resources.

Everything listens on 127.0.0.1 only. With auth="token" (the CLI's default) the cluster runs with Ray's token
authentication, as a production cluster does: a token is generated for the cluster and kept in `folder`/auth_token
(mode 0600; never ~/.ray/auth_token, which Ray falls back to), every node is started with RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN_PATH naming that file, and so are the processes Ray starts (the drivers of `ray job submit` and the
actors inherit the raylets' environment); a client without the token is refused. With auth="disabled" (the
default of start_cluster and local_cluster, for tests) it runs without. Every client needs the variables of
`LocalCluster.client_env()` (RAY_ADDRESS, the auth variables and the one that keeps Ray from replacing 127.0.0.1 by
the machine's outward address); start_cluster sets all but RAY_ADDRESS in its own process (local_cluster restores
them on exit), so a test's ray.init(address=cluster.address) just works."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from .config import RAY_BUILTIN_RESOURCES

log = logging.getLogger(__name__)

RECORD = "cluster.json"
TOKEN_FILE = "auth_token"
AUTH_MODES = ("token", "disabled")
HOST = "127.0.0.1"
# Ray 2.60 replaces 127.0.0.1 by the machine's outward address in every address it is given
# (services.resolve_ip_for_localhost: nodes would register, and listen, on all interfaces) unless this variable
# is 0. The head and every client (ray.init, ray status, the drivers of ray job submit, which run on the head)
# get it; `ray start` refuses to start a worker node with it, so worker nodes are started with the resolution
# switched off in the CLI's own process instead (_RAY_START_ON_LOOPBACK).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DEFAULT_OBJECT_STORE_MB = 512
# Shared-memory segments our stack leaves when its processes are killed (vLLM, torch, DeepSpeed, Ray's plasma).
SHM_PREFIXES = ("psm_", "vllm", "deepspeed_", "plasma", "torch_")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_BUILTIN_KEYS = {"cpus": "num_cpus", "gpus": "num_gpus", "object_store_mb": "object_store_mb"}


class NodeSpecError(ValueError):
    """A node spec that cannot be parsed; the message names the spec and what is allowed."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_mb: int = DEFAULT_OBJECT_STORE_MB
    resources: dict[str, float] = field(default_factory=dict)


def parse_node(text: str, index: int) -> NodeSpec:
    """One node spec (see the module doc); `index` 0 is the head."""
    name, sep, body = text.partition(":")
    if not sep:
        name, body = ("head" if index == 0 else f"node{index}"), text
    name = name.strip()
    if not _NAME.match(name):
        raise NodeSpecError(f"node '{text}': the name '{name}' may hold only letters, digits, '_' and '-'")
    values: dict = {"resources": {}}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise NodeSpecError(f"node '{text}': '{item}' is not KEY=VALUE")
        if key in RAY_BUILTIN_RESOURCES:
            raise NodeSpecError(f"node '{text}': '{key}' is Ray's own resource: use cpus=, gpus= or object_store_mb=")
        try:
            number = float(raw)
        except ValueError:
            raise NodeSpecError(f"node '{text}': {key}={raw} is not a number") from None
        if key in _BUILTIN_KEYS:
            if number < 0 or not number.is_integer():
                raise NodeSpecError(f"node '{text}': {key}={raw} must be a whole number >= 0")
            values[_BUILTIN_KEYS[key]] = int(number)
        elif number <= 0:
            raise NodeSpecError(f"node '{text}': resource {key}={raw} must be > 0")
        else:
            values["resources"][key] = number
    if values.get("object_store_mb") is not None and values["object_store_mb"] < 80:
        raise NodeSpecError(f"node '{text}': object_store_mb must be at least 80 (Ray's minimum is 75 MiB)")
    return NodeSpec(name=name, **values)


def parse_nodes(texts: list[str]) -> list[NodeSpec]:
    """The cluster's nodes, the head first. Raises NodeSpecError."""
    if not texts:
        raise NodeSpecError("give at least one node (the head), e.g. 'head:learner_node=1,cpus=1'")
    nodes = [parse_node(t, i) for i, t in enumerate(texts)]
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise NodeSpecError(f"node names must be distinct, got {names}")
    return nodes


@dataclass
class LocalCluster:
    folder: str
    address: str  # host:port of the head's GCS: RAY_ADDRESS, ray.init(address=...)
    dashboard_url: str | None  # also where `ray job submit --address` goes; None without the dashboard
    nodes: list[dict]  # per node: name, spec, temp_dir, node_id, pids
    shm_before: list[str]
    token_path: str | None = None  # the cluster's token file with auth="token"; None without token auth

    def client_env(self) -> dict[str, str]:
        """What a client of this cluster (a driver, `ray status`, `ray job submit`) needs in its environment.
        With the dashboard, RAY_API_SERVER_ADDRESS too: the job and state CLIs take it before RAY_ADDRESS, which
        they would otherwise prefer to their own --address."""
        api = {"RAY_API_SERVER_ADDRESS": self.dashboard_url} if self.dashboard_url else {}
        return {"RAY_ADDRESS": self.address, **api, **auth_env(self.token_path), **LOOPBACK_ENV}

    def node_id(self, name: str) -> str:
        return next(n["node_id"] for n in self.nodes if n["name"] == name)


def keep_ray_on_loopback() -> None:
    """For a Ray this process starts or joins on this machine: LOOPBACK_ENV in this process's environment (its
    children inherit it) and in Ray's constant, which Ray reads once, when it is imported."""
    os.environ.update(LOOPBACK_ENV)
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def auth_env(token_path: str | None) -> dict[str, str]:
    """Ray's auth variables for a cluster with this token file (None: token auth off). The mode is always set
    explicitly: with RAY_AUTH_MODE unset, Ray 2.60 turns token auth on by itself when ~/.ray/auth_token exists."""
    if token_path is None:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")


def use_auth(env: dict[str, str | None]) -> None:
    """Set (a value) or unset (None) Ray's auth variables in this process and make an already imported Ray read
    them again: Ray's C++ config and token loader cache what they read first."""
    for key in _AUTH_VARS:
        if env.get(key) is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = env[key]
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _write_token(folder: Path) -> str:
    """A new random token (256 bits, as Ray's own generator) in `folder`/auth_token, readable by its owner only."""
    import secrets

    path = folder.resolve() / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _temp_root(folder: Path) -> str:
    # Short on purpose (as the launcher's): Ray's unix sockets live under it, and socket paths end at 107 bytes.
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"avatar-rc-{digest}")


_RAY_START_ON_LOOPBACK = (
    "import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def _ray_start(args: list[str], env: dict, logfile: Path, timeout_s: float) -> None:
    # ray start daemonizes its processes and returns; its own output goes to the node's log
    cmd = [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", *args]
    with logfile.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    if rc != 0:
        tail = logfile.read_text()[-3000:]
        raise RuntimeError(f"ray start failed (exit {rc}); the end of {logfile}:\n{tail}")


def _node_args(spec: NodeSpec, temp_dir: str) -> list[str]:
    args = [f"--node-ip-address={HOST}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
            # the agent's default port (52365) is taken by the first node of the machine
            f"--dashboard-agent-listen-port={_free_port()}"]
    if spec.num_cpus is not None:
        args.append(f"--num-cpus={spec.num_cpus}")
    if spec.num_gpus is not None:
        args.append(f"--num-gpus={spec.num_gpus}")
    if spec.resources:
        args.append(f"--resources={json.dumps(spec.resources)}")
    return args


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _processes_under(temp: str) -> list[psutil.Process]:
    """Processes that name the folder `temp` in their command line, or hold a file open under it: Ray's agents
    and workers rename themselves ray::..., and the head's client server (python -m ray.util.client.server, a
    daemon of its own) names only the GCS address; both write their logs under `temp`."""
    found = []
    for proc in psutil.process_iter():
        cmd = _cmdline(proc)
        if temp + "/" in cmd or cmd.endswith(temp):
            found.append(proc)
        elif cmd.startswith("ray::") or " -m ray." in cmd:
            try:
                if any(f.path.startswith(temp + "/") for f in proc.open_files()):
                    found.append(proc)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
    return found


def _pid_entry(proc: psutil.Process) -> dict:
    try:
        return {"pid": proc.pid, "create_time": proc.create_time(), "cmd": _cmdline(proc)[:200]}
    except psutil.NoSuchProcess:
        return {"pid": proc.pid, "create_time": None, "cmd": ""}


def _wait_for_nodes(address: str, temp_dirs: list[str], timeout_s: float) -> dict[str, str]:
    """Node id by temp folder, once every node is alive in the head's GCS."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    client = GcsClient(address=address)
    deadline = time.monotonic() + timeout_s
    while True:
        infos = client.get_all_node_info(timeout=10)
        alive = {info.temp_dir: node_id.hex() for node_id, info in infos.items() if info.state == GcsNodeInfo.ALIVE}
        if all(t in alive for t in temp_dirs):
            return {t: alive[t] for t in temp_dirs}
        if time.monotonic() > deadline:
            missing = [t for t in temp_dirs if t not in alive]
            raise RuntimeError(f"nodes with temp folders {missing} did not join {address} within {timeout_s:.0f} s")
        time.sleep(0.5)


def _node_envs() -> tuple[dict, dict]:
    """(the head's environment, a worker node's), from this process's, whose auth variables (use_auth) the nodes
    inherit; also keeps this process's own GCS client and ray.init (a test's driver) on loopback."""
    keep_ray_on_loopback()
    # the actors inherit the raylets' environment: vLLM-CPU's per-call thread-binding warning stays out (as the
    # launcher does for the embedded Ray)
    env = {"VLLM_LOGGING_LEVEL": "ERROR", **os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return env, {k: v for k, v in env.items() if k not in LOOPBACK_ENV}


def _write_record(folder: Path, record: dict) -> None:
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(folder / RECORD)


def start_cluster(folder: str | Path, nodes: list[NodeSpec] | list[str], dashboard: bool = False,
                  timeout_s: float = 120.0, auth: str = "disabled") -> LocalCluster:
    """Start the head (nodes[0]) and the worker nodes on 127.0.0.1; their PIDs go to `folder`/cluster.json.
    The dashboard (about 1.3 GB more) is started only when asked; it also serves `ray job submit`. auth: "token"
    (Ray's token authentication, with a token made for this cluster) or "disabled" (see the module doc).
    Everything started is stopped again if a node fails to start."""
    if auth not in AUTH_MODES:
        raise ValueError(f"auth={auth!r}: one of {AUTH_MODES}")
    specs = parse_nodes(list(nodes)) if not nodes or isinstance(nodes[0], str) else list(nodes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / RECORD).is_file():
        if _cluster_processes(json.loads((folder / RECORD).read_text())):
            raise RuntimeError(f"a cluster of {folder} is running: stop it first (cluster down {folder})")
        stop_cluster(folder)  # the leftovers of one whose processes died
    token_path = _write_token(folder) if auth == "token" else None
    # for this process's GCS client and its ray.init (a test's driver); the nodes inherit them
    use_auth(auth_env(token_path))
    env, worker_env = _node_envs()
    temp_root = _temp_root(folder)
    shutil.rmtree(temp_root, ignore_errors=True)
    record = {"temp_root": temp_root, "address": None, "dashboard_url": None, "token_path": token_path,
              "shm_before": sorted(p.name for p in Path("/dev/shm").glob("*")) if Path("/dev/shm").is_dir() else [],
              "nodes": []}
    try:
        for i, spec in enumerate(specs):
            temp_dir = os.path.join(temp_root, f"n{i}")
            args = _node_args(spec, temp_dir)
            if i == 0:
                port = _free_port()
                record["address"] = f"{HOST}:{port}"
                args += ["--head", f"--port={port}", f"--ray-client-server-port={_free_port()}",
                         f"--include-dashboard={'true' if dashboard else 'false'}"]
                if dashboard:
                    dash_port = _free_port()
                    args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
                    record["dashboard_url"] = f"http://127.0.0.1:{dash_port}"
            else:
                # each node keeps its log monitor: it reads that node's own temp folder only
                args.append(f"--address={record['address']}")
            record["nodes"].append({"name": spec.name, "spec": asdict(spec), "temp_dir": temp_dir,
                                    "node_id": None, "pids": []})
            _write_record(folder, record)  # before the start: a failed start is still stopped by its folder
            _ray_start(args, env if i == 0 else worker_env, folder / f"{spec.name}.log", timeout_s)
            log.info("started node %s (%s)", spec.name, " ".join(args))
        ids = _wait_for_nodes(record["address"], [n["temp_dir"] for n in record["nodes"]], timeout_s)
        for node in record["nodes"]:
            node["node_id"] = ids[node["temp_dir"]]
            node["pids"] = [_pid_entry(p) for p in _processes_under(node["temp_dir"])]
        _write_record(folder, record)
    except BaseException:
        if (folder / RECORD).is_file():
            stop_cluster(folder)
        raise
    return LocalCluster(folder=str(folder), address=record["address"], dashboard_url=record["dashboard_url"],
                        nodes=record["nodes"], shm_before=record["shm_before"], token_path=token_path)


def _cluster_processes(record: dict) -> list[psutil.Process]:
    """Every process of the cluster: the recorded PIDs (when still the same process), whatever names its temp
    folder, and all their descendants (Ray's workers and the engines they started)."""
    procs: dict[int, psutil.Process] = {}
    for node in record.get("nodes", []):
        for entry in node.get("pids", []):
            try:
                proc = psutil.Process(entry["pid"])
                if entry.get("create_time") is None or abs(proc.create_time() - entry["create_time"]) < 1e-3:
                    procs[proc.pid] = proc
            except psutil.NoSuchProcess:
                pass
    if record.get("temp_root"):
        procs.update({p.pid: p for p in _processes_under(record["temp_root"])})
    for proc in list(procs.values()):
        try:
            procs.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    procs.pop(os.getpid(), None)  # a driver started from the cluster's folder is not the cluster's to end
    return list(procs.values())


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process has open or mapped."""
    used = set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for line in (pid_dir / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line.split("/dev/shm/", 1)[1].split(" ")[0])
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):].split(" ")[0])
        except OSError:  # gone, or another user's
            continue
    return used


def kill_all(procs: list[psutil.Process], timeout_s: float = 10.0) -> None:
    """SIGKILL each process (one already gone is skipped), then wait for them."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)


def stop_cluster(folder: str | Path, grace_s: float = 5.0) -> list[int]:
    """Stop the cluster recorded in `folder`: SIGTERM to each of its processes, SIGKILL to those still there
    after grace_s; then remove the shared-memory segments that appeared while it ran and that no live process
    uses, and its temp folders. Returns the PIDs it ended."""
    folder = Path(folder)
    path = folder / RECORD
    record = _read_record(folder)
    procs = _cluster_processes(record)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    kill_all(alive)
    late = _cluster_processes(record)  # processes that a dying raylet started meanwhile (a worker for a task)
    kill_all(late)
    before, used = set(record.get("shm_before", [])), _shm_in_use()
    removed = []
    for p in Path("/dev/shm").glob("*"):
        if p.name.startswith(SHM_PREFIXES) and p.name not in before and p.name not in used:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.info("removed %d shared-memory segments left in /dev/shm", len(removed))
    if record.get("temp_root"):
        shutil.rmtree(record["temp_root"], ignore_errors=True)
    if record.get("token_path"):  # the cluster's secret: useless once it is down
        Path(record["token_path"]).unlink(missing_ok=True)
    path.unlink()
    pids = sorted({p.pid for p in procs + late})
    log.info("stopped the local cluster of %s: %d processes", folder, len(pids))
    return pids


def _read_record(folder: Path) -> dict:
    path = Path(folder) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no local cluster recorded in {folder}")
    return json.loads(path.read_text())


def _node_processes(node: dict) -> list[psutil.Process]:
    """One node's processes: its recorded PIDs (when still the same process), whatever names its temp folder,
    and all their descendants (the actors' worker processes and the engines they started)."""
    procs = _cluster_processes({"nodes": [node], "temp_root": node["temp_dir"]})
    return [p for p in procs if p.pid != os.getpid()]


def kill_node(folder: str | Path, name: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process of the worker node `name` (its raylet, agents, the actors' workers and what they
    started), as when the machine dies; the head's GCS finds the node dead by its health checks. The record
    keeps the node, marked dead, so that `add_node` can start it again and `stop_cluster` still finds all.
    Returns the PIDs it ended."""
    folder = Path(folder)
    record = _read_record(folder)
    index = next((i for i, n in enumerate(record["nodes"]) if n["name"] == name), None)
    if index is None:
        raise KeyError(f"no node {name!r} in {folder}: {[n['name'] for n in record['nodes']]}")
    if index == 0:
        raise ValueError("kill_node ends worker nodes; the head holds the GCS (stop_cluster ends the cluster)")
    node = record["nodes"][index]
    procs = _node_processes(node)
    kill_all(procs, timeout_s)
    node["pids"], node["alive"] = [], False
    _write_record(folder, record)
    pids = sorted(p.pid for p in procs)
    log.info("killed node %s (%s): %d processes", name, node["node_id"], len(pids))
    return pids


def add_node(folder: str | Path, spec: NodeSpec | str, timeout_s: float = 120.0) -> dict:
    """Start a worker node that joins the cluster of `folder`: a new one, or one that kill_node ended, under the
    same name (a new node id and temp folder; Ray sees a new node with the same resources). Returns its record
    (name, spec, temp_dir, node_id, pids)."""
    folder = Path(folder)
    record = _read_record(folder)
    if isinstance(spec, str):
        spec = parse_node(spec, len(record["nodes"]))
    same = [i for i, n in enumerate(record["nodes"]) if n["name"] == spec.name]
    if same and record["nodes"][same[0]].get("alive", True):
        raise ValueError(f"node {spec.name!r} of {folder} is running (kill_node it first)")
    used = {n["temp_dir"] for n in record["nodes"]} | set(record.get("dead_temp_dirs", []))
    temp_dir = next(d for k in range(len(used) + 1)
                    if (d := os.path.join(record["temp_root"], f"n{k}")) not in used)
    use_auth(auth_env(record.get("token_path")))  # the cluster's own: a node joins with its token
    _, worker_env = _node_envs()
    node = {"name": spec.name, "spec": asdict(spec), "temp_dir": temp_dir, "node_id": None, "pids": []}
    if same:  # a new folder: the dead node's stays (with its logs) until stop_cluster removes the temp root
        record.setdefault("dead_temp_dirs", []).append(record["nodes"][same[0]]["temp_dir"])
        record["nodes"][same[0]] = node
    else:
        record["nodes"].append(node)
    _write_record(folder, record)  # before the start: stop_cluster finds a node that failed to start by its folder
    args = [*_node_args(spec, temp_dir), f"--address={record['address']}"]
    _ray_start(args, worker_env, folder / f"{spec.name}.log", timeout_s)
    node["node_id"] = _wait_for_nodes(record["address"], [temp_dir], timeout_s)[temp_dir]
    node["pids"] = [_pid_entry(p) for p in _processes_under(temp_dir)]
    _write_record(folder, record)
    log.info("node %s joined %s as %s", spec.name, record["address"], node["node_id"])
    return node


@contextmanager
def local_cluster(folder: str | Path, nodes: list[NodeSpec] | list[str], dashboard: bool = False,
                  timeout_s: float = 120.0, auth: str = "disabled"):
    """start_cluster ... stop_cluster, for tests: yields the LocalCluster; this process's auth variables are
    restored afterwards (a later embedded Ray of the same process must not look for the removed token)."""
    before = {k: os.environ.get(k) for k in _AUTH_VARS}
    try:
        cluster = start_cluster(folder, nodes, dashboard=dashboard, timeout_s=timeout_s, auth=auth)
        try:
            yield cluster
        finally:
            stop_cluster(folder)
    finally:
        use_auth(before)
