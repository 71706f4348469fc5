"""The control plane under a fleet: 8, 16, 32, 64 rollout workers feeding the real reward workers, the real Redis
replay service and a learner, with the real driver loop (cluster/driver.py train_rl) in this process.

    .venv/bin/python -m benchmarks.fleet [--workers 8,16,32,64] [--groups-per-call 0.5,4] [--seconds-per-call 0.5]
                                         [--steps 30]

LOAD GENERATORS, not the system's workers (labelled as such in the output):
  - SimulatedRollouts: one Ray actor process stands in for up to 8 rollout workers (threads, two calls each at
    a time, as a RolloutWorker); each rollout call sleeps --seconds-per-call (a generate call), then emits, for
    each task, a group of trajectories recorded from the tiny model (generated once at start by the real vLLM
    engine from the demo's stage-0 checkpoint), with the task's ids, hands it to a real reward worker as an
    object reference and waits for the replies, as RolloutWorker.rollout;
  - LoadLearner: consumes the fresh stream, samples the tiers, commits the batch into the tiers and returns the
    step summary, exactly as the learner's train_from_buffer, but takes no gradient step.
Everything else is the system: the driver loop (ledger, receipts, checkpoint, acknowledgement), RewardWorker
actors (format + accuracy, score and push), ReplayService on a private redis-server.

Groups per step = workers x --groups-per-call (at least 4), at most two steps' worth in flight (staleness 1), so
each rollout call carries about --groups-per-call tasks. Per fleet size it prints groups/s sustained (trained
groups over the measured window, after 5 warm-up steps), the fresh stream's length at each step, the age of a
group when trained, the driver's CPU per trained group (time.process_time of this process, which is the driver),
the driver's step by phase, and where the CPU went (each part and the whole machine) to show what bounds the
throughput. Writes benchmarks/results/<--json> (fleet.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray

from benchmarks.sample_efficiency import RESULTS, ensure_stage0

TEMPLATES_PROMPTS = 8


@ray.remote(num_cpus=0)
class SimulatedRollouts:
    """LOAD GENERATOR: stands in for several rollout workers (threads of one process)."""

    def __init__(self, templates: list[list[dict]], seconds_per_call: float):
        self.templates, self.seconds_per_call = templates, seconds_per_call
        self.policy_version, self.counts = 0, {"generate_seconds": 0.0, "tokens": 0}
        self._lock = threading.Lock()
        self._next = 0

    def rollout(self, tasks, scorers, weights=None, evaluate=False, seed=None, sampling=None):
        from actors.worker import Receipt, RolloutReport
        from buffer_service.records import Trajectory

        start = time.perf_counter()
        if weights:
            self.policy_version = weights["version"]  # nothing to load: the recorded groups stand for any version
        time.sleep(self.seconds_per_call)  # the engine call
        receipts, calls = [], []
        for task in tasks:
            with self._lock:
                template, self._next = self.templates[self._next % len(self.templates)], self._next + 1
            group = [Trajectory(trajectory_id=f"{task.key}/{i}", group_id=task.key, prompt_id=task.sample.id,
                                policy_version=self.policy_version, created_at=time.time(), **t)
                     for i, t in enumerate(template)]
            ref = ray.put(group)
            scorer = scorers[hash(task.key) % len(scorers)]
            call = scorer.evaluate if evaluate else scorer.score_and_push
            tokens = sum(len(t.completion_token_ids) for t in group)
            receipts.append(Receipt(task.key, task.sample.id, len(group), tokens, self.policy_version))
            calls.append(call.remote(ref, task.sample))
            with self._lock:
                self.counts["tokens"] += tokens
        for receipt, ref in zip(receipts, calls):  # the replies, waited for here as RolloutWorker.rollout does
            try:
                receipt.answer = ray.get(ref)
            except ray.exceptions.RayError as exc:
                receipt.lost = exc
        with self._lock:
            self.counts["generate_seconds"] += time.perf_counter() - start
            stats = dict(self.counts)
        return RolloutReport(f"simulated-{os.getpid()}", receipts, stats)

    def load_weights(self, weights: dict) -> float:
        self.policy_version = weights["version"]
        return 0.0

    def version(self) -> int:
        return self.policy_version

    def stats(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class LoadLearner:
    """LOAD GENERATOR: the learner's data path (read, drop stale, sample, commit, summarise), no gradient step."""

    def __init__(self, buffer_cfg: dict):
        from learner.feed import FreshFeed

        self.feed, self.policy_version = FreshFeed(buffer_cfg), 0

    def train_from_buffer(self, per_step, n_replay, max_staleness, block_ms=None, reclaim=False):
        from learner.feed import commit
        from learner.summary import step_summary

        t0 = time.perf_counter()
        self.feed.read(per_step, self.policy_version, max_staleness, block_ms, reclaim)
        batch, stale = self.feed.take(per_step), self.feed.take_stale()
        if batch is None:
            return {"trained": False, "stale": stale, "held": len(self.feed.held)}
        replay = self.feed.service.sample(n_replay, None, None, self.policy_version) if n_replay else []
        groups = [g for _, g in batch]
        ids = [t.trajectory_id for g in groups for t in g] + [s.trajectory.trajectory_id for s in replay]
        stats = {"advantages": dict.fromkeys(ids, 0.0), "mean_logratio_old_ref": {}, "ref_logprobs": {},
                 "kl_per_trajectory": {}, "loss": 0.0, "kl": 0.0, "clip_fraction": 0.0,
                 "zero_adv_token_fraction": 1.0}
        commit(self.feed.service, batch, stats, replay_on=n_replay > 0)
        stats["seconds"] = time.perf_counter() - t0
        now = time.time()
        return {"trained": True, **step_summary(groups, replay, stats, self.policy_version),
                "entry_ids": [e for e, _ in batch], "stale": stale, "held": len(self.feed.held),
                "age_seconds": statistics.mean(now - g[0].created_at for g in groups)}

    def publish(self, bump=True, version=None) -> dict:
        self.policy_version = version if version is not None else self.policy_version + bool(bump)
        return {"location": "", "version": self.policy_version, "checksum": ""}

    def save_checkpoint(self, directory: str) -> str:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return directory

    def pid(self) -> int:
        return os.getpid()


