"""The local judge: a rollout engine (actors.engines) in its own Ray actor, and the Judge backend that calls it.

A vision-capable judge model (a Qwen2.5-Omni checkpoint, or the tiny Omni thinker) sees the frames: the
`image_url` parts of a request (data: URLs, as the OpenAI backend sends them) are decoded and given to the
engine as one video item (pixel_values_videos + video_grid_thw, policy.processor's patches, with one
<|VIDEO|> placeholder per merged patch group), greedy. A text-only judge model (e.g. Qwen2) is refused at
engine start when reward.judge.num_frames > 0 (check_judge_model), and a call that carries images anyway fails
with the reason instead of judging blind."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError

from common.node_files import NodePaths

from .config import JudgeConfig
from .judge import JudgeError, Messages

log = logging.getLogger(__name__)

VISION_PREFIX = "<|vision_bos|><|VIDEO|><|vision_eos|>"
SECONDS_PER_FRAME = 0.5  # nominal spacing of the frames, for the thinker's temporal positions


def check_judge_model(model_path: str | Path, num_frames: int) -> bool:
    """Whether the judge model at model_path takes images (a Qwen2.5-Omni checkpoint). Raises ValueError
    naming the keys to change when it is text-only and num_frames > 0, or when the folder holds no model
    config."""
    from policy.model import is_omni

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"reward.judge.model_path: no config.json in {path} (expected a Hugging Face model folder)"
        )
    vision = is_omni(path)
    if num_frames > 0 and not vision:
        raise ValueError(
            f"reward.judge.num_frames is {num_frames} but the judge model at {path} is text-only: it cannot "
            "see the frames. Set reward.judge.num_frames: 0 (the judge then reads text only), or "
            "reward.judge.model_path to a vision-capable model (a Qwen2.5-Omni checkpoint), or serve a "
            "vision-language judge (e.g. InternVL3 with `vllm serve`) and use reward.judge.backend: openai"
        )
    return vision


def image_count(messages: Messages) -> int:
    """The image_url parts of a conversation."""
    return sum(
        sum(1 for p in m["content"] if p.get("type") == "image_url")
        for m in messages
        if isinstance(m["content"], list)
    )


def text_only(messages: Messages) -> Messages:
    """Messages with list contents flattened to their text parts."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if p.get("type") == "text")
        out.append({"role": m["role"], "content": content})
    return out


def decode_image_url(url: str):
    """The RGB uint8 array [H, W, 3] of a data: URL (image/png or image/jpeg, base64). Raises ValueError."""
    import numpy as np
    from PIL import Image

    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError(f"the local judge takes images as base64 data: URLs, got {url[:40]!r}")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            return np.asarray(image.convert("RGB"))
    except (binascii.Error, OSError) as exc:
        raise ValueError(f"an image of the request cannot be decoded ({exc})") from None


def vision_input(messages: Messages, tokenizer, max_pixels: int):
    """One judge conversation as the Omni thinker's input (actors.engines.EngineInput): ChatML text as
    policy.PromptProcessor renders it, every image of the conversation as one video item placed before the
    text of the message holding them, its <|VIDEO|> placeholder expanded to the item's token count."""
    import numpy as np
    import torch
    from PIL import Image

    from actors.engines import VIDEO_TOKEN, EngineInput
    from policy.processor import MERGE, TEMPORAL_PATCH, video_patches

    frames, rendered = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            text = "\n".join(p["text"] for p in content if p.get("type") == "text")
            urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
            images = [decode_image_url(u) for u in urls]
            if images and not frames:
                text = VISION_PREFIX + text
            frames.extend(images)
            content = text
        rendered.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
    ids = tokenizer("".join(rendered) + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    if not frames:
        return EngineInput(ids)
    h, w = frames[0].shape[:2]  # one video: frames of another size are brought to the first one's
    frames = [f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h))) for f in frames]
    pixels, grid = video_patches(np.stack(frames), 28 * 28, max_pixels)
    n_video = int(grid.prod()) // (MERGE * MERGE)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    expanded: list[int] = []
    for i in ids:
        expanded.extend([i] * (n_video if i == video_id else 1))
    media = {
        "pixel_values_videos": pixels,
        "video_grid_thw": grid,
        "video_second_per_grid": torch.tensor([TEMPORAL_PATCH * SECONDS_PER_FRAME], dtype=torch.float32),
    }
    return EngineInput(expanded, media)


def start_judge_engine(jc: JudgeConfig, paths: NodePaths | None = None, **actor_options):
    """The JudgeEngineActor for reward.judge (backend local, model_path set), after checking on this side that
    the model can see what num_frames asks it to (a clear error here rather than an actor that dies). `paths`:
    where the engine's node has the model folder (common/node_files.py)."""
    check_judge_model(jc.model_path, jc.num_frames)
    return JudgeEngineActor.options(**actor_options).remote(
        jc.model_path, jc.max_model_len, jc.engine, num_frames=jc.num_frames, max_pixels=jc.frame_max_pixels,
        paths=paths,
    )


