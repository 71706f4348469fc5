"""The judge's parsing, prompt, retry and fallback policy (the transport is tested in tests/integration)."""

import json

import pytest

from data.sample import PromptSample
from reward_workers.config import JudgeConfig
from reward_workers.judge import (
    JUDGE_KEYS,
    Judge,
    JudgeError,
    JudgeRequest,
    build_judge_messages,
    parse_judge_output,
    with_frames,
)

VALID = '{"audio_grounding_score": 1, "visual_id_score": 0.5, "location_acc_score": 0.25, "caption_corr_score": 0.25}'


@pytest.mark.parametrize(
    "text, expected",
    [
        (VALID, 0.5),
        (f"Here is my rating:\n```json\n{VALID}\n```\nThanks.", 0.5),  # fences and prose around
        (VALID.replace("1,", "1.5,").replace("0.25}", "-2}"), (1 + 0.5 + 0.25 + 0) / 4),  # clipped to [0, 1]
        (VALID.replace("0.5", '"0.5"'), 0.5),  # a numeric string is a number
        (VALID.replace("}", ', "comment": "fine"}'), 0.5),  # extra keys are fine
        ('{"audio_grounding_score": 1} then ' + VALID, 0.5),  # the first complete object wins
        ('{"scores": ' + VALID + "}", 0.5),  # nested: found inside
        (VALID.replace(', "caption_corr_score": 0.25', ""), None),  # a key missing
        (VALID.replace("0.5", "NaN"), None),
        (VALID.replace("0.5", "Infinity"), None),
        (VALID.replace("0.5", "true"), None),
        (VALID.replace("0.5", '"high"'), None),
        (VALID.replace("0.5", "null"), None),
        (VALID.replace('"visual_id_score"', "visual_id_score"), None),  # not JSON
        (VALID[:-1], None),  # truncated
        ("[" + VALID, 0.5),  # inside an unclosed list: the object itself still parses
        ("audio 1, visual 1, location 1, caption 1", None),
        ("", None),
        (None, None),
        ("\n" * 64, None),  # what the tiny random model says
    ],
)
def test_parse_judge_output(text, expected):
    got = parse_judge_output(text)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_judge_prompt_holds_what_the_judge_must_see():
    s = PromptSample(
        id="p",
        question="Who plays?",
        problem_type="localization",
        answer="Left: girl",
        audio_caption="a flute melody",
    )
    req = JudgeRequest.of("<think>1. I hear a flute.</think><answer>Left: girl</answer>", s)
    assert (req.reasoning, req.answer, req.reference, req.audio_caption) == (
        "1. I hear a flute.",
        "Left: girl",
        "Left: girl",
        "a flute melody",
    )
    system, user = build_judge_messages(req)
    assert system["role"] == "system" and user["role"] == "user"
    for part in [
        "Who plays?",
        "a flute melody",
        "Reference answer: Left: girl",
        "1. I hear a flute.",
        *JUDGE_KEYS,
    ]:
        assert part in user["content"]
    # a completion without tags is judged as a whole
    assert JudgeRequest.of("just text", s).answer == "just text"


