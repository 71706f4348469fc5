"""The RewardWorker pool on a real local Ray and Redis, on the data plane's path: a generator actor stands in for
a rollout worker and hands each group to a reward worker's score_and_push as an object reference, the worker
scores it and pushes it into the fresh stream. 1,000 groups scored by a slow HTTP judge while generation goes
on (overlap shown by timestamps); a group that cannot be scored is reported in its receipt, a dead reward worker
as the exception type the driver's retry rule understands; the reward worker reads the frames of a video prompt
itself and the judge receives them; a group scored twice enters the stream once."""

import base64
import dataclasses
import io
import time

import pytest
import ray
from PIL import Image

from buffer_service.config import BufferConfig
from buffer_service.records import Trajectory
from buffer_service.service import ReplayService
from cluster.retry import WORKER_LOST, classify
from data.config import SynthConfig
from data.manifest import load_manifest
from data.sample import PromptSample
from data.synth import generate
from reward_workers.config import JudgeConfig, RewardConfig
from reward_workers.pool import RewardPool, sum_worker_stats
from tests.stub_judge import VALID_JUDGE_REPLY, StubJudgeServer

pytestmark = pytest.mark.integration

SAMPLE = PromptSample(
    id="loc",
    question="Where is each sound?",
    problem_type="localization",
    answer="Left: cyclist | Center: girl",
    audio_caption="a bell and a flute",
    stage=3,
)
GOOD = "<think>1. bell left. 2. flute center.</think><answer>Left: cyclist | Center: girl</answer>"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}  # tests/conftest.py
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Generator:
    """Stands in for a rollout worker: each call takes `seconds` to make group `i`, then hands it to the reward
    worker `scorer` as RolloutWorker.rollout does. Returns the scoring call's reference (in a list, so that Ray
    passes it on instead of waiting for it) and the generation interval."""

    def __init__(self, group_size: int, seconds: float):
        self.group_size, self.seconds = group_size, seconds

    def hand_on(self, i: int, scorer, sample: PromptSample = SAMPLE, stage: int = 3):
        start = time.time()
        time.sleep(self.seconds)
        group = [
            Trajectory(
                trajectory_id=f"{i}/{k}",
                group_id=str(i),
                prompt_id=SAMPLE.id,
                prompt_token_ids=[1],
                completion_token_ids=[2],
                behaviour_logprobs=[-0.5],
                policy_version=0,
                completion_text=GOOD if k % 2 == 0 else "Left: cyclist",
                stage=stage,
                created_at=start,
            )
            for k in range(self.group_size)
        ]
        end = time.time()
        return [scorer.score_and_push.remote(ray.put(group), sample)], start, end


def scored(generator, i: int, scorer, **kw):
    """Group i generated, scored and pushed; the reward worker's PushReceipt."""
    [receipt], _, _ = ray.get(generator.hand_on.remote(i, scorer, **kw))
    return ray.get(receipt, timeout=120)


def judge_cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(backend="openai", endpoint=url, timeout_s=10, retries=1, retry_backoff_s=0, **kw)


def buffer_of(redis_server) -> BufferConfig:
    return BufferConfig(redis=redis_server.config(), min_size=0)


def stream_groups(buffer_cfg: BufferConfig) -> dict[str, list[Trajectory]]:
    """Every group in the fresh stream, by group id."""
    return {group[0].group_id: group for _, group in ReplayService(buffer_cfg).read_fresh("inspector", 10_000)}


