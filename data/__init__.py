"""Prompt data: manifests with validation and the synthetic audio-visual dataset."""

from .config import DataConfig, SynthConfig
from .manifest import ManifestError, load_manifest, write_manifest
from .sample import PROBLEM_TYPES, PromptSample
from .synth import generate

__all__ = ["PROBLEM_TYPES", "DataConfig", "ManifestError", "PromptSample", "SynthConfig", "generate",
           "load_manifest", "write_manifest"]
