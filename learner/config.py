"""Configuration of the objective and the DeepSpeed learner. Defaults are AVATAR's released ones."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.affinity import CpuList
from common.config import StrictConfig


class ObjectiveConfig(StrictConfig):
    clip_eps: float = Field(0.2, gt=0)
    kl_beta: float = Field(0.1, ge=0)
    tas_shape: Literal["parabola", "uniform", "linear_decay", "linear_incline", "inverse_parabola"] = "parabola"
    tas_lambda: float = Field(0.3, ge=0)
    vcrs_alpha: float = Field(1.0, ge=0)
    aggregation: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    adv_eps: float = Field(1e-4, gt=0)
    vcrs_std: Literal["none", "replay_batch"] = Field(
        "none", description="replayed advantages divided by: none = 1 (the release's effective behaviour, a "
        "per-device batch of one sample), replay_batch = the std of the replayed batch's rewards (docs/method.md section 3)")
    vcrs_guard_zero_std: bool = Field(
        True, description="std_off 1.0 when all replayed rewards are equal (AVATAR: only for a single sample)"
    )


class LoraConfig(StrictConfig):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    publish: Literal["adapter", "merged"] = Field(
        "adapter", description="what a publish sends under LoRA: adapter = the adapter only (peft format, served by "
        "vLLM as a LoRA request; learner.transport is then unused), merged = the full weights with the adapter "
        "folded in, through learner.transport")


class LearnerConfig(StrictConfig):
    mode: Literal["rl", "sft"] = "rl"
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    lr: float = Field(5e-7, gt=0)
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="linear warm-up over ceil(warmup_ratio * pipeline.steps) steps (the stage's "
        "length, handed to the learner where it is built)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after the linear warm-up: constant, or linear/cosine decay to 0 at pipeline.steps"
    )
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(
        8, ge=1, description="sequences per forward pass (per rank); a step's whole batch is accumulated over as "
        "many micro-batches as it needs, so there is no separate gradient-accumulation setting")
    num_ranks: int = Field(1, ge=1)
    freeze_media_encoders: bool = Field(
        True, description="keep the vision and audio towers of a multimodal policy at their starting weights "
        "(as ms-swift freezes the vision tower by default); under LoRA they get no adapters. Their outputs are "
        "then computed once per prompt under no_grad, cached, and shared by the reference forward")
    media_cache_mb: float = Field(
        1024.0, gt=0, description="bound on the learner's per-prompt media cache (processed media, or the "
        "frozen towers' outputs), least recently used evicted first")
    reference: Literal["frozen_model", "none"] = Field(
        "frozen_model", description="frozen_model: the base weights (adapters disabled under LoRA); none: no KL"
    )
    seed: int = 0
    publish_every: int = Field(1, ge=1, description="publish weights every k optimizer steps")
    transport: Literal["object_store", "shared_file", "gloo", "nccl"] = Field(
        "object_store", description="how published weights reach the rollout workers (learner/weights/, "
        "docs/architecture.md 'Weight media'). object_store: one safetensors file per version whose bytes travel "
        "through Ray's object store, each worker writing its own copy (no shared filesystem needed); shared_file "
        "(alias safetensors): the workers read the learner's file (run_dir on a filesystem every node shares); "
        "gloo / nccl: vLLM's weight-transfer broadcast from learner rank 0 into every engine, nothing on disk (nccl "
        "needs CUDA on the learner and the workers, gloo runs anywhere); a broadcast that fails or times out is sent "
        "through object_store instead. These need rollout.engine vllm")
    publish_timeout_s: float = Field(
        120.0, gt=0, description="bound on one publish: writing the file, or a broadcast until every worker holds it")
    cpu_affinity: CpuList = Field(
        None, description="CPU ids every learner rank of a node runs on (torch's threads = their number); None = all")

    @property
    def publish_medium(self) -> str:
        """The medium a publish goes through (learner/weights/): lora when only the adapter is published."""
        return "lora" if self.lora.enabled and self.lora.publish == "adapter" else self.transport

    @field_validator("transport", mode="before")
    @classmethod
    def _transport_alias(cls, value):
        return "shared_file" if value == "safetensors" else value
