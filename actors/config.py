"""Configuration of the rollout workers and their engines."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.affinity import CpuList
from common.config import StrictConfig


class RolloutConfig(StrictConfig):
    engine: Literal["vllm", "hf"] = "vllm"
    num_workers: int = Field(1, ge=1)
    group_size: int = Field(4, ge=1, description="G_on: fresh completions generated per prompt")
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(50, ge=-1)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(2048, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU machines")
    cpu_affinity: CpuList = Field(
        None, description="CPU ids every rollout worker of a node runs on (its threads and vLLM-CPU's OpenMP threads); "
        "None = all. With learner.cpu_affinity, rollout and learning run on disjoint cores as on separate devices")
    max_model_len: int = Field(4096, ge=128)
    load_timeout_s: float = Field(120.0, gt=0)
