"""R_judge: a frozen judge model scores four criteria in [0, 1] as JSON; the reward is their mean.

The Judge owns the policy (timeout, retries, concurrency limit, fallback, counters); a backend only turns a
batch of chat requests into texts or errors. Two backends: an OpenAI-compatible HTTP endpoint (e.g.
`vllm serve`, here) and a local judge engine actor (judge_engine.py). A failed request gets the configured
fallback value and is marked missing (JudgeResult.score is None), never a silent 0.

The judge sees what it judges: read_judge_frames takes cfg.num_frames frames of the prompt's video (once per
group, in the reward worker), and they travel in the user message as OpenAI `image_url` parts (data: URLs),
which both backends take. A prompt without video is judged on text, and the request says so; a video that
cannot be read makes the judge term fall back (counted as judge_media_failures, marked missing)."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

from data.sample import PromptSample

from .answers import extract_answer
from .config import JudgeConfig

JUDGE_KEYS = ("audio_grounding_score", "visual_id_score", "location_acc_score", "caption_corr_score")

JUDGE_SYSTEM_PROMPT = (
    "You are a strict evaluator of answers about a video and its audio. "
    "Reply with one JSON object and nothing else."
)

JUDGE_INSTRUCTIONS = """Rate the model's response on four criteria, each a number from 0 to 1:
- audio_grounding_score: does the reasoning use what is actually heard (consistent with the audio caption)?
- visual_id_score: are the visible objects identified correctly?
- location_acc_score: are the objects placed at the right positions (left, center, right)?
- caption_corr_score: does the answer agree with the audio caption and the reference answer?
Reply with exactly this JSON:
{"audio_grounding_score": <0-1>, "visual_id_score": <0-1>, "location_acc_score": <0-1>, "caption_corr_score": <0-1>}"""

Messages = list[dict]

log = logging.getLogger(__name__)


@dataclass
class JudgeRequest:
    """What the judge sees of one completion."""

    question: str
    answer: str
    reasoning: str = ""
    reference: str = ""
    audio_caption: str = ""
    frames: list[bytes] = field(default_factory=list)  # encoded images (PNG/JPEG) of the video, in order
    video: bool = False  # the prompt has a video (with no frames the request says it is not shown)
    media_error: str | None = None  # the video could not be read: the request fails without being sent

    @classmethod
    def of(
        cls,
        completion: str,
        sample: PromptSample,
        frames: list[bytes] | None = None,
        media_error: str | None = None,
    ) -> JudgeRequest:
        think = completion.split("<think>", 1)[-1].split("</think>", 1)[0] if "<think>" in completion else ""
        answer = extract_answer(completion)
        return cls(
            question=sample.question,
            answer=answer if answer is not None else completion.strip(),
            reasoning=think.strip(),
            reference=sample.answer,
            audio_caption=sample.audio_caption or "",
            frames=list(frames or []),
            video=sample.video is not None,
            media_error=media_error,
        )


@dataclass
class JudgeResult:
    score: float | None  # the mean of the four criteria; None = the judge failed (the term is missing)
    value: float  # score, or the configured fallback when it failed
    error: str | None = None  # "parse: ...", "timeout: ...", "http 500: ..."
    attempts: int = 0
    raw: str | None = None  # the judge's last text, for debugging


class JudgeError(Exception):
    """A failed judge request. Non-retryable errors (e.g. HTTP 400) are not tried again."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class JudgeBackend(Protocol):
    def complete(self, batch: list[Messages]) -> list[str | BaseException]:
        """One text or one error per request, in order. Must return within about its configured timeout."""
        ...

    def close(self) -> None: ...