def test_1000_groups_scored_while_generation_goes_on(ray_local, redis_server):
    n_groups = 1000
    buffer_cfg = buffer_of(redis_server)
    with StubJudgeServer(
        lambda body: (200, VALID_JUDGE_REPLY, 0.02)
    ) as server:  # a slow judge: 20 ms a request
        cfg = RewardConfig(judge=judge_cfg(server.url, max_concurrency=4), num_workers=2, groups_per_worker=4)
        pool = RewardPool(cfg, buffer_cfg=buffer_cfg.model_dump())
        gen = Generator.remote(group_size=2, seconds=0.005)
        generated, calls = [], []
        try:
            for i in range(n_groups):  # the generator hands on each group, round robin, and goes on at once
                [call], g0, g1 = ray.get(gen.hand_on.remote(i, pool.workers[i % len(pool.workers)]))
                generated.append((g0, g1))
                calls.append(call)
            receipts = ray.get(calls, timeout=300)
            stats = sum_worker_stats(ray.get([w.stats.remote() for w in pool.workers]))
        finally:
            pool.shutdown()
        requests = server.requests

    assert all(r.error is None and r.entry_id and (r.accepted, r.duplicates) == (2, 0) for r in receipts)
    groups = stream_groups(buffer_cfg)
    assert sorted(int(g) for g in groups) == list(range(n_groups))
    # every term as the server's reply makes it: judge (1 + 0.5 + 0.25 + 0.25) / 4 = 0.5; stage 3 total is
    # 0.5 * format + 1.0 * judge -> 1.0 for the well-formed completion, 0.5 for the bare answer
    for g in groups.values():
        assert [t.rewards["judge"] for t in g] == [0.5, 0.5]
        assert [t.reward for t in g] == [1.0, 0.5]
        assert [t.rewards["format"] for t in g] == [1.0, 0.0]
    assert requests == 2 * n_groups
    assert stats["groups_scored"] == n_groups and stats["trajectories_scored"] == 2 * n_groups
    assert stats["judge_ok"] == 2 * n_groups and stats["judge_failures"] == 0 and stats["judge_latency_s_sum"] > 0

    # Overlap, by timestamps: a generation interval that lies inside the scoring interval of an earlier group
    # happened while that group was being scored. A group's scoring ends at its trajectories' scored_at and
    # lasted its receipt's seconds.
    ends = {int(key): g[0].scored_at for key, g in groups.items()}
    scoring = [(ends[int(r.group_id)] - r.seconds, ends[int(r.group_id)], int(r.group_id)) for r in receipts]
    during_scoring = sum(
        1
        for i, (g0, g1) in enumerate(generated)
        if any(j < i and s0 < g0 and g1 < s1 for s0, s1, j in scoring)
    )
    assert during_scoring >= 0.9 * n_groups, during_scoring
    # and the workers scored several groups at once: the most scoring intervals open at one instant
    events = sorted([(s0, 1) for s0, _, _ in scoring] + [(s1, -1) for _, s1, _ in scoring])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    assert 4 <= peak <= 8, peak  # at most num_workers * groups_per_worker at once
    print(f"groups generated during another group's scoring: {during_scoring}/{n_groups}; peak concurrent "
          f"scoring {peak}")


def test_a_group_that_cannot_be_scored_is_reported_in_its_receipt(ray_local, redis_server):
    """The group's own fault (no default weights for stage 9): the worker answers with the reason and pushes
    nothing; the driver counts it and has the task scored again (cluster/driver.py, ScoringRetries)."""
    buffer_cfg = buffer_of(redis_server)
    with StubJudgeServer(lambda body: (200, VALID_JUDGE_REPLY, 0.0)) as server:
        pool = RewardPool(RewardConfig(judge=judge_cfg(server.url), num_workers=1, groups_per_worker=2),
                          buffer_cfg=buffer_cfg.model_dump())
        gen = Generator.remote(group_size=1, seconds=0)
        try:
            good = [scored(gen, i, pool.workers[0]) for i in range(2)]
            bad = scored(gen, 2, pool.workers[0], stage=9)
            stats = ray.get(pool.workers[0].stats.remote())
        finally:
            pool.shutdown()
    assert all(r.error is None and r.accepted == 1 for r in good)
    assert bad.error and "stage 9" in bad.error and bad.group_id == "2"
    assert bad.entry_id is None and bad.accepted == 0 and bad.worker_stats["groups_failed"] == 1
    assert sorted(stream_groups(buffer_cfg)) == ["0", "1"]
    assert stats["groups_scored"] == 2 and stats["groups_failed"] == 1


