"""From a prompt (question, video, audio, optional hint) to the exact model inputs of the Qwen2.5-Omni
thinker, without torchvision (it cannot be installed beside the CPU torch).

What the HF Qwen2.5-Omni processor does, done here with numpy and PIL:
- chat template: optional "Hint: ..." system message first, the system prompt, then the user turn holding
  <|vision_bos|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|> and the question;
- video: frames sampled at `fps` (max/min frames), resized to multiples of 28 within max_pixels (bicubic),
  CLIP-normalised and cut into 2x14x14 patches in Qwen2-VL's order -> pixel_values_videos, video_grid_thw;
- audio (the video's track or a separate file): 16 kHz, Whisper 128-bin log-mel -> input_features;
- the placeholder expansion: one <|VIDEO|> per merged 2x2 patch group, one <|AUDIO|> per audio-encoder frame.

Two layouts of the user turn (docs/architecture.md, "The model side: audio and video layouts"):
- separate items: <|vision_bos|><|VIDEO|>*n<|vision_eos|><|audio_bos|><|AUDIO|>*m<|audio_eos|>, each stream
  with its own positions (a prompt with a separate audio file, or processor.use_audio_in_video off);
- interleaved (processor.use_audio_in_video, a prompt whose audio is its video's own track):
  <|vision_bos|><|audio_bos|> [chunk 1's video tokens, chunk 1's audio tokens] [chunk 2 ...] <|audio_eos|>
  <|vision_eos|>, cut in time chunks exactly as Qwen2.5-Omni's processor does (seconds_per_chunk and
  position_id_per_seconds from the model's config); the media then carry use_audio_in_video=True, which the
  thinker's rope (TMRoPE: video and audio positions on one time axis) and vLLM read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, WhisperFeatureExtractor

from data.sample import PromptSample

from .config import ProcessorConfig
from .media import read_audio, read_video

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2


@dataclass
class ProcessedPrompt:
    prompt_token_ids: list[int]
    text: str  # the templated prompt before placeholder expansion (for logs and engines that take text)
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # the thinker's forward kwargs
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3], the sampled frames before resizing
    audio: np.ndarray | None = None  # float32 mono at the processor's sample rate
    hinted: bool = False


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def video_patches(frames: np.ndarray, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [T, H, W, 3] -> (pixel_values_videos [N, 3*2*14*14], video_grid_thw [1, 3])."""
    t, height, width, _ = frames.shape
    rh, rw = smart_resize(height, width, PATCH * MERGE, min_pixels, max_pixels)
    resized = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames])
    x = (resized.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD  # [T, H, W, C]
    x = x.transpose(0, 3, 1, 2)  # [T, C, H, W]
    if pad := -t % TEMPORAL_PATCH:  # repeat the last frame to fill the temporal patch
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    gt, gh, gw = x.shape[0] // TEMPORAL_PATCH, rh // PATCH, rw // PATCH
    x = x.reshape(gt, TEMPORAL_PATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    # -> (gt, gh/m, gw/m, m, m, C, tp, p, p): merged 2x2 groups stay contiguous, as the vision tower expects
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = x.reshape(gt * gh * gw, 3 * TEMPORAL_PATCH * PATCH * PATCH)
    return torch.from_numpy(np.ascontiguousarray(flat)), torch.tensor([[gt, gh, gw]], dtype=torch.long)


def audio_token_count(mel_frames: int) -> int:
    """Audio-encoder output length for `mel_frames` log-mel frames (two stride-2 stages)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass(frozen=True)
class Chunking:
    """How Qwen2.5-Omni cuts a video and its own audio into time chunks: rope positions per second of media
    (an audio token is 40 ms: 25 per second) and seconds per chunk, from the thinker's config."""

    positions_per_second: float
    seconds_per_chunk: float

    @property
    def positions_per_chunk(self) -> int:
        return int(self.positions_per_second * self.seconds_per_chunk)


def model_chunking(model_path: str | Path) -> Chunking:
    """The chunking of the Qwen2.5-Omni checkpoint in model_path (config.json: thinker_config's
    position_id_per_seconds and seconds_per_chunk). Refuses a config where vLLM would cut differently
    (it times video chunks by vision_config.tokens_per_second)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise ValueError(f"processor.use_audio_in_video: no config.json in {model_path} to read the chunking from")
    config = json.loads(path.read_text())
    thinker = config.get("thinker_config", config)
    per_second, seconds = thinker.get("position_id_per_seconds", 25), thinker.get("seconds_per_chunk", 2)
    vllm_per_second = thinker.get("vision_config", {}).get("tokens_per_second", 25)
    if vllm_per_second != per_second:
        raise ValueError(
            f"processor.use_audio_in_video: {path} has position_id_per_seconds {per_second} but vision_config."
            f"tokens_per_second {vllm_per_second}: transformers and vLLM would place the chunks differently")
    return Chunking(float(per_second), float(seconds))


def chunk_bounds(times: Sequence[float], per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) index ranges of `times` (non-decreasing rope times) cut at multiples of per_chunk, as
    Qwen2.5-Omni's get_chunked_index: the boundary moves one chunk at a time, and the last range always
    closes the list (so an empty list gives one empty range)."""
    bounds, start, chunk = [], 0, 1
    for i, t in enumerate(times):
        if t >= chunk * per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(times)))
    return bounds


