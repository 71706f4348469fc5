"""The learner as Ray actors: one LearnerWorker per rank, driven together through a LearnerGroup.

The driver calls the group; every call goes to all ranks (each trains on its share of the same batch, and
ZeRO needs all ranks in every collective) and rank 0's answer comes back.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from common.affinity import pin_process
from common.metrics import ComponentEndpoint, Sample
from common.node_files import NodePaths

from .config import LearnerConfig
from .distributed import broadcast_from_rank0, free_port
from .feed import FreshFeed, commit
from .learner import Learner, MediaProvider
from .summary import mean_present, step_summary


def replay_seed(run_seed: int, policy_version: int) -> int:
    """The replay service's sampling seed for one learner step: distinct per step, the same in a rerun."""
    return run_seed * 1_000_003 + policy_version


class LearnerWorker:
    """One rank. Constructed cheaply; setup() joins the process group and builds the engine."""

    def __init__(self, cfg: LearnerConfig | dict, model_path: str, rank: int, world_size: int, total_steps: int,
                 media_provider: MediaProvider | None = None, publish_dir: str | None = None,
                 buffer_cfg: dict | None = None, paths: NodePaths | None = None):
        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        pin_process(self.cfg.cpu_affinity, "learner.cpu_affinity")
        # the model folder where this node has it (shipped from the driver's node, or shared)
        self.model_path = str((paths or NodePaths()).path(model_path))
        self.rank, self.world_size = rank, world_size
        self.total_steps = total_steps
        self.media_provider, self.publish_dir = media_provider, publish_dir
        self.learner: Learner | None = None
        self.senders: dict = {}  # medium -> its sending side (rank 0): learner.transport's, and object_store
        self.feed = FreshFeed(buffer_cfg) if buffer_cfg is not None and rank == 0 else None
        self._last_summary: dict = {}  # rank 0's last RL step, what its /metrics shows
        self._stale_dropped = 0
        self._metrics = ComponentEndpoint("learner", lambda: learner_samples(
            self.learner.policy_version, self.learner.step, self._stale_dropped, self._last_summary)
            if self.learner is not None else [])

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the rendezvous: this node's address and a free port on it."""
        host = os.environ.get("AVATAR_LEARNER_HOST") or socket.gethostbyname(socket.gethostname())
        return ("127.0.0.1" if host.startswith("127.") else host), free_port()

    def setup(self, master_addr: str, master_port: int) -> dict:
        self.learner = Learner(self.cfg, self.model_path, total_steps=self.total_steps,
                               media_provider=self.media_provider, rank=self.rank, world_size=self.world_size,
                               master_addr=master_addr, master_port=master_port)
        if self.rank == 0 and self.publish_dir:  # object_store also carries a broadcast that failed
            from .weights import make_sender

            host, medium = self.address()[0], self.cfg.publish_medium
            adapter = self.learner.adapter_config() if medium == "lora" else None
            self.senders = {m: make_sender(m, self.publish_dir, self.cfg.publish_timeout_s, host, adapter)
                            for m in {medium, "object_store"}}
        return self.state()

    def state(self) -> dict:
        return {"rank": self.rank, "step": self.learner.step, "policy_version": self.learner.policy_version}

    def train_step(self, fresh_groups, replay_samples=()) -> dict:
        return self.learner.train_step(fresh_groups, replay_samples)

    def train_from_buffer(self, per_step: int, n_replay: int, max_staleness: int, block_ms: int | None = None,
                          reclaim: bool = False) -> dict:
        """One step on data the learner fetches itself: rank 0 reads `per_step` fresh groups from the stream
        (dropping those older than max_staleness versions) and samples `n_replay` replayed ones, every rank
        trains on its share, rank 0 puts the trained samples into the tiers. Returns a summary of counts, means
        and ids ({"trained": False, ...} when fewer than a batch could be read; what was read stays held)."""
        batch = replay = None
        stale: list = []
        if self.rank == 0:
            if self.feed is None:
                raise RuntimeError("train_from_buffer: this learner was started without a replay service")
            version = self.learner.policy_version
            self.feed.read(per_step, version, max_staleness, block_ms, reclaim)
            batch = self.feed.take(per_step)
            stale = self.feed.take_stale()
            self._stale_dropped += len(stale)
            if batch is not None and n_replay:
                # seeded by the run's seed and the step's version: a run's replay draws repeat with its seed
                replay = self.feed.service.sample(n_replay, None, replay_seed(self.cfg.seed, version), version)
        if self.world_size > 1:  # the batch reaches the other ranks over the learner's process group
            batch, replay = broadcast_from_rank0((batch, replay))
        held = len(self.feed.held) if self.feed is not None else 0
        if batch is None:
            return {"trained": False, "stale": stale, "held": held}
        groups = [g for _, g in batch]
        stats = self.learner.train_step(groups, replay or [])
        if self.rank != 0:
            return {"trained": True}
        commit(self.feed.service, batch, stats, replay_on=n_replay > 0)
        self._last_summary = step_summary(groups, replay or [], stats, self.learner.policy_version)
        return {"trained": True, **self._last_summary, "entry_ids": [e for e, _ in batch], "stale": stale,
                "held": held}

    def sft_step(self, examples) -> dict:
        return self.learner.sft_step(examples)

    def completion_logprobs(self, items) -> list[list[float]]:
        return [lp.tolist() for lp in self.learner.completion_logprobs(items)]

    def publish(self, bump: bool = True, version: int | None = None, receivers: int = 0,
                medium: str | None = None) -> dict | None:
        """Publish through `medium` (learner.transport, or lora for an adapter, unless named) and return its
        announcement, what the rollout workers load (learner/weights/). A broadcast medium sends to `receivers`
        engines on a thread of its own: finish_publish() waits for it."""
        return self.learner.publish(self.senders.get(medium or self.cfg.publish_medium), bump, version, receivers)

    def finish_publish(self) -> dict:
        """Wait until the last publish is delivered (a broadcast: every receiver holds it); raises on a timeout
        or a failed broadcast."""
        sender = self.senders.get(self.cfg.publish_medium)
        return sender.finish() if sender is not None else {}

    def metrics_endpoint(self) -> dict:
        """This rank's /metrics (started on first call; the driver asks rank 0), on its own node."""
        return self._metrics.where()

    def save_checkpoint(self, directory: str) -> str:
        return str(self.learner.save_checkpoint(directory))

    def load_checkpoint(self, directory: str) -> dict:
        self.learner.load_checkpoint(directory)
        return self.state()

    def export_hf(self, out_dir: str) -> str:
        return str(self.learner.export_hf(out_dir))

    def shutdown(self) -> None:
        from .distributed import shutdown_distributed

        if self.learner is not None:
            self.learner.close()
        shutdown_distributed()


