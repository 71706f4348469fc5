"""Rollout workers: generation engines (vLLM, transformers fallback) behind one interface, the shared prompt
queue with leases, and the RolloutWorker Ray actor."""

from .config import RolloutConfig
from .engines import (
    Completion,
    EngineBroken,
    EngineInput,
    GenerationResult,
    HFEngine,
    RolloutEngine,
    Sampling,
    VLLMEngine,
    WeightLoadError,
    create_engine,
)
from .prompt_queue import PromptQueue, PromptTask
from .worker import GroupResult, RolloutWorker, Skipped, rollout_worker_actor

__all__ = [
    "Completion",
    "EngineBroken",
    "EngineInput",
    "GenerationResult",
    "GroupResult",
    "HFEngine",
    "PromptQueue",
    "PromptTask",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutWorker",
    "Sampling",
    "Skipped",
    "VLLMEngine",
    "WeightLoadError",
    "create_engine",
    "rollout_worker_actor",
]
