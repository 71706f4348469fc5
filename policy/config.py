"""Configuration of the model side: which model, how it is built when tiny, how media become tensors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import StrictConfig

SYSTEM_PROMPT = (
    "You are a helpful assistant who watches the video and listens to its audio. "
    "Think step by step inside <think></think>, numbering your steps, then give the final answer "
    "inside <answer></answer>."
)



class TinyModelConfig(StrictConfig):
    """A random-weight model built offline (nothing is downloaded)."""

    kind: Literal["omni", "text"] = "omni"
    vocab_size: int = Field(1024, ge=300, description="size of the byte-level BPE trained offline")
    hidden_size: int = Field(64, ge=32)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    num_kv_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(128, ge=8)
    max_position_embeddings: int = Field(4096, ge=256)
    seed: int = 0


class ModelConfig(StrictConfig):
    path: str | None = Field(None, description="local folder of a Hugging Face checkpoint (e.g. Qwen2.5-Omni-7B)")
    tiny: TinyModelConfig | None = Field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16"] = "float32"


class ProcessorConfig(StrictConfig):
    """How a prompt becomes model inputs; defaults follow the release (docs/method.md section 8) (16 frames at 224x224, 16 kHz audio)."""

    system_prompt: str = SYSTEM_PROMPT
    fps: float = Field(2.0, gt=0)
    max_frames: int = Field(16, ge=2)
    min_frames: int = Field(2, ge=2)
    max_pixels: int = Field(224 * 224, ge=28 * 28)
    min_pixels: int = Field(28 * 28, ge=28 * 28)
    sample_rate: int = 16000
    max_audio_seconds: float = Field(30.0, gt=0)
    max_media_mb: float = Field(2048.0, gt=0, description="a larger media file is rejected before decoding (skipped, counted)")
    use_audio_in_video: bool = Field(
        False, description="a prompt whose audio is its video's own track gets it interleaved with the video in "
        "time chunks, with Qwen2.5-Omni's time-aligned positions (TMRoPE), as the release trains; a prompt with "
        "a separate audio file keeps it as its own item after the video (docs/architecture.md, 'The model side')")
