"""RolloutWorker: builds a prompt's inputs (policy.PromptProcessor, hint as the first system message),
generates G_on completions with behaviour log-probs on its engine, and returns them as a group of
Trajectory records tagged with the engine's policy version (reward fields are left to the reward workers).

Run it as a Ray actor (`rollout_worker_actor()`, restartable). The driver calls `rollout(tasks, scorers)`: every
task's request enters the engine as soon as its prompt is built (vLLM's continuous batch: several calls' requests
share it), and each group goes to a reward worker as soon as its G completions are done, not when the call's last
one is; at most rollout.max_inflight_tasks prompts are in the engine at once, over all calls. A prompt whose
media cannot be read is skipped, counted and logged; the worker lives on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray

from buffer_service.records import Trajectory
from common.affinity import pin_process
from common.metrics import ComponentEndpoint, Sample
from common.node_files import NodePaths
from learner.weights import PULLABLE
from learner.weights import receive as receive_weights
from policy.config import ProcessorConfig
from policy.media import MediaError
from policy.processor import PromptProcessor

from .config import RolloutConfig
from .engines import EngineInput, GenerationResult, Sampling, create_engine
from .tasks import PromptTask

log = logging.getLogger(__name__)


@dataclass
class Skipped:
    key: str
    prompt_id: str
    reason: str


@dataclass
class GroupResult:
    """What a worker hands on for one task: a group of G_on trajectories, or the reason it was skipped."""

    key: str
    prompt_id: str
    trajectories: list[Trajectory] = field(default_factory=list)
    skipped: Skipped | None = None


@dataclass
class Receipt:
    """What the driver gets back for a task: ids and counts. The group itself went from this worker to a reward
    worker as an object reference; `answer` is that reward worker's reply (its PushReceipt, or the evaluation's
    numbers), or `lost` the exception its call raised (the reward worker died, or a bug), for the driver to
    classify. The worker waits for the replies itself, so the driver gets one object per rollout call and never
    borrows a reference owned by a rollout worker (which would be lost with it)."""

    key: str
    prompt_id: str
    completions: int = 0
    tokens: int = 0
    policy_version: int = -1
    skipped: str | None = None  # the reason a task's media could not be read (no group, nothing scored)
    answer: object | None = None
    lost: Exception | None = None


@dataclass
class RolloutReport:
    """A rollout call's answer: a receipt per task, and the worker's counters (so the driver needs no stats
    call per worker per step)."""

    worker_id: str
    receipts: list[Receipt]
    stats: dict = field(default_factory=dict)
    load_seconds: float = 0.0  # weights loaded before this call's generation
    load_error: str | None = None  # the load failed: the worker kept its previous weights


class RolloutWorker:
    def __init__(
        self,
        worker_id: str,
        model_path: str | Path,
        rollout: RolloutConfig,
        processor: ProcessorConfig | None = None,
        dtype: str = "float32",
        seed: int = 0,
        paths: NodePaths | None = None,
        weight_medium: str | None = None,
        lora_rank: int = 8,
    ):
        self.worker_id = worker_id
        self.cfg = rollout
        # the model and the prompts' media where this node has them (shipped from the driver's node, or shared)
        self.paths = paths or NodePaths()
        # the node it runs on (a restarted worker may run on another): in its counters, so history shows it
        self._node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        pin_process(rollout.cpu_affinity, "rollout.cpu_affinity")  # before the engine starts its threads
        self.model_path = self.paths.path(model_path)
        self.engine = create_engine(rollout, self.model_path, dtype=dtype, seed=seed, weight_medium=weight_medium,
                                    lora_rank=lora_rank)
        self.processor = PromptProcessor(
            processor or ProcessorConfig(), self.engine.tokenizer, self.engine.multimodal,
            model_path=self.paths.path(model_path),
        )
        self.counts = {
            "prompts": 0,
            "completions": 0,
            "tokens": 0,
            "skipped_media": 0,
            "groups_scoring": 0,  # handed to reward workers, reply not yet here
            "mixed_version_completions": 0,  # completions whose tokens came from more than one policy version
            "tokens_before_update": 0,  # tokens of those completions sampled by an older version than their last
        }
        # the prompts in the engine, over all rollout calls (released as each request finishes)
        self._inflight = threading.BoundedSemaphore(rollout.max_inflight_tasks)
        self._weights_lock = threading.Lock()  # one weight update at a time, whichever call brings it
        self._counts_lock = threading.Lock()
        # weights that come through the object store are written here, on this worker's node
        self._weights_dir = weights_folder(worker_id)
        self._next_scorer = zlib.crc32(worker_id.encode())  # workers start their round robin at different scorers
        self._metrics = ComponentEndpoint("rollout", lambda: rollout_samples(self._stats(), self.engine.version))

    # generation -------------------------------------------------------------------------------------------
    def generate(self, tasks: list[PromptTask], seed: int | None = None,
                 sampling: dict | None = None) -> list[GroupResult]:
        """One group of cfg.group_size completions per task, in the tasks' order (see rollout for the streaming
        path; tasks with unreadable media are skipped)."""
        results: dict[str, GroupResult] = {}
        for result in self._stream(tasks, seed, sampling):
            results[result.key] = result
        return [results[t.key] for t in tasks]

    def _stream(self, tasks: list[PromptTask], seed: int | None, sampling: dict | None):
        """Yields each task's GroupResult as soon as it is there: skipped ones at once, generated ones as their
        requests finish. Every request enters the engine when its prompt is built, within max_inflight_tasks.
        `sampling` overrides fields of the configured Sampling (e.g. greedy evaluation: n=1, temperature=0).
        Ids derive from the task key, so a task generated again (after a crash) yields the same trajectory ids
        and the replay service drops it as a duplicate."""
        params = Sampling.from_config(self.cfg, seed=seed)
        if sampling:
            params = dataclasses.replace(params, **sampling)
        done: queue.Queue = queue.Queue()  # (task, hinted, future) of finished requests, in finishing order
        submitted = 0
        for task in tasks:
            hint = task.sample.hint if task.use_hint else None
            if task.use_hint and not hint:
                log.warning("prompt %s: hint requested but the sample has none", task.sample.id)
            try:
                built = self.processor.build(self.paths.sample(task.sample), hint)
            except (MediaError, OSError) as exc:
                self._count("skipped_media", 1)
                log.error("worker %s: skipping prompt %s: %s", self.worker_id, task.sample.id, exc)
                yield GroupResult(task.key, task.sample.id, skipped=Skipped(task.key, task.sample.id, str(exc)))
                continue
            while True:  # groups done meanwhile go on first; then a slot (the engine holds max_inflight_tasks)
                while not done.empty():
                    submitted -= 1
                    yield self._group(*done.get())
                if self._inflight.acquire(timeout=0.05):
                    break
            task_params = dataclasses.replace(params, max_new_tokens=task.max_new_tokens) if task.max_new_tokens else params
            try:
                future = self.engine.submit(EngineInput(built.prompt_token_ids, built.media), task_params)
            except BaseException:  # a broken engine: the slot is not taken
                self._inflight.release()
                raise
            future.add_done_callback(lambda f, t=task, h=built.hinted: (self._inflight.release(), done.put((t, h, f))))
            submitted += 1
        for _ in range(submitted):
            yield self._group(*done.get())

    def _group(self, task: PromptTask, hinted: bool, future: Future) -> GroupResult:
        out: GenerationResult = future.result()  # an engine failure raises here, as it did for the whole call
        group_id, now = task.key, time.time()
        trajectories = []
        for i, c in enumerate(out.completions):
            versions = c.token_versions or [self.engine.version]
            mixed = len(set(versions)) > 1
            trajectories.append(Trajectory(
                trajectory_id=f"{group_id}/{i}",
                group_id=group_id,
                prompt_id=task.sample.id,
                prompt_token_ids=out.prompt_token_ids,
                completion_token_ids=c.token_ids,
                behaviour_logprobs=c.logprobs,
                policy_version=min(versions),  # the oldest: what the staleness bound and the metrics use
                token_policy_versions=list(versions) if mixed else None,
                completion_text=c.text,
                hinted=hinted,
                stage=task.sample.stage,
                truncated=c.truncated,
                created_at=now,
            ))
            if mixed:
                self._count("mixed_version_completions", 1)
                self._count("tokens_before_update", sum(v < versions[-1] for v in versions))
        self._count("prompts", 1)
        self._count("completions", len(trajectories))
        self._count("tokens", sum(len(c.token_ids) for c in out.completions))
        return GroupResult(task.key, task.sample.id, trajectories)

    def rollout(self, tasks: list[PromptTask], scorers: list, weights: dict | None = None, evaluate: bool = False,
                seed: int | None = None, sampling: dict | None = None) -> RolloutReport:
        """Generate the tasks' groups and hand each one, as soon as it is done, to a reward worker of `scorers`
        (round robin): `score_and_push` (into the replay service's fresh stream) or, with evaluate, `evaluate`
        (greedy accuracy). Returns receipts and this worker's counters once every group is answered, never the
        groups.

        `weights` (the learner's last announcement: learner/weights/) are loaded first when this worker holds
        another version and the medium keeps the bytes for it (a file, not a broadcast): workers pull the policy
        with their next task, so a publish costs the driver no call per worker. How the requests already in the engine (other calls') take them is
        rollout.weight_update. A load that fails keeps the weights it has (the groups say which version made
        them) and is reported in `load_error`."""
        report = RolloutReport(self.worker_id, [])
        if weights and weights["version"] != self.engine.version and weights["medium"] in PULLABLE:
            with self._weights_lock:
                if weights["version"] != self.engine.version:  # another call may have loaded it meanwhile
                    try:
                        report.load_seconds = self._load_weights(weights)
                    except Exception as exc:  # reported to the driver, which decides
                        report.load_error = f"{type(exc).__name__}: {exc}"
                        log.error("worker %s: %s", self.worker_id, report.load_error)
        by_key, calls = {t.key: t for t in tasks}, []  # calls: (receipt, the reward worker's call)
        for result in self._stream(tasks, seed, sampling):
            if result.skipped is not None:
                report.receipts.append(Receipt(result.key, result.prompt_id, skipped=result.skipped.reason))
                continue
            group = ray.put(result.trajectories)
            scorer = scorers[self._next_scorer % len(scorers)]
            self._next_scorer += 1
            call = scorer.evaluate if evaluate else scorer.score_and_push
            receipt = Receipt(result.key, result.prompt_id, len(result.trajectories),
                              sum(len(t.completion_token_ids) for t in result.trajectories),
                              min(t.policy_version for t in result.trajectories))
            report.receipts.append(receipt)
            calls.append((receipt, call.remote(group, by_key[result.key].sample)))
            self._count("groups_scoring", 1)
        for receipt, ref in calls:
            try:
                receipt.answer = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the driver decides by its type (cluster/retry.py)
                receipt.lost = exc
            self._count("groups_scoring", -1)
        report.stats = self._stats()
        return report

    def _count(self, name: str, change) -> None:
        with self._counts_lock:  # several rollout calls hand groups on at once
            self.counts[name] += change

    # weights and lifecycle ------------------------------------------------------------------------------
    def load_weights(self, weights: dict) -> float:
        """Load a published version (the learner's announcement: its medium, version, checksum and what the
        medium's receiving side needs, learner/weights/); raises WeightLoadError and keeps (or restores) the old
        weights if what arrives is not what was announced or fails to load. Returns the seconds taken."""
        with self._weights_lock:
            return self._load_weights(weights)

    def _load_weights(self, weights: dict) -> float:
        update = receive_weights(weights, self._weights_dir, self.model_path)
        seconds = self.engine.update_weights(update)
        log.info("worker %s: now at policy v%d by %s (%.2f s)", self.worker_id, update.version, weights["medium"],
                 seconds)
        return seconds

    # control calls run in their own thread (the "control" concurrency group), so that the driver's stats and
    # liveness calls answer while a generate or load call runs instead of queueing behind it
    @ray.method(concurrency_group="control")
    def version(self) -> int:
        return self.engine.version

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return self._stats()

    def _stats(self) -> dict:
        engine = self.engine
        return {**self.counts, "generate_seconds": engine.busy_seconds, "version": engine.version,
                "node_id": self._node_id, "updates_in_flight": engine.updates_while_generating,
                "resubmitted": getattr(engine, "resubmitted", 0)}

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="control")
    def metrics_endpoint(self) -> dict:
        """This worker's /metrics (started on first call), on its own node."""
        return self._metrics.where()

    def shutdown(self) -> None:
        """Stop the engine (frees vLLM's shared memory); call before killing the actor or ray.shutdown()."""
        self.engine.shutdown()
        shutil.rmtree(self._weights_dir, ignore_errors=True)


def rollout_samples(c: dict, version: int) -> list[Sample]:
    """A rollout worker's series from its counters and the version its engine holds."""
    return [("avatar_completions_total", c["completions"], {}), ("avatar_rollout_tokens_total", c["tokens"], {}),
            ("avatar_rollout_generate_seconds_total", c["generate_seconds"], {}),
            ("avatar_groups_scoring", c["groups_scoring"], {}), ("avatar_rollout_policy_version", version, {})]


def weights_folder(worker_id: str) -> Path:
    """This process's folder for received weights, in the node's temp folder; folders that processes which are
    gone left behind (a worker killed, so never shut down) are removed first."""
    root = Path(tempfile.gettempdir())
    for old in root.glob("avatar-weights-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    safe_id = "".join(c if c.isalnum() else "_" for c in worker_id)
    folder = root / f"avatar-weights-{safe_id}-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    return folder


def rollout_worker_actor(num_cpus: float = 1, max_restarts: int = 3):
    """The Ray actor class of RolloutWorker, restartable by Ray (the driver hands a restarted worker the current
    weights and the tasks of the call that died with it)."""
    # several rollout calls at once: their requests share the engine's continuous batch (max_inflight_tasks bounds
    # them), and a call waiting for its reward workers' replies holds nothing in the engine
    return ray.remote(num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0, max_concurrency=4,
                      concurrency_groups={"control": 1})(RolloutWorker)
