"""Starting and stopping the job's Ray components: the replay service, the learner ranks, the rollout
workers and the reward pool (with its judge engine). The driver loop only sees these handles."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from actors.worker import rollout_worker_actor
from buffer_service.service import ReplayService
from common.node_files import NodePaths, remove_job_copies, ship_folder
from learner.actor import LearnerGroup
from learner.weights import COLLECTIVE
from policy.config import TinyModelConfig
from policy.tiny import ensure_tiny_model
from reward_workers.judge_engine import start_judge_engine
from reward_workers.pool import RewardPool
from reward_workers.scoring import stage_weights

from .availability import Availability
from .config import JobConfig
from .metrics import MetricsTargets
from .placement import Placement, reserve
from .prompts import PromptMedia

log = logging.getLogger(__name__)


@dataclass
class Components:
    buffer: object
    learner: LearnerGroup
    workers: list = field(default_factory=list)
    rewards: RewardPool | None = None
    judge_engine: object | None = None  # started here (placed with the job); the pool only uses it
    weights: dict | None = None  # the last publish's announcement (learner/weights/), for restarted workers
    transport: str = "object_store"  # the medium a publish goes through (learner.transport, or lora)
    placement: Placement | None = None
    availability: Availability | None = None  # which rollout workers answer (the driver's Flight keeps it)
    metrics: MetricsTargets | None = None  # where Prometheus finds each component's endpoint
    paths: NodePaths = field(default_factory=NodePaths)  # the folders shipped to the nodes (common/node_files.py)

    @property
    def unavailable(self) -> set[int]:
        """Rollout workers (by index) whose calls died, not back yet."""
        return set(self.availability.away) if self.availability is not None else set()

    def available_workers(self) -> list:
        return [w for i, w in enumerate(self.workers) if i not in self.unavailable]

    def actors_by_name(self) -> dict[str, tuple[str, object]]:
        """Every component that serves /metrics: name -> (role, actor handle); rollout workers that are away
        (their node gone) left out."""
        found = {"replay": ("replay", self.buffer), "learner": ("learner", self.learner.workers[0])}
        found.update({f"rollout-{i}": ("rollout", w) for i, w in enumerate(self.workers) if i not in self.unavailable})
        if self.rewards is not None:
            found.update({f"reward-{i}": ("reward", w) for i, w in enumerate(self.rewards.workers)})
        return found

    def refresh_metrics_targets(self, timeout_s: float = 10.0, only: set[str] | None = None) -> None:
        """Ask every component (or those named in `only`) for its /metrics endpoint (a restarted one serves on a
        new port, maybe on another node) and rewrite the target file; one that does not answer in time
        (restarting, its node gone) keeps its last entry."""
        if self.metrics is None:
            return
        asked = {name: (role, actor.metrics_endpoint.remote()) for name, (role, actor) in self.actors_by_name().items()
                 if only is None or name in only}
        ready, _ = ray.wait([ref for _, ref in asked.values()], num_returns=len(asked), timeout=timeout_s)
        for name, (role, ref) in asked.items():
            if ref not in ready:
                log.info("metrics: %s did not say where its endpoint is within %.0f s", name, timeout_s)
                continue
            try:
                self.metrics.update(name, role, ray.get(ref))
            except ray.exceptions.RayError as exc:
                log.info("metrics: %s: %s", name, type(exc).__name__)
        self.metrics.write()

    def publish_weights(self, bump: bool = True, version: int | None = None, wait: bool = True) -> int:
        """The learner publishes (version + 1, the current version again with bump=False, or `version`).
        Returns the version. With wait, every rollout worker loads and verifies it now (an evaluation, a resumed
        job); without, the workers pull it with their next rollout call (the driver hands `weights` along), so
        a publish costs the driver no call per worker. A broadcast medium (gloo, nccl) reaches every worker that
        answers now, whatever `wait` says (_broadcast)."""
        if self.transport in COLLECTIVE:
            self.weights = self._broadcast(self.available_workers(), bump, version)
            return self.weights["version"]
        self.weights = self.learner.publish(bump, version)
        if wait:
            loads = {w: self._load(w) for w in self.workers}
            for worker, ref in loads.items():
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:  # restarting: it gets these weights once it is back
                    self.ready_worker(worker)
        return self.weights["version"]

    def _load(self, worker):
        return worker.load_weights.remote(self.weights)

    def _broadcast(self, workers: list, bump: bool = True, version: int | None = None) -> dict:
        """A broadcast publish to `workers`, in a group of their own with the learner (a restarted worker: a
        group of two). Bounded by learner.publish_timeout_s; when the broadcast fails or a worker does not hold
        what was announced, the version goes through object_store instead (to the workers that lack it; the
        others pull nothing, they hold it) and the reason is logged. Returns the announcement the workers hold."""
        announced = self.learner.publish(bump, version, len(workers))
        loads = [w.load_weights.remote({**announced, "rank_offset": 1 + i}) for i, w in enumerate(workers)]
        why = None
        try:
            self.learner.finish_publish()
        except ray.exceptions.RayTaskError as exc:
            why = str(exc).strip().splitlines()[-1][:300]
        ready, _ = ray.wait(loads, num_returns=len(loads), timeout=announced["timeout_s"] + 10)
        missed = []
        for worker, ref in zip(workers, loads):
            try:
                if ref not in ready:
                    raise TimeoutError("still receiving")
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 (each worker's reason goes to the log)
                missed.append(worker)
                why = why or f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        if not missed:
            return announced
        log.warning(f"weights v{announced['version']}: the {announced['medium']} broadcast did not reach "
                    f"{len(missed)} of {len(workers)} rollout workers ({why}); sending it through object_store")
        self.weights = self.learner.publish(False, None, 0, "object_store")
        for worker in missed:
            try:
                ray.get(self._load(worker))
            except ray.exceptions.RayActorError:  # restarting: it gets the version once it is back
                pass
        return self.weights

    def catch_up(self, worker, version: int) -> bool:
        """A worker back (restarted by Ray, maybe on a node that joined) holding `version`: with a broadcast
        medium the group of the last publish is gone, so the current version goes to it in a group of its own.
        Returns whether it did; with a file medium the worker pulls the announcement with its next call."""
        if self.weights is None or version == self.weights["version"] or self.weights["medium"] not in COLLECTIVE:
            return False
        self.weights = self._broadcast([worker], bump=False)
        log.info(f"rollout worker back at v{version}: sent it policy v{self.weights['version']} "
                 f"({self.weights['medium']})")
        return True

    def ready_worker(self, worker, timeout_s: float = 300.0) -> None:
        """Wait until a rollout worker that Ray is restarting answers again, then hand it the current weights
        (a restarted worker comes back with the base weights). Raises if it does not come back."""
        version = _answer_once_back(worker.version, time.monotonic() + timeout_s)
        if not self.catch_up(worker, version) and self.weights is not None and version != self.weights["version"]:
            ray.get(self._load(worker))
            log.info(f"restarted rollout worker reloaded policy v{self.weights['version']}")
        self.refresh_metrics_targets()

    def ready_reward_workers(self, timeout_s: float = 300.0) -> None:
        """Wait until every reward worker answers (Ray restarts a dead one); raises if one does not come back."""
        deadline = time.monotonic() + timeout_s
        for worker in self.rewards.workers:
            _answer_once_back(worker.stats, deadline)
        self.refresh_metrics_targets()

    def stop(self) -> None:
        """vLLM engines first (inside their actors), then the rest; Ray itself is stopped by the launcher."""
        for i, w in enumerate(self.workers):
            try:
                if i not in self.unavailable:  # a call to a worker whose node is gone would wait for it
                    ray.get(w.shutdown.remote(), timeout=60)
            except Exception as exc:  # a dead worker has nothing left to stop
                log.info(f"rollout worker shutdown: {type(exc).__name__}: {exc}")
            ray.kill(w)
        if self.rewards is not None:
            self.rewards.shutdown()
        if self.judge_engine is not None:
            ray.get(self.judge_engine.shutdown.remote(), timeout=60)
            ray.kill(self.judge_engine)
        self.learner.shutdown()
        ray.kill(self.buffer)
        if self.paths.folders:
            try:
                log.info("removed %d shipped folder copies from the nodes", remove_job_copies())
            except Exception as exc:  # a node that is gone took its copy with it
                log.warning(f"removing the shipped folders' copies: {type(exc).__name__}: {str(exc)[:300]}")
        if self.placement is not None and self.placement.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement.group)


def on_driver_node():
    """The scheduling strategy that keeps an actor on the driver's own node (the head when the job is attached
    to a cluster: the driver connects to the head's raylet). The replay service goes there: next to the
    redis-server the driver may have started on 127.0.0.1, and not on a worker node whose loss would take the
    buffer with it (it asks for no resources, so Ray would put it on any node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _answer_once_back(method, deadline: float):
    """The answer of an argument-less actor method, calling again while Ray restarts the actor (until deadline)."""
    while True:
        try:
            return ray.get(method.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _with_judge_model(cfg: JobConfig, run_dir: Path):
    """The reward config with a judge model to start. A stage that weights the judge with backend local and no
    model_path is refused when the config loads (cluster.config), unless reward.judge.allow_tiny opts into the
    tiny random judge of tests and demos: the Omni thinker when it is shown frames (it sees them), else the
    text model. Nothing is substituted otherwise."""
    judge = cfg.reward.judge
    if not stage_weights(cfg.reward, cfg.stage).get("judge") or judge.backend != "local" or judge.model_path:
        return cfg.reward
    if not judge.allow_tiny:  # load_config refuses this already; a config built in code gets the same answer
        raise ValueError("reward.judge.model_path: not set, and reward.judge.allow_tiny is false")
    kind = "omni" if judge.num_frames else "text"
    path = ensure_tiny_model(TinyModelConfig(kind=kind, seed=cfg.seed + 7), Path(cfg.run_dir) / "_models")
    log.warning("reward.judge.allow_tiny: judging with the tiny random %s model %s (tests and demos only)", kind, path)
    return cfg.reward.model_copy(update={"judge": judge.model_copy(update={"model_path": str(path)})})


def learner_args(cfg: JobConfig, rl: bool) -> dict:
    """What the learner is built from: its section (with the job's seed and the stage's mode) and the stage's
    length, pipeline.steps, the one step count (it sets the learning-rate warm-up and decay)."""
    return {"cfg": cfg.learner.model_copy(update={"seed": cfg.seed, "mode": "rl" if rl else "sft"}),
            "total_steps": cfg.pipeline.steps}


def node_paths(cfg: JobConfig, folders: list[Path], samples) -> NodePaths:
    """What the components read from the driver's node (the model folders, the folder holding every prompt's
    media) and how it reaches them: read in place on a one-node cluster or under storage.shared_paths, else
    shipped through the object store (common/node_files.py)."""
    if sum(1 for n in ray.nodes() if n["Alive"]) < 2:
        return NodePaths()
    media = [str(p) for s in samples for p in (s.video, s.audio) if p is not None]
    if media:
        common = Path(os.path.commonpath(media))  # the smallest folder holding every prompt's media
        folders = [*folders, common if common.is_dir() else common.parent]
    shared = [Path(p) for p in cfg.storage.shared_paths]
    shipped = []
    for folder in dict.fromkeys(folders):
        if any(folder == s or s in folder.parents for s in shared):
            continue
        shipped.append(ship_folder(folder, cfg.storage.max_ship_mb))
    return NodePaths(tuple(shipped))


def start_components(cfg: JobConfig, run_dir: Path, model_path: Path, samples, redis_cfg, rl: bool,
                     eval_samples=()) -> Components:
    reward_cfg = _with_judge_model(cfg, run_dir) if rl else cfg.reward
    needs_judge = rl and bool(stage_weights(cfg.reward, cfg.stage).get("judge")) and reward_cfg.judge.backend == "local"
    placement = reserve(cfg, needs_judge)
    # absolute: a relative path means another folder on a node whose working folder is another
    model_path = Path(os.path.abspath(model_path))
    judge_model = []
    if needs_judge and reward_cfg.judge.model_path:
        judge_model = [Path(os.path.abspath(reward_cfg.judge.model_path))]
        reward_cfg = reward_cfg.model_copy(update={"judge": reward_cfg.judge.model_copy(
            update={"model_path": str(judge_model[0])})})
    paths = node_paths(cfg, [model_path, *judge_model], [*samples, *eval_samples])
    buffer_cfg = cfg.buffer.model_copy(update={"redis": redis_cfg})
    buffer = ray.remote(num_cpus=0)(ReplayService).options(scheduling_strategy=on_driver_node()).remote(buffer_cfg)
    learner = LearnerGroup(buffer_cfg=buffer_cfg.model_dump() if rl else None,
        **learner_args(cfg, rl), model_path=model_path,
        media_provider=PromptMedia(samples, cfg.processor, str(model_path), paths), paths=paths,
        publish_dir=run_dir / "published", num_cpus_per_rank=0, num_gpus_per_rank=0,
        rank_options=[placement.options("learner", r) for r in range(cfg.learner.num_ranks)])
    comps = Components(buffer=buffer, learner=learner, placement=placement, paths=paths,
                       transport=cfg.learner.publish_medium)
    # Workers are created for SFT too: they run the accuracy evaluations before and after.
    actor = rollout_worker_actor(num_cpus=0, max_restarts=3)
    comps.workers = [
        actor.options(**placement.options("rollout", i))
        .remote(f"rollout-{i}", str(model_path), cfg.rollout, cfg.processor, cfg.model.dtype, cfg.seed + i, paths,
                cfg.learner.publish_medium, cfg.learner.lora.r)
        for i in range(cfg.rollout.num_workers)
    ]
    # Reward workers for SFT too: they score the evaluations (the groups go to them, not to the driver).
    judge_engine = None
    if needs_judge and reward_cfg.judge.model_path:
        # refuses a text-only judge model that num_frames would show images to
        judge_engine = start_judge_engine(reward_cfg.judge, paths, **placement.options("judge", 0))
    comps.rewards = RewardPool(reward_cfg, judge_engine=judge_engine, stage=cfg.stage,
                               buffer_cfg=buffer_cfg.model_dump(), paths=paths,
                               worker_options=[placement.options("reward", i) for i in range(reward_cfg.num_workers)])
    comps.judge_engine = judge_engine
    return comps
