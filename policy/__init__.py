"""The model side shared by rollout, learner and judge: loading, the tiny-model factory, the processor,
log-prob helpers."""

from .config import ModelConfig, ProcessorConfig, TinyModelConfig
from .logprobs import completion_logprobs, gather_logprobs, token_logprobs
from .media import MediaError, read_audio, read_video
from .model import LoadedPolicy, is_omni, load_policy, resolve_model_path
from .processor import ProcessedPrompt, PromptProcessor
from .tiny import build_tiny_model, ensure_tiny_model

__all__ = [
    "LoadedPolicy", "MediaError", "ModelConfig", "ProcessedPrompt", "ProcessorConfig", "PromptProcessor",
    "TinyModelConfig", "build_tiny_model", "completion_logprobs", "ensure_tiny_model", "gather_logprobs",
    "is_omni", "load_policy", "read_audio", "read_video", "resolve_model_path", "token_logprobs",
]