class LoadLearnerGroup:
    """The LearnerGroup methods the driver calls, on one LoadLearner."""

    def __init__(self, buffer_cfg: dict):
        self.actor = LoadLearner.remote(buffer_cfg)
        self.ages: list[float] = []

    def train_from_buffer(self, *args):
        out = ray.get(self.actor.train_from_buffer.remote(*args))
        if out.get("trained"):
            self.ages.append(out["age_seconds"])
        return out

    def publish(self, bump=True, version=None):
        return ray.get(self.actor.publish.remote(bump, version))

    def save_checkpoint(self, directory):
        return ray.get(self.actor.save_checkpoint.remote(str(directory)))


def record_templates(init_from: str, samples: list, group_size: int) -> list[list[dict]]:
    """Groups of the tiny model, generated once by the real vLLM engine (the recording the generators replay)."""
    from actors.config import RolloutConfig
    from actors.tasks import PromptTask
    from actors.worker import RolloutWorker
    from policy.config import ProcessorConfig

    worker = RolloutWorker("recorder", init_from, RolloutConfig(group_size=group_size, max_new_tokens=128),
                           ProcessorConfig(max_frames=8, max_pixels=12544))
    try:
        results = worker.generate([PromptTask(f"rec:{s.id}", s) for s in samples])
    finally:
        worker.shutdown()
    keep = ("prompt_token_ids", "completion_token_ids", "behaviour_logprobs", "completion_text", "stage",
            "truncated")
    return [[{k: getattr(t, k) for k in keep} for t in r.trajectories] for r in results if r.trajectories]


