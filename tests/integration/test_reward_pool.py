"""The RewardWorker pool on a real local Ray: 1,000 groups scored by a slow HTTP judge while a generator actor
keeps generating (overlap shown by timestamps), back-pressure, and failed groups reported, not lost; the
reward worker reads the frames of a video prompt itself and the judge receives them."""

import base64
import dataclasses
import io
import time

import pytest
import ray
from PIL import Image

from buffer_service.records import Trajectory
from data.config import SynthConfig
from data.manifest import load_manifest
from data.sample import PromptSample
from data.synth import generate
from reward_workers.config import JudgeConfig, RewardConfig
from reward_workers.pool import PoolFull, RewardPool
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
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Generator:
    """Stands in for a rollout worker: each call takes `seconds` and returns a group with its interval."""

    def __init__(self, group_size: int, seconds: float):
        self.group_size, self.seconds = group_size, seconds

    def generate(self, i: int):
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
                stage=3,
                created_at=start,
            )
            for k in range(self.group_size)
        ]
        return group, start, time.time()


def judge_cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(backend="openai", endpoint=url, timeout_s=10, retries=1, retry_backoff_s=0, **kw)


def test_1000_groups_scored_while_generation_goes_on(ray_local):
    n_groups = 1000
    with StubJudgeServer(
        lambda body: (200, VALID_JUDGE_REPLY, 0.02)
    ) as server:  # a slow judge: 20 ms a request
        cfg = RewardConfig(
            judge=judge_cfg(server.url, max_concurrency=4),
            num_workers=2,
            groups_per_worker=4,
            max_pending_groups=32,
        )
        pool = RewardPool(cfg)
        gen = Generator.remote(group_size=2, seconds=0.005)
        generated, scored = [], []
        try:
            for i in range(n_groups):
                group, g0, g1 = ray.get(gen.generate.remote(i))
                generated.append((g0, g1))
                pool.submit(group, SAMPLE)
                scored.extend(pool.poll())
            scored.extend(pool.drain(timeout=300))
            stats = pool.stats()
        finally:
            pool.shutdown()
        requests = server.requests

    assert len(scored) == n_groups and all(g.error is None for g in scored)
    assert sorted(int(g.trajectories[0].group_id) for g in scored) == list(range(n_groups))
    # every term as the server's reply makes it: judge (1 + 0.5 + 0.25 + 0.25) / 4 = 0.5; stage 3 total is
    # 0.5 * format + 1.0 * judge -> 1.0 for the well-formed completion, 0.5 for the bare answer
    for g in scored:
        assert [t.rewards["judge"] for t in g.trajectories] == [0.5, 0.5]
        assert [t.reward for t in g.trajectories] == [1.0, 0.5]
        assert [t.rewards["format"] for t in g.trajectories] == [1.0, 0.0]
    assert requests == 2 * n_groups
    assert stats["groups_scored"] == n_groups and stats["trajectories_scored"] == 2 * n_groups
    assert stats["judge_ok"] == 2 * n_groups and stats["judge_failures"] == 0 and stats["pending"] == 0
    assert stats["judge_latency_s_sum"] > 0 and stats["groups_submitted"] == n_groups

    # Overlap, by timestamps: a generation interval that lies inside the scoring interval of an earlier group
    # happened while that group was being scored.
    scoring = [(g.started_at, g.finished_at, int(g.trajectories[0].group_id)) for g in scored]
    during_scoring = sum(
        1
        for i, (g0, g1) in enumerate(generated)
        if any(j < i and s0 < g0 and g1 < s1 for s0, s1, j in scoring)
    )
    assert during_scoring >= 0.9 * n_groups, during_scoring
    # and the pool scored several groups at once: the most scoring intervals open at one instant
    events = sorted([(s0, 1) for s0, _, _ in scoring] + [(s1, -1) for _, s1, _ in scoring])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    assert 4 <= peak <= 8, peak  # at most num_workers * groups_per_worker at once
    print(
        f"groups generated during another group's scoring: {during_scoring}/{n_groups}; peak concurrent "
        f"scoring {peak}; submits blocked by back-pressure {stats['submits_blocked']}"
    )