def test_frames_become_image_parts():
    png = b"\x89PNG\r\n\x1a\n" + b"x" * 8
    msgs = with_frames(build_judge_messages(JudgeRequest("q", "a")), [png, b"\xff\xd8jpeg"])
    parts = msgs[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[2]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert msgs[0]["content"] == build_judge_messages(JudgeRequest("q", "a"))[0]["content"]


class ScriptedBackend:
    """Answers each request from a per-question script: a list of outcomes, one per attempt."""

    def __init__(self, scripts: dict[str, list]):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.calls: list[list[str]] = []

    def complete(self, batch):
        questions = [json.dumps(m).split("Question: ")[1].split("\\n")[0] for m in batch]
        self.calls.append(questions)
        return [self.scripts[q].pop(0) for q in questions]

    def close(self):
        pass


def test_judge_retry_fallback_and_counters():
    backend = ScriptedBackend(
        {
            "ok": [VALID],
            "flaky": [TimeoutError("slow"), JudgeError("http 503"), VALID],  # succeeds on the third attempt
            "down": [TimeoutError("slow")] * 3,  # 1 + 2 retries, then fallback
            "bad": [JudgeError("http 400", retryable=False)],  # not retried
            "garbage": ["no json here"],  # unparseable: fallback, not retried
        }
    )
    judge = Judge(JudgeConfig(retries=2, retry_backoff_s=0, fallback=0.3), backend)
    results = judge.score([JudgeRequest(q, "a") for q in ["ok", "flaky", "down", "bad", "garbage"]])
    assert [r.score for r in results] == [0.5, 0.5, None, None, None]
    assert [r.value for r in results] == [0.5, 0.5, 0.3, 0.3, 0.3]
    assert [r.attempts for r in results] == [1, 3, 3, 1, 1]
    assert (
        results[2].error.startswith("timeout")
        and "400" in results[3].error
        and results[4].error.startswith("parse")
    )
    assert backend.calls == [["ok", "flaky", "down", "bad", "garbage"], ["flaky", "down"], ["flaky", "down"]]
    st = judge.stats()
    assert st["judge_requests"] == 5 and st["judge_ok"] == 2 and st["judge_failures"] == 3
    assert st["judge_parse_failures"] == 1 and st["judge_retries"] == 4 and st["judge_request_errors"] == 6
    assert st["judge_calls"] == 3 and st["judge_latency_s_sum"] >= st["judge_latency_s_max"] >= 0


def test_judge_without_retries_falls_back_at_once():
    backend = ScriptedBackend({"down": [ConnectionError("refused")]})
    judge = Judge(JudgeConfig(retries=0, fallback=0.0), backend)
    (r,) = judge.score([JudgeRequest("down", "a")])
    assert (r.score, r.value, r.attempts) == (None, 0.0, 1) and "ConnectionError" in r.error


# --- what the judge is shown ------------------------------------------------------------------------------


def test_the_judge_sees_8_frames_by_default():
    assert JudgeConfig().num_frames == 8  # docs/method.md: the release's judge sees 8 frames


def test_the_request_says_what_of_the_video_is_shown():
    def user_text(req):
        msgs = with_frames(build_judge_messages(req), req.frames)
        content = msgs[1]["content"]
        return content if isinstance(content, str) else content[0]["text"]

    assert "this prompt has none" in user_text(JudgeRequest("q", "a"))  # no video: text only, and it says so
    assert "not shown to you" in user_text(JudgeRequest("q", "a", video=True))  # num_frames 0
    png = b"\x89PNG\r\n\x1a\n"
    assert "the 2 frames after this text" in user_text(JudgeRequest("q", "a", frames=[png, png], video=True))


def test_an_unreadable_video_fails_the_judge_term_counted_and_logged(tmp_path, caplog):
    from buffer_service.records import Trajectory
    from reward_workers.config import RewardConfig
    from reward_workers.scoring import score_group

    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)  # an mp4 header, then nothing decodable
    sample = PromptSample(id="v", question="Where?", problem_type="localization", answer="Left: red", video=video,
                          stage=3)
    backend = ScriptedBackend({})
    cfg = RewardConfig()
    cfg.judge.fallback = 0.2
    judge = Judge(cfg.judge, backend)
    trajs = [
        Trajectory(trajectory_id=f"t{i}", group_id="g", prompt_id="v", prompt_token_ids=[1], completion_token_ids=[2],
                   behaviour_logprobs=[-0.1], policy_version=0, completion_text=t, stage=3)
        for i, t in enumerate(["<think>1.</think><answer>Left: red</answer>", "Left: red"])
    ]
    with caplog.at_level("WARNING", logger="reward_workers.judge"):
        score_group(trajs, sample, cfg, judge)
    assert backend.calls == []  # the judge is not asked to judge what it cannot see
    assert [t.rewards["judge"] for t in trajs] == [None, None]  # missing, not 0
    assert [t.reward for t in trajs] == [pytest.approx(0.5 + 0.2), pytest.approx(0.2)]  # 0.5 format + 1.0 fallback
    st = judge.stats()
    assert st["judge_media_failures"] == 2 and st["judge_failures"] == 2 and st["judge_requests"] == 2
    assert any("broken.mp4" in r.getMessage() and "fall back" in r.getMessage() for r in caplog.records)


# --- refusals: a judge that is not configured, a text judge asked to look at frames ----------------------


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["stage=3"], ["reward.judge.model_path", "reward.judge.endpoint", "reward.judge.allow_tiny"]),
        (["reward.weights={format: 0.5, judge: 0.5}"], ["reward.judge.model_path"]),  # stage 1, judge weighted
        (["stage=3", "reward.judge.backend=openai"], ["reward.judge.endpoint"]),
        (["stage=3", "reward.judge.backend=openai", "reward.judge.allow_tiny=true"], ["reward.judge.endpoint"]),
    ],
)
def test_a_stage_that_weights_the_judge_refuses_to_load_without_one(overrides, keys):
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert "weights the LLM judge" in text
    for key in keys:
        assert key in text


@pytest.mark.parametrize(
    "overrides",
    [
        ["stage=3", "reward.judge.allow_tiny=true"],  # tests and demos opt in
        ["stage=3", "reward.judge.backend=openai", "reward.judge.endpoint=http://127.0.0.1:8000"],
        ["stage=2"],  # no judge in the stage's weights
        ["stage=3", "reward.weights={format: 0.5, accuracy: 0.5}"],  # stage 3 with the judge weighted out
        ["stage=0", "reward.weights={judge: 1.0}"],  # SFT scores nothing
    ],
)
def test_a_configured_or_unused_judge_loads(overrides):
    from cluster.config import load_config

    load_config(None, overrides)


def test_a_text_only_judge_model_is_refused_frames(tmp_path):
    from policy.config import TinyModelConfig
    from policy.tiny import ensure_tiny_model
    from reward_workers.judge_engine import check_judge_model, start_judge_engine

    text = ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path)
    with pytest.raises(ValueError) as err:
        check_judge_model(text, 8)
    assert "text-only" in str(err.value) and "reward.judge.num_frames" in str(err.value)
    assert check_judge_model(text, 0) is False  # text only, asked for text only: fine
    # the engine is refused before any actor starts (no Ray here)
    with pytest.raises(ValueError, match="text-only"):
        start_judge_engine(JudgeConfig(model_path=str(text), num_frames=8))
    with pytest.raises(ValueError, match="no config.json"):
        check_judge_model(tmp_path / "nothing", 0)
