"""Configuration of prompt data: where the manifest is, and how the synthetic dataset is generated."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import StrictConfig

QuestionKind = Literal["last_colour", "count_shapes", "beeps_during", "colour_at_high_tone", "tone_pitch",
                       "localization"]


class SynthConfig(StrictConfig):
    """The synthetic audio-visual dataset: beeps and shapes whose questions need both senses."""

    num_items: int = Field(48, ge=1)
    seed: int = 0
    stage: Literal[0, 1, 2, 3] = 1
    seconds: float = Field(4.0, gt=0.5)
    fps: int = Field(8, ge=2)
    size: int = Field(112, ge=32, description="frame width and height in pixels")
    sample_rate: int = 16000
    shape_scale: float = Field(1.0, gt=0, le=4, description="shape radius in eighths of the frame: larger shapes, "
                               "a stronger colour signal for a tiny model")
    separate_audio_fraction: float = Field(0.25, ge=0, le=1, description="items whose audio is a wav file")
    kinds: list[QuestionKind] | None = Field(
        None, description="the question kinds to generate, in turn (default: the stage's, data/synth.py)")
    short_answers: bool = Field(
        False, description="chain-of-thought targets `<think>I watch and listen.</think><answer>X</answer>`, a "
        "colour answered by its name: one answer token for RL to learn (the demo), not a 60-128-token chain")


class DataConfig(StrictConfig):
    manifest: str | None = Field(None, description="JSONL or Parquet manifest; None = generate synthetic data")
    eval_manifest: str | None = Field(
        None, description="held-out evaluation manifest; its ids are taken out of the training manifest (with a "
        "warning) where they overlap. None = hold out data.eval_fraction of data.manifest")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="with data.manifest and no eval_manifest: the share of prompts held out for "
        "evaluation and never trained on, chosen by a stable hash of the prompt id (independent of row order)")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    allow_outside_paths: bool = Field(
        False, description="allow manifest media paths outside the manifest's folder (absolute, `..`, symlinks)"
    )
    shuffle: bool = True
    seed: int = 0