def learner_samples(version: int, steps: int, stale_dropped: int, s: dict) -> list[Sample]:
    """Rank 0's series: what it holds, and its last RL step's summary `s` (none before the first RL step or in an
    SFT stage: the per-step series would only show zeros)."""
    out: list[Sample] = [("avatar_policy_version", version, {}), ("avatar_learner_steps_total", steps, {}),
                         ("avatar_stale_dropped_total", stale_dropped, {})]
    if not s:
        return out
    out += [("avatar_learner_step_seconds", s["seconds"], {}), ("avatar_loss", s["loss"], {"term": "total"}),
            ("avatar_clip_fraction", s["clip_fraction"], {}), ("avatar_kl", s["kl"], {}),
            ("avatar_zero_advantage_fraction", s["zero_adv_token_fraction"], {}),
            ("avatar_accuracy", s["accuracy"], {}), ("avatar_reward_mean", s["reward_mean"], {"term": "total"}),
            ("avatar_staleness_versions", s["staleness_max"], {}), ("avatar_hint_rate", s["hint_rate"], {}),
            ("avatar_replay_fraction", s["replay_fraction"], {})]
    out += [("avatar_reward_mean", v, {"term": k}) for k, v in s["reward_terms"].items()]
    out += [("avatar_advantage_abs_mean", mean_present([abs(a) for a in s[f"advantages_{src}"]]), {"source": src})
            for src in ("fresh", "replay")]
    return out


class LearnerGroup:
    """Driver-side handle on `cfg.num_ranks` LearnerWorker actors; total_steps is the stage's length
    (pipeline.steps), which sets the learning-rate warm-up and decay."""

    def __init__(self, cfg: LearnerConfig, model_path: str | Path, *, total_steps: int,
                 media_provider: MediaProvider | None = None,
                 publish_dir: str | Path | None = None, num_cpus_per_rank: float = 1,
                 num_gpus_per_rank: float = 0, rank_options: list[dict] | None = None,
                 buffer_cfg: dict | None = None, paths: NodePaths | None = None):
        import ray

        actor = ray.remote(LearnerWorker)
        base = {"num_cpus": num_cpus_per_rank, "num_gpus": num_gpus_per_rank}
        # rank_options: each rank's own Ray options (its placement-group bundle and what it holds), if any
        self.workers = [
            actor.options(**{**base, **(rank_options[rank] if rank_options else {})})
            .remote(cfg.model_dump(), str(model_path), rank, cfg.num_ranks, total_steps, media_provider,
                    str(publish_dir) if publish_dir else None, buffer_cfg, paths)
            for rank in range(cfg.num_ranks)
        ]
        addr, port = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(addr, port) for w in self.workers])

    def _all(self, method: str, *args):
        import ray

        refs = [ray.put(a) for a in args]  # serialise the batch once for all ranks
        return ray.get([getattr(w, method).remote(*refs) for w in self.workers])[0]

    def train_step(self, fresh_groups, replay_samples=()) -> dict:
        return self._all("train_step", list(fresh_groups), list(replay_samples))

    def train_from_buffer(self, per_step: int, n_replay: int, max_staleness: int, block_ms: int | None = None,
                          reclaim: bool = False) -> dict:
        return self._all("train_from_buffer", per_step, n_replay, max_staleness, block_ms, reclaim)

    def sft_step(self, examples) -> dict:
        return self._all("sft_step", list(examples))

    def completion_logprobs(self, items) -> list[list[float]]:
        return self._all("completion_logprobs", list(items))

    def publish(self, bump: bool = True, version: int | None = None, receivers: int = 0,
                medium: str | None = None) -> dict | None:
        return self._all("publish", bump, version, receivers, medium)

    def finish_publish(self) -> dict:
        import ray

        return ray.get(self.workers[0].finish_publish.remote())

    def save_checkpoint(self, directory: str | Path) -> str:
        return self._all("save_checkpoint", str(directory))

    def load_checkpoint(self, directory: str | Path) -> dict:
        return self._all("load_checkpoint", str(directory))

    def export_hf(self, out_dir: str | Path) -> str:
        return self._all("export_hf", str(out_dir))

    def state(self) -> dict:
        return self._all("state")

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        finally:
            for w in self.workers:
                ray.kill(w)