def build_judge_messages(req: JudgeRequest) -> Messages:
    """The chat messages of one judge request, text only (with_frames adds req.frames after the text). The
    user turn says what the judge is shown of the video: the frames, or that it has none to look at."""
    lines = [f"Question: {req.question}"]
    if req.frames:
        n = len(req.frames)
        lines.append(f"Video: the {n} frames after this text, sampled evenly over the video, in order.")
    elif req.video:
        lines.append("Video: not shown to you; judge from the text alone.")
    else:
        lines.append("Video: this prompt has none; judge from the text alone.")
    if req.audio_caption:
        lines.append(f"Audio caption: {req.audio_caption}")
    if req.reference:
        lines.append(f"Reference answer: {req.reference}")
    lines.append(f"Model reasoning: {req.reasoning or '(none)'}")
    lines.append(f"Model answer: {req.answer or '(none)'}")
    lines.append("")
    lines.append(JUDGE_INSTRUCTIONS)
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def parse_judge_output(text: str | None) -> float | None:
    """The mean of the four criteria from the first JSON object in `text` that holds all four as finite
    numbers (numeric strings accepted), each clipped to [0, 1]. Text around the object (prose, ``` fences) is
    tolerated; anything else (missing key, NaN, a boolean, broken JSON) gives None."""
    if not text:
        return None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        except RecursionError:  # nested deeper than the parser goes: garbage, and every later "{" is inside it
            return None
        if isinstance(obj, dict):
            values = [_criterion(obj.get(k)) for k in JUDGE_KEYS]
            if all(v is not None for v in values):
                return sum(values) / len(values)
        start = text.find("{", start + 1)
    return None


