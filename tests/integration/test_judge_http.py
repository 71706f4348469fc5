"""The judge against a real OpenAI-compatible HTTP server on 127.0.0.1 that answers valid, invalid, slow and
failing responses: parsing, timeout, retry, fallback, the concurrency limit and the counters; and what the
server receives of a video prompt: the frames, as image_url parts."""

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from buffer_service.records import Trajectory
from data.config import SynthConfig
from data.manifest import load_manifest
from data.sample import PromptSample
from data.synth import generate
from policy.media import read_video
from reward_workers.config import JudgeConfig, RewardConfig
from reward_workers.judge import Judge, JudgeRequest, OpenAIJudgeBackend
from reward_workers.scoring import score_group
from tests.stub_judge import VALID_JUDGE_REPLY, StubJudgeServer

pytestmark = pytest.mark.integration


class Script:
    """Answers by the question of the request; counts the requests per question and the peak concurrency."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}
        self.active = 0
        self.peak = 0
        self.bodies: list[dict] = []

    def __call__(self, body):
        user = body["messages"][1]["content"]
        text = user if isinstance(user, str) else user[0]["text"]
        q = text.split("Question: ")[1].split("\n")[0]
        with self.lock:
            n = self.seen[q] = self.seen.get(q, 0) + 1
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.bodies.append(body)
        try:
            return self.answer(q, n)
        finally:
            with self.lock:
                self.active -= 1

    def answer(self, q, n):
        if q == "valid":
            return 200, f"Sure. ```json\n{VALID_JUDGE_REPLY}\n```", 0.0
        if q == "invalid":
            return 200, "The answer looks good to me, 9/10.", 0.0
        if q == "slow":
            return 200, VALID_JUDGE_REPLY, 2.0
        if q == "slow-once":
            return 200, VALID_JUDGE_REPLY, 2.0 if n == 1 else 0.0
        if q == "fail-twice":
            return (500, "", 0.0) if n <= 2 else (200, VALID_JUDGE_REPLY, 0.0)
        if q == "fail":
            return 503, "", 0.0
        if q == "bad-request":
            return 400, "", 0.0
        if q == "not-openai":
            return 200, b"<html>proxy error</html>", 0.0
        if q.startswith("busy"):
            time.sleep(0.1)
            return 200, VALID_JUDGE_REPLY, 0.0
        raise AssertionError(q)


@pytest.fixture
def server():
    script = Script()
    with StubJudgeServer(script) as srv:
        srv.script = script
        yield srv


def make_judge(url, **kw):
    kw = {"timeout_s": 0.5, "retries": 2, "retry_backoff_s": 0, **kw}
    cfg = JudgeConfig(backend="openai", endpoint=url, model_name="stub", **kw)
    return Judge(cfg, OpenAIJudgeBackend(cfg))


def test_each_kind_of_response(server):
    judge = make_judge(server.url, fallback=0.1)
    names = ["valid", "invalid", "slow", "slow-once", "fail-twice", "fail", "bad-request", "not-openai"]
    try:
        results = {q: r for q, r in zip(names, judge.score([JudgeRequest(q, "answer") for q in names]))}
    finally:
        judge.close()
    # parse: valid JSON inside prose and fences -> (1 + 0.5 + 0.25 + 0.25) / 4
    assert (results["valid"].score, results["valid"].attempts) == (0.5, 1)
    # invalid: unparseable -> fallback, missing, not retried
    assert (results["invalid"].score, results["invalid"].value) == (None, 0.1)
    assert results["invalid"].error.startswith("parse")
    # slow: every attempt times out -> 1 + 2 retries, fallback
    assert (results["slow"].score, results["slow"].value, results["slow"].attempts) == (None, 0.1, 3)
    assert results["slow"].error.startswith("timeout")
    # a timeout, then a fast answer on retry
    assert (results["slow-once"].score, results["slow-once"].attempts) == (0.5, 2)
    # two 500s, then a valid answer on the last retry
    assert (results["fail-twice"].score, results["fail-twice"].attempts) == (0.5, 3)
    assert results["fail"].score is None and "503" in results["fail"].error
    # 400 is not worth retrying
    assert results["bad-request"].attempts == 1 and "400" in results["bad-request"].error
    assert results["not-openai"].score is None and "not an OpenAI" in results["not-openai"].error
    seen = server.script.seen
    assert seen == {
        "valid": 1,
        "invalid": 1,
        "slow": 3,
        "slow-once": 2,
        "fail-twice": 3,
        "fail": 3,
        "bad-request": 1,
        "not-openai": 3,
    }
    st = judge.stats()
    assert st["judge_requests"] == 8 and st["judge_ok"] == 3 and st["judge_failures"] == 5
    assert st["judge_parse_failures"] == 1
    assert st["judge_retries"] == (2 + 1 + 2 + 2 + 2) and st["judge_calls"] == 3
    # what the server was asked: greedy, the configured model and token budget
    body = server.script.bodies[0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("stub", 0.0, 512)


def test_concurrency_limit_is_respected(server):
    judge = make_judge(server.url, max_concurrency=2, timeout_s=5)
    try:
        results = judge.score([JudgeRequest(f"busy{i}", "a") for i in range(8)])
    finally:
        judge.close()
    assert [r.score for r in results] == [0.5] * 8
    assert server.script.peak == 2  # 8 requests of 0.1 s each, never more than 2 at once


def test_api_key_and_frames_reach_the_server(monkeypatch):
    seen = []

    def handler(body):
        seen.append(body["messages"][1]["content"])
        return 200, VALID_JUDGE_REPLY, 0.0

    monkeypatch.setenv("AVATAR_JUDGE_API_KEY", "k-123")
    with StubJudgeServer(handler) as srv:
        judge = make_judge(srv.url + "/v1", num_frames=1)  # a base URL that already ends in /v1
        (r,) = judge.score([JudgeRequest("q", "a", frames=[b"\x89PNG\r\n\x1a\nA", b"\x89PNG\r\n\x1a\nB"])])
        judge.close()
    assert r.score == 0.5
    assert srv.authorizations == ["Bearer k-123"]
    assert [p["type"] for p in seen[0]] == ["text", "image_url"]  # num_frames=1 of the 2 given


def test_unreachable_server_falls_back():
    with StubJudgeServer() as srv:
        url = srv.url
    judge = make_judge(url, fallback=0.0)  # the port is closed now
    (r,) = judge.score([JudgeRequest("q", "a")])
    judge.close()
    assert (r.score, r.value, r.attempts) == (None, 0.0, 3)
    assert judge.stats()["judge_request_errors"] == 3


def decode_data_url(url: str) -> tuple[str, np.ndarray]:
    head, data = url.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64"), head
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return image.format, np.asarray(image.convert("RGB"))


def group_of(texts, prompt_id):
    return [
        Trajectory(trajectory_id=f"{prompt_id}:{k}", group_id=prompt_id, prompt_id=prompt_id, prompt_token_ids=[1],
                   completion_token_ids=[2], behaviour_logprobs=[-1.0], policy_version=0, completion_text=t, stage=3)
        for k, t in enumerate(texts)
    ]


@pytest.mark.parametrize("fmt, num_frames, max_pixels", [("png", 4, 448 * 448), ("jpeg", 8, 56 * 56)])
def test_the_server_receives_the_frames_of_a_video_prompt(tmp_path, fmt, num_frames, max_pixels):
    """score_group reads the frames of the prompt's video itself (synthetic, 112x112) and every request of the
    group carries them: the recorded bodies hold num_frames image_url parts that decode to images of the
    expected size (PNG: exactly the video's frames; JPEG scaled within max_pixels: 56x56)."""
    bodies = []

    def record(body):
        bodies.append(body)
        return 200, VALID_JUDGE_REPLY, 0.0

    (sample,), _ = load_manifest(generate(SynthConfig(num_items=1, stage=3, seed=5), tmp_path))
    cfg = RewardConfig(judge=JudgeConfig(backend="openai", endpoint="http://unused", num_frames=num_frames,
                                         frame_format=fmt, frame_max_pixels=max_pixels, retries=0))
    texts = ["<think>1. the red circle grows.</think><answer>Left: red circle</answer>", "Left: red circle"]
    with StubJudgeServer(record) as srv:
        cfg.judge.endpoint = srv.url
        judge = Judge(cfg.judge, OpenAIJudgeBackend(cfg.judge))
        try:
            scored = score_group(group_of(texts, "v"), sample, cfg, judge)
            text_scored = score_group(group_of(texts[:1], "t"), PromptSample(
                id="t", question="Where?", problem_type="localization", answer="Left: red circle", stage=3), cfg, judge)
        finally:
            judge.close()
    assert [t.rewards["judge"] for t in scored + text_scored] == [0.5, 0.5, 0.5]
    assert len(bodies) == 3
    expected, _ = read_video(sample.video, 1.0, num_frames, num_frames)  # the frames spread over the video
    for body in bodies[:2]:
        system, user = body["messages"]
        assert isinstance(system["content"], str) and user["role"] == "user"
        parts = user["content"]
        assert parts[0]["type"] == "text" and f"the {num_frames} frames after this text" in parts[0]["text"]
        images = [decode_data_url(p["image_url"]["url"]) for p in parts[1:] if p["type"] == "image_url"]
        assert len(parts) == 1 + num_frames and len(images) == num_frames
        assert {f for f, _ in images} == {fmt.upper()}
        if fmt == "png":
            assert all(np.array_equal(img, frame) for (_, img), frame in zip(images, expected))
        else:
            assert all(img.shape == (56, 56, 3) for _, img in images)
            small = [np.asarray(Image.fromarray(f).resize((56, 56), Image.BICUBIC)).astype(float) for f in expected]
            assert all(np.abs(img - ref).mean() < 12 for (_, img), ref in zip(images, small))  # JPEG's loss only
    # the prompt without video: the user message is plain text that says so
    user = bodies[2]["messages"][1]["content"]
    assert isinstance(user, str) and "this prompt has none" in user
