"""Configuration of the reward workers and the LLM judge. Stage weights default to the paper's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import StrictConfig

STAGE_WEIGHTS: dict[int, dict[str, float]] = {
    0: {"format": 0.5, "accuracy": 0.5},
    1: {"format": 0.5, "accuracy": 0.5},
    2: {"format": 0.2, "accuracy": 0.4, "self": 0.4},
    3: {
        "format": 0.5,
        "judge": 1.0,
    },  # stage 3 weights are unpublished; the release uses format 0.5 + task 1.0
}



class JudgeConfig(StrictConfig):
    backend: Literal["local", "openai"] = "local"
    model_path: str | None = Field(None, description="local judge model folder (backend local)")
    engine: Literal["vllm", "hf"] = Field("vllm", description="local judge engine (actors.engines)")
    endpoint: str | None = Field(None, description="base URL of an OpenAI-compatible server (backend openai)")
    model_name: str | None = None
    api_key_env: str = "AVATAR_JUDGE_API_KEY"
    max_new_tokens: int = Field(512, ge=1)
    max_model_len: int = Field(4096, ge=128, description="local judge engine context length")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the local judge engine actor")
    num_frames: int = Field(
        8,
        ge=0,
        description="frames of the prompt's video shown to the judge, spread evenly over it (0 = text only; "
        "AVATAR's judge sees 8). The reward worker reads them once per group; a local judge needs a "
        "vision-capable model (Qwen2.5-Omni) for them",
    )
    frame_max_pixels: int = Field(
        448 * 448, ge=28 * 28, description="a frame larger than this many pixels is scaled down (aspect kept)"
    )
    frame_format: Literal["jpeg", "png"] = Field("jpeg", description="how frames are encoded for the judge")
    allow_tiny: bool = Field(
        False,
        description="tests and demos only: with backend local and no model_path, judge with a tiny random "
        "model (the Omni thinker when num_frames > 0) instead of refusing to start",
    )
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)
    retry_backoff_s: float = Field(0.2, ge=0, description="sleep before retry k: k * retry_backoff_s")
    max_concurrency: int = Field(4, ge=1)
    fallback: float = Field(
        0.0, ge=0, le=1, description="score used when the judge fails; the term is marked missing"
    )


class RewardConfig(StrictConfig):
    weights: dict[Literal["format", "accuracy", "self", "judge"], float] | None = Field(
        None, description="term weights; None = the stage's defaults"
    )
    numerical: Literal["binary", "dense"] = "binary"
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    num_workers: int = Field(1, ge=1)
    groups_per_worker: int = Field(4, ge=1, description="groups one RewardWorker scores at a time (threads)")
