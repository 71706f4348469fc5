"""Rollout workers: generation engines (vLLM, transformers fallback) behind one interface, the PromptTask the
driver hands out, and the RolloutWorker Ray actor.

Config and record names load eagerly; the rest (torch, Ray, vLLM behind them) on first use, so
that reading a config stays cheap."""

from .config import RolloutConfig

_LAZY = {
    "Completion": "engines",
    "EngineBroken": "engines",
    "EngineInput": "engines",
    "GenerationResult": "engines",
    "GroupResult": "worker",
    "HFEngine": "engines",
    "PromptTask": "tasks",
    "RolloutEngine": "engines",
    "RolloutWorker": "worker",
    "Sampling": "engines",
    "Skipped": "worker",
    "VLLMEngine": "engines",
    "WeightLoadError": "engines",
    "create_engine": "engines",
    "rollout_worker_actor": "worker",
}

__all__ = [
    "Completion",
    "EngineBroken",
    "EngineInput",
    "GenerationResult",
    "GroupResult",
    "HFEngine",
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


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
