"""The judge against a real OpenAI-compatible HTTP server on 127.0.0.1 that answers valid, invalid, slow and
failing responses: parsing, timeout, retry, fallback, the concurrency limit and the counters."""

import threading
import time

import pytest

from reward_workers.config import JudgeConfig
from reward_workers.judge import Judge, JudgeRequest, OpenAIJudgeBackend
from reward_workers.stub_judge import VALID_JUDGE_REPLY, StubJudgeServer

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