def interleave_chunks(grid_thw: Sequence[int], second_per_grid: float, n_audio: int, chunking: Chunking,
                      video_id: int, audio_id: int) -> list[int]:
    """The placeholders between <|audio_bos|> and <|audio_eos|> of an interleaved video: per time chunk,
    that chunk's video tokens (whole temporal patches) then its audio tokens; chunks past the shorter
    stream hold the other stream only."""
    t, h, w = (int(x) for x in grid_thw)
    per_frame = h * w // (MERGE * MERGE)
    video_times = [k * second_per_grid * chunking.positions_per_second for k in range(t) for _ in range(per_frame)]
    video = chunk_bounds(video_times, chunking.positions_per_chunk)
    audio = chunk_bounds(range(n_audio), chunking.positions_per_chunk)
    out: list[int] = []
    for j in range(max(len(video), len(audio))):
        if j < len(video):
            out += [video_id] * (video[j][1] - video[j][0])
        if j < len(audio):
            out += [audio_id] * (audio[j][1] - audio[j][0])
    return out


def prompt_layout(cfg: ProcessorConfig, model_path: str | Path, samples: Sequence[PromptSample]) -> str:
    """One line naming the prompts' audio-video layout, for the run's console."""
    with_video = [s for s in samples if s.video is not None]
    if not cfg.use_audio_in_video:
        return (f"audio as a separate item after the video for all {len(with_video)} prompts with a video "
                "(processor.use_audio_in_video: false)")
    chunking = model_chunking(model_path)
    own = sum(1 for s in with_video if s.audio is None)
    return (f"the video's own audio interleaved with the video in {chunking.seconds_per_chunk:g} s chunks, "
            f"time-aligned positions ({chunking.positions_per_second:g}/s), for {own} of {len(with_video)} prompts "
            f"with a video; {len(with_video) - own} with a separate audio file keep it as a separate item "
            "(processor.use_audio_in_video: true)")


def format_question(sample: PromptSample) -> str:
    if sample.options:
        return sample.question + "\n" + "\n".join(sample.options)
    return sample.question