# Restartable: an engine that dies is started again by Ray; calls meanwhile fail and the judge falls back
# (counted, the term marked missing).
@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=0)
class JudgeEngineActor:
    """Owns the judge engine (actors.engines: vLLM, or the transformers fallback); one per cluster, shared by
    every RewardWorker. Greedy. A vision-capable model gets the requests' images as pixel inputs; a text-only
    one is refused when num_frames > 0."""

    def __init__(
        self,
        model_path: str,
        max_model_len: int,
        engine: str,
        num_frames: int,
        max_pixels: int,
        paths: NodePaths | None = None,
    ):
        """The settings are reward.judge's (start_judge_engine passes them)."""
        from actors.config import RolloutConfig
        from actors.engines import VIDEO_TOKEN, create_engine

        model_path = str((paths or NodePaths()).path(model_path))  # this node's copy, when shipped
        self.vision = check_judge_model(model_path, num_frames)
        cfg = RolloutConfig(engine=engine, max_model_len=max_model_len)
        self.engine = create_engine(cfg, model_path)
        self.max_pixels = max_pixels
        self._video_id = self.engine.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) if self.vision else None
        # what the engine was given: requests, those with images, images, and the <|VIDEO|> tokens of the
        # prompts as the engine itself returned them (vLLM expands the placeholder from the pixel inputs)
        self.counts = {"calls": 0, "expired_calls": 0, "requests": 0, "requests_with_images": 0, "images": 0,
                       "video_tokens": 0}
        log.info("judge engine %s on %s: %s", engine, model_path,
                 f"shown up to {num_frames} frames" if self.vision and num_frames else "text only")

    def chat(self, batch: list[Messages], max_new_tokens: int, deadline: float | None = None) -> list[str] | None:
        """Greedy answers, or None without generating when the caller's deadline (time.time()) has passed.

        Why the deadline: a call queued on an actor cannot be taken back safely, so the answers of callers that
        already timed out would still be generated, one after another, ahead of every new call; after a burst
        (the engine restarting, a slow batch) each new call would then time out too, and retry, for good."""
        self.counts["calls"] += 1
        if deadline is not None and time.time() > deadline:
            self.counts["expired_calls"] += 1
            return None
        self.counts["requests"] += len(batch)
        if not self.vision:
            if any(image_count(m) for m in batch):
                raise ValueError(
                    "the judge model is text-only and was given images: set reward.judge.num_frames: 0 or a "
                    "vision-capable reward.judge.model_path"
                )
            return self.engine.chat([text_only(m) for m in batch], max_new_tokens, temperature=0.0)
        from actors.engines import Sampling

        inputs = [vision_input(m, self.engine.tokenizer, self.max_pixels) for m in batch]
        images = [image_count(m) for m in batch]
        self.counts["requests_with_images"] += sum(1 for n in images if n)
        self.counts["images"] += sum(images)
        results = self.engine.generate(inputs, Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
        self.counts["video_tokens"] += sum(r.prompt_token_ids.count(self._video_id) for r in results)
        return [r.completions[0].text for r in results]

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def shutdown(self) -> None:
        """Stop the engine inside this actor (before ray.shutdown: otherwise vLLM leaks its shared memory)."""
        self.engine.shutdown()


class LocalJudgeBackend:
    """Sends each batch to the judge engine actor in one call. cfg.timeout_s bounds a call (all requests of a
    timed-out call count as timed out, and the engine skips the call if it had not started it yet);
    cfg.max_concurrency bounds the calls in flight."""

    def __init__(self, cfg: JudgeConfig, engine):
        self.cfg = cfg
        self.engine = engine
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)

    def complete(self, batch: list[Messages]) -> list[str | BaseException]:
        with self._slots:
            timed_out = [TimeoutError(f"judge engine gave no answer within {self.cfg.timeout_s} s")] * len(batch)
            # the engine drops the call unanswered if it only gets to it after our deadline (see chat)
            ref = self.engine.chat.remote(batch, self.cfg.max_new_tokens, time.time() + self.cfg.timeout_s)
            try:
                texts = ray.get(ref, timeout=self.cfg.timeout_s)
            except GetTimeoutError:
                # No ray.cancel: the deadline already stops an unstarted call, a running one cannot be
                # interrupted, and cancelling a queued actor call can leave a gap in the actor's task order
                # (Ray then waits 30 s and fails every call queued behind it, seen in CI).
                return timed_out
            except Exception as e:  # a ValueError is about the request itself (e.g. images for a text judge)
                retryable = not isinstance(e, ValueError)
                return [JudgeError(f"judge engine failed: {type(e).__name__}: {e}", retryable)] * len(batch)
        if texts is None:  # reached the engine just after the deadline
            return timed_out
        if len(texts) != len(batch):
            return [JudgeError(f"judge engine returned {len(texts)} texts for {len(batch)} requests")] * len(
                batch
            )
        return list(texts)

    def close(self) -> None:
        pass
