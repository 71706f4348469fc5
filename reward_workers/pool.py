"""The RewardWorker pool: Ray actors that score groups while generation goes on.

The rollout workers hand each group to a worker's `score_and_push` (scored, then pushed into the replay
service's fresh stream by the worker itself) and the driver gets a PushReceipt; an evaluation's groups go to
`evaluate`. A worker scores cfg.groups_per_worker groups at a time (threads: the judge is I/O bound), so a slow
judge slows scoring, not generation; the driver bounds the groups in flight (pipeline.max_prompts_in_flight).
RewardPool starts the workers (and the local judge engine when the stage's weights use the judge) and stops
them."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import ray

from buffer_service.records import Trajectory
from common.metrics import ComponentEndpoint, Sample
from common.node_files import NodePaths
from common.testhooks import failpoint
from data.sample import PromptSample

from .config import STAGE_WEIGHTS, RewardConfig
from .judge import Judge, OpenAIJudgeBackend
from .judge_engine import LocalJudgeBackend, start_judge_engine
from .scoring import score_group


def sum_worker_stats(answers) -> dict[str, float]:
    """Reward workers' counters added up (a `*_max` counter takes the largest)."""
    total: dict[str, float] = {}
    for s in answers:
        for k, v in s.items():
            total[k] = max(total.get(k, 0.0), v) if k.endswith("_max") else total.get(k, 0) + v
    return total


def build_judge(cfg: RewardConfig, engine=None) -> Judge | None:
    """The Judge the config describes: the OpenAI-compatible client, or the local engine actor `engine`.
    None when there is no judge to reach (no endpoint, no engine)."""
    jc = cfg.judge
    if jc.backend == "openai":
        return Judge(jc, OpenAIJudgeBackend(jc)) if jc.endpoint else None
    return Judge(jc, LocalJudgeBackend(jc, engine)) if engine is not None else None


def reward_samples(s: dict) -> list[Sample]:
    """A reward worker's series from its counters (stats())."""
    calls = s.get("judge_calls", 0)
    return [("avatar_groups_scored_total", s["groups_scored"], {}),
            ("avatar_judge_requests_total", s.get("judge_requests", 0), {}),
            ("avatar_judge_failures_total", s.get("judge_failures", 0), {}),
            ("avatar_judge_latency_seconds", s.get("judge_latency_s_sum", 0.0) / calls if calls else 0.0, {})]


@dataclass
class PushReceipt:
    """What the driver learns of a group a reward worker scored and pushed: ids and counts, never the group."""
    group_id: str
    prompt_id: str
    entry_id: str | None = None  # the fresh-stream entry; None when nothing new entered (duplicates, errors)
    accepted: int = 0
    duplicates: int = 0  # trajectories the buffer had already seen (a regenerated or rescored group)
    dead_lettered: bool = False  # the record failed validation: in the dead-letter stream, never trained
    error: str | None = None  # scoring raised: nothing was pushed; the caller may score the group again
    judge_failures: int = 0
    seconds: float = 0.0
    worker: int = -1  # the reward worker's index, and its counters after this group (no stats call needed)
    worker_stats: dict = field(default_factory=dict)


