"""Loading a policy (the thinker of Qwen2.5-Omni, or a text-only causal LM) from a local folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

from .config import ModelConfig
from .tiny import ensure_tiny_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedPolicy:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    path: Path
    multimodal: bool


def is_omni(path: str | Path) -> bool:
    return AutoConfig.from_pretrained(path).model_type in ("qwen2_5_omni", "qwen2_5_omni_thinker")


def resolve_model_path(cfg: ModelConfig, cache_dir: str | Path) -> Path:
    """The folder to load: the configured path, or the tiny model built (once) under cache_dir."""
    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: no config.json in {path} (expected a Hugging Face model folder)")
        return path
    if cfg.tiny is None:
        raise ValueError("model: set either model.path (a local checkpoint) or model.tiny (a tiny random model)")
    return ensure_tiny_model(cfg.tiny, cache_dir)


def load_policy(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu") -> LoadedPolicy:
    """Load model and tokenizer. For Qwen2.5-Omni folders (real or tiny) only the thinker is loaded: the
    talker (speech output) plays no part in reasoning RL."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    torch_dtype = DTYPES[dtype]
    if config.model_type == "qwen2_5_omni":
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path, config=config.thinker_config, key_mapping={r"^thinker\.": ""}, dtype=torch_dtype
        )
        multimodal = True
    elif config.model_type == "qwen2_5_omni_thinker":
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
        multimodal = True
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        multimodal = False
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedPolicy(model=model.to(device), tokenizer=tokenizer, path=path, multimodal=multimodal)
