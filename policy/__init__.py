"""The model side shared by rollout, learner and judge: loading, the tiny-model factory, the processor,
log-prob helpers.

Config and record names load eagerly; the rest (torch, Ray, vLLM behind them) on first use, so
that reading a config stays cheap."""

from .config import ModelConfig, ProcessorConfig, TinyModelConfig
from .quiet import quiet_talker_defaults

quiet_talker_defaults()  # every process that loads an Omni model imports this package

_LAZY = {
    "LoadedPolicy": "model",
    "MediaError": "media",
    "ProcessedPrompt": "processor",
    "PromptProcessor": "processor",
    "build_tiny_model": "tiny",
    "completion_logprobs": "logprobs",
    "ensure_tiny_model": "tiny",
    "gather_logprobs": "logprobs",
    "is_omni": "model",
    "load_policy": "model",
    "read_audio": "media",
    "read_video": "media",
    "resolve_model_path": "model",
    "token_logprobs": "logprobs",
}

__all__ = [
    "LoadedPolicy",
    "MediaError",
    "ModelConfig",
    "ProcessedPrompt",
    "ProcessorConfig",
    "PromptProcessor",
    "TinyModelConfig",
    "build_tiny_model",
    "completion_logprobs",
    "ensure_tiny_model",
    "gather_logprobs",
    "is_omni",
    "load_policy",
    "read_audio",
    "read_video",
    "resolve_model_path",
    "token_logprobs",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
