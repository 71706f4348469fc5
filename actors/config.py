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
    max_inflight_tasks: int = Field(
        64, ge=1, description="prompts a rollout worker holds in its engine at once, over all its rollout calls "
        "(G completions each; enough to keep vLLM's continuous batch full). More wait in the worker")
    weight_update: Literal["between_requests", "in_flight", "abort"] = Field(
        "between_requests", description="how a rollout engine takes new weights: between_requests (requests in "
        "flight finish on the old weights, new ones wait), in_flight (requests pause mid-completion and go on with "
        "the new weights; each token records its version), abort (requests in flight are aborted and submitted "
        "again, counted)")
    clear_kv_cache_on_update: bool = Field(
        False, description="in_flight: drop the KV and prefix caches at each update (requests in flight recompute "
        "their prefix with the new weights). The other modes always clear them")