# Restartable: a worker that dies fails the calls it held (a RayActorError for the driver, which has the tasks
# generated and scored again: cluster/retry.py) and Ray starts it again with the same arguments.
@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=0)
class RewardWorker:
    def __init__(self, cfg: dict, index: int, judge_engine=None, buffer_cfg: dict | None = None,
                 paths: NodePaths | None = None):
        self.cfg = RewardConfig.model_validate(cfg)
        self.index = index
        self.paths = paths or NodePaths()  # the judge reads the prompt's video: this node's copy
        self.judge = build_judge(self.cfg, judge_engine)
        self._slots = threading.BoundedSemaphore(self.cfg.groups_per_worker)  # the actor has one thread more
        self.counts = {"groups_scored": 0, "groups_failed": 0, "trajectories_scored": 0, "scoring_s_sum": 0.0}
        self.buffer_cfg = buffer_cfg
        self._buffer = None  # this worker's own client of the replay service (Redis), made on first push
        self._buffer_lock = threading.Lock()
        self._metrics = ComponentEndpoint("reward", lambda: reward_samples(self.stats()))

    def score_and_push(self, trajectories: list[Trajectory], sample: PromptSample) -> PushReceipt:
        """Score one group (handed over by a rollout worker as an object reference) and push it into the fresh
        stream through the replay service's atomic push (dedup by trajectory id, R(q), streaks, hints)."""
        with self._slots:
            receipt = PushReceipt(trajectories[0].group_id, sample.id, worker=self.index)
            self._score(trajectories, self.paths.sample(sample), receipt)
            if not receipt.error:
                pushed = self._service().push_group(trajectories)
                failpoint("reward_worker_after_push")
                receipt.entry_id, receipt.accepted = pushed["entry_id"], pushed["accepted"]
                receipt.duplicates, receipt.dead_lettered = pushed["duplicates"], pushed["dead_lettered"]
            receipt.worker_stats = self.stats()
            return receipt

    def evaluate(self, trajectories: list[Trajectory], sample: PromptSample) -> dict[str, float]:
        """Accuracy and format of a greedy completion (held-out evaluation): numbers back, not the text."""
        from .rewards import accuracy_reward, format_reward

        text = trajectories[0].completion_text
        return {"accuracy": accuracy_reward(text, sample), "format": format_reward(text, sample)}

    def _service(self):
        with self._buffer_lock:
            if self._buffer is None:
                if self.buffer_cfg is None:
                    raise RuntimeError("this reward worker was started without a replay service to push to")
                from buffer_service.config import BufferConfig
                from buffer_service.service import ReplayService

                self._buffer = ReplayService(BufferConfig.model_validate(self.buffer_cfg))
            return self._buffer

    def _score(self, trajectories: list[Trajectory], sample: PromptSample, receipt: PushReceipt) -> None:
        """Score the group in place (the judge sees reward.judge.num_frames frames that score_group reads from
        sample.video, once for the group); the outcome goes into the receipt and the worker's counters."""
        started = time.time()
        try:
            score_group(trajectories, sample, self.cfg, self.judge)
        except Exception as e:  # a bad group is reported with its reason, never dropped silently
            receipt.error = f"{type(e).__name__}: {e}"
        receipt.seconds = time.time() - started
        self.counts["groups_failed" if receipt.error else "groups_scored"] += 1
        self.counts["trajectories_scored"] += 0 if receipt.error else len(trajectories)
        self.counts["scoring_s_sum"] += receipt.seconds
        receipt.judge_failures = sum(1 for t in trajectories if "judge" in t.rewards and t.rewards["judge"] is None)

    def stats(self) -> dict[str, float]:
        return {**self.counts, **(self.judge.stats() if self.judge else {})}

    def pid(self) -> int:
        return os.getpid()

    def metrics_endpoint(self) -> dict:
        """This worker's /metrics (started on first call), on its own node."""
        return self._metrics.where()

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


@dataclass
class RewardPool:
    """Driver-side handle of the worker pool: starts the workers (and the judge engine they need), stops them."""

    cfg: RewardConfig
    judge_engine: object | None = None  # a JudgeEngineActor handle; created here when None and needed
    stage: int | None = None  # the job's stage: a judge engine is started only if its weights use the judge
    buffer_cfg: dict | None = None  # the replay service the workers push scored groups into (score_and_push)
    workers: list = field(default_factory=list)
    worker_options: list[dict] | None = None  # each worker's own Ray options (placement bundle, resources), if any
    paths: NodePaths | None = None  # where the workers' nodes have the prompts' media (common/node_files.py)
    _owns_engine: bool = False

    def __post_init__(self):
        jc = self.cfg.judge
        if self.judge_engine is None and jc.backend == "local" and jc.model_path and self._needs_judge():
            # start_judge_engine refuses a text-only judge model that num_frames would show images to
            self.judge_engine = start_judge_engine(jc, self.paths, num_gpus=jc.num_gpus)
            self._owns_engine = True
        options = {"max_concurrency": self.cfg.groups_per_worker + 1}  # +1: stats() answers while busy
        cfg = self.cfg.model_dump()
        self.workers = [
            RewardWorker.options(**options, **(self.worker_options[i] if self.worker_options else {}))
            .remote(cfg, i, self.judge_engine, self.buffer_cfg, self.paths)
            for i in range(self.cfg.num_workers)
        ]

    def shutdown(self) -> None:
        """Close the workers and, when the pool started it, shut the judge engine down (before ray.shutdown)."""
        ray.get([w.close.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._owns_engine and self.judge_engine is not None:
            ray.get(self.judge_engine.shutdown.remote())
            ray.kill(self.judge_engine)
            self.judge_engine = None

    def _needs_judge(self) -> bool:
        if self.cfg.weights is not None:
            weights = [self.cfg.weights]
        elif self.stage is not None:
            weights = [STAGE_WEIGHTS.get(self.stage, {})]
        else:  # stage unknown: any stage's defaults that weight the judge
            weights = list(STAGE_WEIGHTS.values())
        return any(w.get("judge") for w in weights)