class PromptProcessor:
    """Builds model inputs for one prompt. Shared by the rollout engines, the learner and the judge so that
    every party sees the same tokens."""

    def __init__(self, cfg: ProcessorConfig, tokenizer: PreTrainedTokenizerBase, multimodal: bool = True,
                 model_path: str | Path | None = None):
        """model_path: the model folder, whose config gives the chunking when cfg.use_audio_in_video."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.multimodal = multimodal
        self.features = WhisperFeatureExtractor(feature_size=128, sampling_rate=cfg.sample_rate, hop_length=160,
                                                n_fft=400, chunk_length=int(math.ceil(cfg.max_audio_seconds)))
        tokens = ("<|vision_bos|>", "<|VIDEO|>", "<|vision_eos|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
        self._special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
        if multimodal:
            missing = [t for t, i in self._special.items() if i is None or i == tokenizer.unk_token_id]
            if missing:
                raise ValueError(f"tokenizer lacks the Qwen2.5-Omni special tokens {missing}")
        self.chunking: Chunking | None = None
        if multimodal and cfg.use_audio_in_video:
            if model_path is None:
                raise ValueError("processor.use_audio_in_video needs the model folder (its config gives the chunking)")
            self.chunking = model_chunking(model_path)

    def messages(self, sample: PromptSample, hint: str | None, user_prefix: str = "") -> list[dict]:
        msgs = []
        if hint:
            msgs.append({"role": "system", "content": f"Hint: {hint}"})
        msgs.append({"role": "system", "content": self.cfg.system_prompt})
        msgs.append({"role": "user", "content": user_prefix + format_question(sample)})
        return msgs

    def template(self, messages: list[dict]) -> str:
        """ChatML, as Qwen's template renders it (text content only)."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n"

    def build(self, sample: PromptSample, hint: str | None = None) -> ProcessedPrompt:
        if not self.multimodal or sample.video is None:
            text = self.template(self.messages(sample, hint))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return ProcessedPrompt(prompt_token_ids=ids, text=text, hinted=bool(hint))

        limit = int(self.cfg.max_media_mb * 2**20)
        frames, _ = read_video(sample.video, self.cfg.fps, self.cfg.min_frames, self.cfg.max_frames,
                               self.cfg.max_pixels, limit)
        pixel_values, grid = video_patches(frames, self.cfg.min_pixels, self.cfg.max_pixels)
        audio_path = sample.audio if sample.audio is not None else sample.video
        audio = read_audio(audio_path, self.cfg.sample_rate, self.cfg.max_audio_seconds, limit)
        feats = self.features(audio, sampling_rate=self.cfg.sample_rate, return_attention_mask=True,
                              padding="longest", truncation=False, return_tensors="pt")
        mel_frames = int(feats["attention_mask"].sum())
        n_video = int(grid.prod()) // (MERGE * MERGE)
        n_audio = audio_token_count(mel_frames)
        second_per_grid = TEMPORAL_PATCH / self.cfg.fps
        video, audio_tok = self._special["<|VIDEO|>"], self._special["<|AUDIO|>"]

        interleave = self.chunking is not None and sample.audio is None  # only the video's own track
        if interleave:
            prefix = "<|vision_bos|><|VIDEO|><|vision_eos|>"
            chunks = interleave_chunks(grid[0].tolist(), second_per_grid, n_audio, self.chunking, video, audio_tok)
            expand = {video: [self._special["<|audio_bos|>"], *chunks, self._special["<|audio_eos|>"]]}
        else:
            prefix = "<|vision_bos|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
            expand = {video: [video] * n_video, audio_tok: [audio_tok] * n_audio}
        text = self.template(self.messages(sample, hint, user_prefix=prefix))
        ids = self._expand(self.tokenizer(text, add_special_tokens=False)["input_ids"], expand)
        media = {
            "pixel_values_videos": pixel_values,
            "video_grid_thw": grid,
            "video_second_per_grid": torch.tensor([second_per_grid], dtype=torch.float32),
            "input_features": feats["input_features"],
            "feature_attention_mask": feats["attention_mask"].long(),
        }
        if interleave:  # read by the thinker's rope (get_rope_index) and by vLLM (mm_processor_kwargs)
            media["use_audio_in_video"] = True
        return ProcessedPrompt(prompt_token_ids=ids, text=text, media=media, frames=frames, audio=audio,
                               hinted=bool(hint))

    @staticmethod
    def _expand(ids: list[int], expand: dict[int, list[int]]) -> list[int]:
        """ids with each placeholder token in `expand` replaced by its tokens."""
        out: list[int] = []
        for i in ids:
            out.extend(expand.get(i, [i]))
        return out

    def target_ids(self, completion: str) -> list[int]:
        """Token ids of an assistant completion followed by the end-of-turn token (SFT targets)."""
        return self.tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