def test_a_dead_reward_worker_is_reported_by_type(ray_local, redis_server):
    # The driver tells a worker's death (score again once Ray restarted it) from a group's failure (counted
    # retries) by the exception's type, not its text.
    buffer_cfg = buffer_of(redis_server)
    pool = RewardPool(RewardConfig(weights={"format": 1.0}, num_workers=1), buffer_cfg=buffer_cfg.model_dump())
    gen = Generator.remote(group_size=2, seconds=0)
    try:
        ray.kill(pool.workers[0], no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError) as lost:
            scored(gen, 0, pool.workers[0])
    finally:
        pool.workers = []  # killed above; nothing left for shutdown to close
        pool.shutdown()
    assert classify(lost.value) == WORKER_LOST
    assert stream_groups(buffer_cfg) == {}  # nothing pushed: the driver has the task generated and scored again


def test_the_reward_worker_shows_the_judge_the_frames_of_the_video(ray_local, redis_server, tmp_path):
    """The group comes with its PromptSample only; the worker reads reward.judge.num_frames (8) frames of the
    sample's video and every judge request carries them. A video that cannot be read: the judge is not asked,
    the terms fall back (marked missing, counted)."""
    bodies = []

    def record(body):
        bodies.append(body)
        return 200, VALID_JUDGE_REPLY, 0.0

    (video_sample,), _ = load_manifest(generate(SynthConfig(num_items=1, stage=3, seed=2), tmp_path / "data"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    broken_sample = dataclasses.replace(video_sample, id="broken", video=broken)
    buffer_cfg = buffer_of(redis_server)
    gen = Generator.remote(group_size=2, seconds=0)
    with StubJudgeServer(record) as server:
        pool = RewardPool(RewardConfig(judge=judge_cfg(server.url, fallback=0.1)), buffer_cfg=buffer_cfg.model_dump())
        try:
            with_video = scored(gen, 0, pool.workers[0], sample=video_sample)
            n_bodies = len(bodies)
            failed = scored(gen, 1, pool.workers[0], sample=broken_sample)
        finally:
            pool.shutdown()
    groups = stream_groups(buffer_cfg)
    assert with_video.error is None and [t.rewards["judge"] for t in groups["0"]] == [0.5, 0.5]
    assert n_bodies == 2
    for body in bodies:
        parts = body["messages"][1]["content"]
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        assert len(urls) == 8 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
        sizes = {Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size for u in urls}
        assert sizes == {(112, 112)}  # the synthetic video's frames, within frame_max_pixels
    # the unreadable video: no request reached the server, the group is scored with the judge term missing
    assert len(bodies) == n_bodies
    assert failed.error is None and failed.judge_failures == 2
    assert [t.rewards["judge"] for t in groups["1"]] == [None, None]
    stats = failed.worker_stats  # the worker's counters after its second group
    assert stats["judge_media_failures"] == 2 and stats["judge_ok"] == 2


def test_score_and_push_puts_the_group_in_the_stream_once(ray_local, redis_server):
    """The data plane's hand-off: the group reaches the reward worker as an object reference, is scored and
    pushed into the fresh stream by the worker itself; the caller gets ids and counts. The same task generated
    and scored again (after its first receipt was lost) is refused as a duplicate."""
    buffer_cfg = buffer_of(redis_server)
    pool = RewardPool(RewardConfig(weights={"format": 0.5, "accuracy": 0.5}, num_workers=1),
                      buffer_cfg=buffer_cfg.model_dump())
    gen = Generator.remote(group_size=2, seconds=0)
    try:
        first = scored(gen, 7, pool.workers[0])
        again = scored(gen, 7, pool.workers[0])
    finally:
        pool.shutdown()
    assert first.error is None and first.entry_id and (first.accepted, first.duplicates) == (2, 0)
    assert again.entry_id is None and (again.accepted, again.duplicates) == (0, 2)
    [(entry_id, group)] = ReplayService(buffer_cfg).read_fresh("inspector", 10)
    assert entry_id == first.entry_id and [t.trajectory_id for t in group] == ["7/0", "7/1"]
    assert [t.rewards["format"] for t in group] == [1.0, 0.0] and all(t.reward is not None for t in group)
