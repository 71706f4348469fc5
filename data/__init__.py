"""Prompt data: manifests with validation and the synthetic audio-visual dataset.

Config and record names load eagerly; the rest (torch, Ray, vLLM behind them) on first use, so
that reading a config stays cheap."""

from .config import DataConfig, SynthConfig
from .sample import PROBLEM_TYPES, PromptSample

_LAZY = {
    "ManifestError": "manifest",
    "generate": "synth",
    "load_manifest": "manifest",
    "write_manifest": "manifest",
}

__all__ = [
    "DataConfig",
    "ManifestError",
    "PROBLEM_TYPES",
    "PromptSample",
    "SynthConfig",
    "generate",
    "load_manifest",
    "write_manifest",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
