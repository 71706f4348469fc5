"""One prompt of the dataset, as a manifest row describes it (schema in docs/configuration.md, "Data")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PROBLEM_TYPES = ("multiple_choice", "numerical", "ocr", "free_form", "localization")


@dataclass
class PromptSample:
    id: str
    question: str
    problem_type: str
    answer: str
    video: Path | None = None  # absolute once loaded (manifest paths are relative to the manifest's folder)
    audio: Path | None = None  # None = the video's own audio track
    options: list[str] = field(default_factory=list)  # multiple choice: ["A. red", "B. green", ...]
    hint: str | None = None
    audio_caption: str | None = None
    stage: int = 1
    cot: str | None = None  # a chain-of-thought target "<think>...</think><answer>...</answer>" for stage-0 SFT
    difficulty: str | None = None  # easy / medium / hard where the generator knows it