def test_back_pressure_and_failed_groups_are_reported(ray_local):
    with StubJudgeServer(lambda body: (200, VALID_JUDGE_REPLY, 0.5)) as server:
        cfg = RewardConfig(
            judge=judge_cfg(server.url), num_workers=1, groups_per_worker=2, max_pending_groups=2
        )
        pool = RewardPool(cfg)
        gen = Generator.remote(group_size=1, seconds=0)
        try:
            pool.submit(ray.get(gen.generate.remote(0))[0], SAMPLE)
            pool.submit(ray.get(gen.generate.remote(1))[0], SAMPLE)
            assert pool.pending == 2
            with pytest.raises(PoolFull):
                pool.submit(ray.get(gen.generate.remote(2))[0], SAMPLE, timeout=0)
            assert pool.pending == 2  # the refused group was not queued
            # a blocking submit waits for a slot, and nothing finished is lost meanwhile
            pool.submit(ray.get(gen.generate.remote(3))[0], SAMPLE)
            # a group the worker cannot score (no default weights for stage 9) comes back with its reason
            bad = ray.get(gen.generate.remote(4))[0]
            bad[0].stage = 9
            pool.submit(bad, SAMPLE)
            done = pool.drain(timeout=60)
            stats = pool.stats()
        finally:
            pool.shutdown()
    assert sorted(g.trajectories[0].group_id for g in done) == ["0", "1", "3", "4"]
    failed = [g for g in done if g.error]
    assert (
        len(failed) == 1 and "stage 9" in failed[0].error and failed[0].trajectories[0].trajectory_id == "4/0"
    )
    assert not failed[0].worker_lost  # the group's own fault: the driver counts it and scores it again
    assert stats["groups_scored"] == 3 and stats["groups_failed"] == 1
    assert stats["submits_blocked"] == 3  # the refused, the blocking and the bad group's submit found it full


def test_a_dead_reward_worker_is_reported_by_type(ray_local):
    # The driver tells a worker's death (score again once Ray restarted it) from a group's failure (counted
    # retries) by the exception's type, not its text.
    cfg = RewardConfig(weights={"format": 1.0}, num_workers=1)
    pool = RewardPool(cfg)
    gen = Generator.remote(group_size=2, seconds=0)
    try:
        ray.kill(pool.workers[0], no_restart=True)
        pool.submit(ray.get(gen.generate.remote(0))[0], SAMPLE)
        [lost] = pool.drain(timeout=60)
    finally:
        pool.workers = []  # killed above; nothing left for shutdown to close
        pool.shutdown()
    assert lost.error and lost.worker_lost and [t.trajectory_id for t in lost.trajectories] == ["0/0", "0/1"]


def test_the_reward_worker_shows_the_judge_the_frames_of_the_video(ray_local, tmp_path):
    """The driver submits a group with its PromptSample only; the worker reads reward.judge.num_frames (8)
    frames of the sample's video and every judge request carries them. A video that cannot be read: the judge
    is not asked, the terms fall back (marked missing, counted)."""
    bodies = []

    def record(body):
        bodies.append(body)
        return 200, VALID_JUDGE_REPLY, 0.0

    (video_sample,), _ = load_manifest(generate(SynthConfig(num_items=1, stage=3, seed=2), tmp_path / "data"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    broken_sample = dataclasses.replace(video_sample, id="broken", video=broken)
    gen = Generator.remote(group_size=2, seconds=0)
    with StubJudgeServer(record) as server:
        pool = RewardPool(RewardConfig(judge=judge_cfg(server.url, fallback=0.1)))
        try:
            pool.submit(ray.get(gen.generate.remote(0))[0], video_sample)
            (scored,) = pool.drain(timeout=120)
            n_bodies = len(bodies)
            pool.submit(ray.get(gen.generate.remote(1))[0], broken_sample)
            (failed,) = pool.drain(timeout=120)
            stats = pool.stats()
        finally:
            pool.shutdown()
    assert scored.error is None and [t.rewards["judge"] for t in scored.trajectories] == [0.5, 0.5]
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
    assert [t.rewards["judge"] for t in failed.trajectories] == [None, None]
    assert stats["judge_media_failures"] == 2 and stats["judge_ok"] == 2


def test_score_and_push_puts_the_group_in_the_stream_once(ray_local, redis_server):
    """The data plane's hand-off: the group reaches the reward worker as an object reference, is scored and
    pushed into the fresh stream by the worker itself; the caller gets ids and counts. The same group again
    (a rescoring after its first receipt was lost) is refused as a duplicate."""
    from buffer_service.config import BufferConfig
    from buffer_service.service import ReplayService

    buffer_cfg = BufferConfig(redis=redis_server.config(), min_size=0)
    pool = RewardPool(RewardConfig(weights={"format": 0.5, "accuracy": 0.5}, num_workers=1),
                      buffer_cfg=buffer_cfg.model_dump())
    gen = Generator.remote(group_size=2, seconds=0)
    try:
        group_ref = ray.put(ray.get(gen.generate.remote(7))[0])
        first = ray.get(pool.workers[0].score_and_push.remote(group_ref, SAMPLE))
        again = ray.get(pool.workers[0].score_and_push.remote(group_ref, SAMPLE))
    finally:
        pool.shutdown()
    assert first.error is None and first.entry_id and (first.accepted, first.duplicates) == (2, 0)
    assert again.entry_id is None and (again.accepted, again.duplicates) == (0, 2)
    [(entry_id, group)] = ReplayService(buffer_cfg).read_fresh("inspector", 10)
    assert entry_id == first.entry_id and [t.trajectory_id for t in group] == ["7/0", "7/1"]
    assert [t.rewards["format"] for t in group] == [1.0, 0.0] and all(t.reward is not None for t in group)