def _criterion(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return min(1.0, max(0.0, x)) if math.isfinite(x) else None


class Judge:
    """Scores judge requests through a backend with retries and a fallback; thread-safe; counts everything."""

    def __init__(self, cfg: JudgeConfig, backend: JudgeBackend):
        self.cfg = cfg
        self.backend = backend
        self._lock = threading.Lock()
        self._stats = {
            "judge_requests": 0,
            "judge_ok": 0,
            "judge_failures": 0,  # requests that ended on the fallback
            "judge_parse_failures": 0,
            "judge_media_failures": 0,  # requests whose prompt video could not be read (never sent)
            "judge_request_errors": 0,  # errors and timeouts of single attempts, retried or not
            "judge_retries": 0,
            "judge_calls": 0,  # backend calls (batches)
            "judge_latency_s_sum": 0.0,
            "judge_latency_s_max": 0.0,
        }

    def score(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        """One result per request. Requests that fail to reach the judge are tried again up to cfg.retries
        times; unparseable answers are not (the judge decodes greedily: it would say the same)."""
        n = self.cfg.num_frames
        shown = [replace(r, frames=r.frames[:n] if n else []) for r in requests]
        messages = [with_frames(build_judge_messages(r), r.frames) for r in shown]
        results: list[JudgeResult | None] = [None] * len(requests)
        errors: dict[int, str] = {}
        todo = []
        for i, r in enumerate(requests):
            if r.media_error is not None:  # the judge cannot see what it would judge: not asked at all
                self._add(judge_media_failures=1)
                results[i] = self._failed(f"media: {r.media_error}", 0, None)
            else:
                todo.append(i)
        attempt = 0
        while todo and attempt <= self.cfg.retries:
            if attempt:
                self._add(judge_retries=len(todo))
                time.sleep(self.cfg.retry_backoff_s * attempt)
            attempt += 1
            t0 = time.monotonic()
            outputs = self.backend.complete([messages[i] for i in todo])
            self._latency(time.monotonic() - t0)
            retry = []
            for i, out in zip(todo, outputs):
                if isinstance(out, BaseException):
                    self._add(judge_request_errors=1)
                    errors[i] = _describe(out)
                    if not isinstance(out, JudgeError) or out.retryable:
                        retry.append(i)
                    else:
                        results[i] = self._failed(errors[i], attempt, None)
                    continue
                score = parse_judge_output(out)
                if score is None:
                    self._add(judge_parse_failures=1)
                    results[i] = self._failed(
                        f"parse: no valid JSON with {', '.join(JUDGE_KEYS)}", attempt, out
                    )
                else:
                    self._add(judge_ok=1)
                    results[i] = JudgeResult(score=score, value=score, attempts=attempt, raw=out)
            todo = retry
        for i in todo:
            results[i] = self._failed(errors.get(i, "no answer"), attempt, None)
        self._add(judge_requests=len(requests))
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        self.backend.close()

    def _failed(self, error: str, attempts: int, raw: str | None) -> JudgeResult:
        self._add(judge_failures=1)
        return JudgeResult(score=None, value=self.cfg.fallback, error=error, attempts=attempts, raw=raw)

    def _add(self, **counts: int) -> None:
        with self._lock:
            for k, n in counts.items():
                self._stats[k] += n

    def _latency(self, seconds: float) -> None:
        with self._lock:
            self._stats["judge_calls"] += 1
            self._stats["judge_latency_s_sum"] += seconds
            self._stats["judge_latency_s_max"] = max(self._stats["judge_latency_s_max"], seconds)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"timeout: {exc}"
    return f"{type(exc).__name__}: {exc}"


class OpenAIJudgeBackend:
    """An OpenAI-compatible chat endpoint (POST <endpoint>/v1/chat/completions), greedy decoding.

    Requests run on a thread pool of cfg.max_concurrency threads shared by all callers, which is the
    concurrency limit. cfg.timeout_s bounds the connection and every read of one request; the API key, if
    any, is read from the environment variable cfg.api_key_env."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.endpoint:
            raise ValueError("reward.judge.endpoint: required when reward.judge.backend is 'openai'")
        base = cfg.endpoint.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.cfg = cfg
        self.api_key = os.environ.get(cfg.api_key_env)
        self._pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="judge-http")

    def complete(self, batch: list[Messages]) -> list[str | BaseException]:
        futures = [self._pool.submit(self._one, m) for m in batch]
        return [_outcome(f) for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _one(self, messages: Messages) -> str:
        body = {
            "model": self.cfg.model_name or "judge",
            "messages": messages,
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": 0.0,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            retryable = e.code == 429 or e.code >= 500
            raise JudgeError(f"http {e.code}: {e.reason}", retryable=retryable) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                raise TimeoutError(f"no answer from {self.url} within {self.cfg.timeout_s} s") from None
            raise JudgeError(f"{type(e).__name__}: {reason}") from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"not an OpenAI chat completion: {payload[:200]!r}") from None
        if not isinstance(content, str):
            raise JudgeError(f"message content is not text: {content!r}"[:200])
        return content


def read_judge_frames(sample: PromptSample, cfg: JudgeConfig) -> list[bytes]:
    """cfg.num_frames frames spread evenly over the prompt's video (fewer for a clip with fewer frames), each
    scaled down to at most cfg.frame_max_pixels (aspect kept), encoded as cfg.frame_format. [] when
    num_frames is 0 or the prompt has no video. Raises policy.media.MediaError naming the file when the video
    cannot be read."""
    if not cfg.num_frames or sample.video is None:
        return []
    import numpy as np
    from PIL import Image

    from policy.media import MediaError, read_video

    n = cfg.num_frames
    read = n + n % 2  # read_video keeps a multiple of the temporal patch (2) frames
    # min_frames = max_frames = read: the frame rate no longer matters, the read is spread over the video
    frames, _ = read_video(sample.video, 1.0, read, read, max_pixels=cfg.frame_max_pixels)
    if len(frames) > n:
        frames = frames[np.linspace(0, len(frames) - 1, n).round().astype(int)]
    out = []
    for frame in frames:
        try:
            image = Image.fromarray(frame).convert("RGB")
            w, h = image.size
            if w * h > cfg.frame_max_pixels:
                scale = math.sqrt(cfg.frame_max_pixels / (w * h))
                image = image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)
            buf = io.BytesIO()
            if cfg.frame_format == "png":
                image.save(buf, format="PNG")
            else:
                image.save(buf, format="JPEG", quality=90)
        except (OSError, ValueError) as exc:
            raise MediaError(f"{sample.video}: cannot encode a frame for the judge ({exc})") from None
        out.append(buf.getvalue())
    return out


def judge_frames(sample: PromptSample, cfg: JudgeConfig) -> tuple[list[bytes], str | None]:
    """read_judge_frames, with a failure turned into its reason (logged): (frames, None) or ([], reason)."""
    from policy.media import MediaError

    try:
        return read_judge_frames(sample, cfg), None
    except (MediaError, OSError) as exc:
        log.warning(
            "judge: cannot read the frames of prompt %s (%s); its judge terms fall back to %s (missing)",
            sample.id,
            exc,
            cfg.fallback,
        )
        return [], str(exc)


def with_frames(messages: Messages, frames: list[bytes]) -> Messages:
    """The OpenAI multimodal form of `messages`: the user turn's text followed by the frames as data URLs."""
    if not frames:
        return messages
    out = []
    for m in messages:
        if m["role"] == "user":
            parts = [{"type": "text", "text": m["content"]}]
            for f in frames:
                mime = "image/png" if f[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
                url = f"data:{mime};base64,{base64.b64encode(f).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
            m = {"role": "user", "content": parts}
        out.append(m)
    return out


def _outcome(future) -> str | BaseException:
    try:
        return future.result()
    except Exception as e:  # one request's failure is its result, not the batch's
        return e