def run_fleet(n_workers: int, per_call: float, templates, samples, args, work: Path) -> dict:
    """One fleet size: `per_call` groups per worker per step (0.5: half the workers get one task a step)."""
    import psutil

    from buffer_service.redis_server import start_redis
    from cluster.components import Components
    from cluster.config import load_config
    from cluster.driver import train_rl
    from cluster.metrics import DriverMetrics
    from cluster.prompts import PromptOrder
    from cluster.state import RunState
    from reward_workers.pool import RewardPool

    processes = min(8, n_workers)
    per_process = n_workers // processes
    per_step = max(4, round(n_workers * per_call))
    run_dir = work / f"fleet{n_workers}x{per_call:g}"
    cfg = load_config("configs/demo.yaml", [
        f"run_dir={work}", f"name={run_dir.name}", f"pipeline.steps={args.steps}",
        f"pipeline.prompts_per_step={per_step}", "pipeline.max_staleness=1", f"pipeline.max_prompts_in_flight={2 * per_step}",
        "pipeline.checkpoint_every=5", f"reward.num_workers={args.reward_workers}",
        f"buffer.capacity={args.steps * per_step * 4 + 100}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    redis = start_redis(run_dir / "redis", appendfsync="always")
    from buffer_service.service import ReplayService

    buffer_cfg = cfg.buffer.model_copy(update={"redis": redis.config()})
    try:
        sims = [SimulatedRollouts.options(max_concurrency=2 * per_process + 1).remote(templates, args.seconds_per_call)
                for _ in range(processes)]
        comps = Components(buffer=ray.remote(num_cpus=0)(ReplayService).remote(buffer_cfg),
                           learner=LoadLearnerGroup(buffer_cfg.model_dump()),
                           workers=[s for s in sims for _ in range(per_process)])
        comps.rewards = RewardPool(cfg.reward, stage=cfg.stage, buffer_cfg=buffer_cfg.model_dump())
        history = run_dir / "history.jsonl"
        samples_at: list[tuple[int, float, float, dict]] = []  # (rows, wall, driver CPU, other CPU) per new row
        reward_pids = ray.get([w.pid.remote() for w in comps.rewards.workers])
        others = {"redis-server": [psutil.Process(redis.pid)],
                  "reward workers": [psutil.Process(p) for p in reward_pids],
                  "generators": [psutil.Process(p) for p in ray.get([s.pid.remote() for s in sims])],
                  "learner": [psutil.Process(ray.get(comps.learner.actor.pid.remote()))],
                  "replay service actor": [psutil.Process(ray.get(comps.buffer.__ray_call__.remote(
                      lambda self: os.getpid())))]}
        done = threading.Event()

        def sample():  # the driver's CPU is this process's, less this measuring thread's own
            seen = 0
            while not done.is_set():
                rows = len(history.read_text().splitlines()) if history.is_file() else 0
                if rows > seen:
                    seen = rows
                    cpu = {k: sum(sum(p.cpu_times()[:2]) for p in ps) for k, ps in others.items()}
                    machine = psutil.cpu_times()
                    cpu["machine"] = machine.user + machine.system + machine.nice
                    samples_at.append((rows, time.time(), time.process_time() - time.thread_time(), cpu))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        train_rl(cfg, run_dir, comps, PromptOrder(samples, 0, shuffle=True), RunState(), DriverMetrics(), history)
        done.set()
        sampler.join()
        rows = [json.loads(line) for line in history.read_text().splitlines()]
        comps.rewards.shutdown()
        for s in sims:
            ray.kill(s)
    finally:
        redis.stop()
    warm = 5
    (r0, w0, c0, o0), (r1, w1, c1, o1) = samples_at[warm - 1], samples_at[-1]
    groups = (r1 - r0) * per_step
    wall = w1 - w0
    return {
        "workers": n_workers, "groups_per_call": per_call, "processes": processes, "prompts_per_step": per_step,
        "groups_per_second": groups / wall,
        "driver_cpu_ms_per_group": 1000 * (c1 - c0) / groups,
        "driver cpu share": (c1 - c0) / wall,
        **{f"{k} cpu share": (o1[k] - o0[k]) / wall for k in o0},
        "fresh_length_mean": statistics.mean(r["fresh_length"] for r in rows[warm:]),
        # where the driver's step went (its phase timer): waiting for groups, or in the learner's call, ...
        "step_seconds_by_phase": {phase: statistics.mean(r["phase_seconds"].get(phase, 0.0) for r in rows[warm:])
                                  for phase in ("submit", "rollout_wait", "train", "record", "checkpoint")},
        "age_at_training_s": statistics.mean(comps.learner.ages[warm:]),
        "offered_groups_per_second": 2 * per_step / args.seconds_per_call,  # all in flight, one call each
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="8,16,32,64")
    ap.add_argument("--groups-per-call", default="0.5,4",
                    help="groups each worker is dealt per step: 0.5 (one task to half the workers), 4 (a batch each)")
    ap.add_argument("--seconds-per-call", type=float, default=0.5, help="each simulated generate call's duration")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reward-workers", type=int, default=2)
    ap.add_argument("--json", default="fleet.json", help="file name of the results under benchmarks/results")
    ap.add_argument("--out", default=str(RESULTS / "demo_stage0"), help="where the demo stage-0 checkpoint is cached")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    init_from = ensure_stage0(Path(args.out).resolve())
    from cluster.config import load_config
    from cluster.prompts import load_prompts

    work = Path(tempfile.mkdtemp(prefix="avatar-fleet-"))
    samples = load_prompts(load_config("configs/demo.yaml", [f"run_dir={work}"]), work)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster.local_cluster import keep_ray_on_loopback

    keep_ray_on_loopback()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        templates = record_templates(init_from, samples[:TEMPLATES_PROMPTS], group_size=4)
        print(f"[fleet] recorded {len(templates)} groups of the tiny model to replay (load generators)", flush=True)
        results = []
        for per_call in [float(x) for x in args.groups_per_call.split(",")]:
            for n in [int(x) for x in args.workers.split(",")]:
                print(f"[fleet] {n} simulated rollout workers, {per_call:g} groups per call ...", flush=True)
                results.append(run_fleet(n, per_call, templates, samples, args, work))
    finally:
        ray.shutdown()
    parts = ["driver", "reward workers", "redis-server", "replay service actor", "generators", "learner", "machine"]
    lines = [f"LOAD GENERATORS: simulated rollout workers ({args.seconds_per_call} s per generate call, recorded "
             "groups of the tiny model) and a learner without a gradient step; real driver loop, reward workers, "
             "Redis", "",
             "| workers | groups per call | groups/step | offered groups/s | groups/s trained | driver CPU ms/group | "
             "fresh stream length | age at training s | step s: waiting for groups / learner call / record / "
             "checkpoint |", "|" + "---|" * 9]
    for r in results:
        ph = r["step_seconds_by_phase"]
        lines.append(f"| {r['workers']} | {r['groups_per_call']:g} | {r['prompts_per_step']} | "
                     f"{r['offered_groups_per_second']:.0f} | {r['groups_per_second']:.1f} | "
                     f"{r['driver_cpu_ms_per_group']:.2f} | {r['fresh_length_mean']:.1f} | "
                     f"{r['age_at_training_s']:.2f} | {ph['rollout_wait']:.2f} / {ph['train']:.2f} / "
                     f"{ph['record']:.2f} / {ph['checkpoint']:.2f} |")
    lines += ["", "CPU shares (CPU seconds per wall second; 1.0 = one core; the learner and the generators are load "
                  "generators; machine = all processes, of " + str(os.cpu_count()) + " cores):", "",
              "| workers | groups per call | " + " | ".join(parts) + " |", "|" + "---|" * (len(parts) + 2)]
    for r in results:
        lines.append(f"| {r['workers']} | {r['groups_per_call']:g} | "
                     + " | ".join(f"{r[f'{p} cpu share']:.2f}" for p in parts) + " |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs visible"
    lines += ["", f"machine: {machine}; {args.steps} steps per fleet size, the first 5 excluded; CPU shares are "
                  "CPU seconds per wall second (1.0 = one core busy)"]
    for line in lines:
        print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.json
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "results": results, "printed": lines}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
