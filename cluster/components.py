"""Starting and stopping the job's Ray components: the replay service, the learner ranks, the rollout
workers and the reward pool (with its judge engine). The driver loop only sees these handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import ray

from actors.worker import rollout_worker_actor
from buffer_service.service import ReplayService
from learner.actor import LearnerGroup
from policy.config import TinyModelConfig
from policy.tiny import ensure_tiny_model
from reward_workers.pool import RewardPool
from reward_workers.scoring import stage_weights

from .config import JobConfig
from .prompts import PromptMedia


@dataclass
class Components:
    buffer: object
    learner: LearnerGroup
    workers: list = field(default_factory=list)
    rewards: RewardPool | None = None

    def publish_weights(self, bump: bool = True) -> int:
        """The learner publishes (version + 1, or the current version again with bump=False); every rollout
        worker loads and verifies it. Returns the version."""
        published = self.learner.publish(bump)
        ray.get([w.load_weights.remote(published["location"], published["version"], published["checksum"])
                 for w in self.workers])
        return published["version"]

    def stop(self) -> None:
        """vLLM engines first (inside their actors), then the rest; Ray itself is stopped by the launcher."""
        for w in self.workers:
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception as exc:  # a dead worker has nothing left to stop
                print(f"[driver] rollout worker shutdown: {type(exc).__name__}: {exc}", flush=True)
            ray.kill(w)
        if self.rewards is not None:
            self.rewards.shutdown()
        self.learner.shutdown()
        ray.kill(self.buffer)


def _with_judge_model(cfg: JobConfig, run_dir: Path):
    """A stage that weights the judge with a local backend and no model gets the tiny text judge (the CPU
    demo and tests); real runs name reward.judge.model_path or an endpoint."""
    judge = cfg.reward.judge
    if not stage_weights(cfg.reward, cfg.stage).get("judge") or judge.backend != "local" or judge.model_path:
        return cfg.reward
    path = ensure_tiny_model(TinyModelConfig(kind="text", seed=cfg.seed + 7), Path(cfg.run_dir) / "_models")
    print(f"[job] reward.judge.model_path not set: judging with the tiny random text model {path}", flush=True)
    return cfg.reward.model_copy(update={"judge": judge.model_copy(update={"model_path": str(path)})})


def start_components(cfg: JobConfig, run_dir: Path, model_path: Path, samples, redis_cfg, rl: bool) -> Components:
    buffer_cfg = cfg.buffer.model_copy(update={"redis": redis_cfg})
    buffer = ray.remote(num_cpus=0)(ReplayService).remote(buffer_cfg)
    learner_cfg = cfg.learner.model_copy(update={"seed": cfg.seed, "mode": "rl" if rl else "sft"})
    learner = LearnerGroup(learner_cfg, model_path, media_provider=PromptMedia(samples, cfg.processor, str(model_path)),
                           publish_dir=run_dir / "published", num_cpus_per_rank=0)
    comps = Components(buffer=buffer, learner=learner)
    # Workers are created for SFT too: they run the accuracy evaluations before and after.
    actor = rollout_worker_actor(num_cpus=0, max_restarts=3)
    comps.workers = [
        actor.remote(f"rollout-{i}", str(model_path), cfg.rollout, cfg.processor, None, cfg.model.dtype, cfg.seed + i)
        for i in range(cfg.rollout.num_workers)
    ]
    if rl:
        comps.rewards = RewardPool(_with_judge_model(cfg, run_dir))
    return comps
