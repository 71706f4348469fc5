"""The local judge: a rollout engine (actors.engines) in its own Ray actor, and the Judge backend that calls it.

Frames are not shown to a local judge yet: image parts of a message are dropped (text only, greedy)."""

from __future__ import annotations

import threading
import time

import ray
from ray.exceptions import GetTimeoutError

from .config import JudgeConfig
from .judge import JudgeError, Messages


def text_only(messages: Messages) -> Messages:
    """Messages with list contents flattened to their text parts."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if p.get("type") == "text")
        out.append({"role": m["role"], "content": content})
    return out


# Restartable: an engine that dies is started again by Ray; calls meanwhile fail and the judge falls back
# (counted, the term marked missing).
@ray.remote(num_cpus=0, max_restarts=3, max_task_retries=0)
class JudgeEngineActor:
    """Owns the judge engine (actors.engines: vLLM, or the transformers fallback); one per cluster, shared by
    every RewardWorker. Greedy, text only."""

    def __init__(
        self, model_path: str, max_model_len: int = 4096, engine: str = "vllm", cpu_kvcache_gib: int = 1
    ):
        from actors.config import RolloutConfig
        from actors.engines import create_engine

        cfg = RolloutConfig(engine=engine, max_model_len=max_model_len, cpu_kvcache_gib=cpu_kvcache_gib)
        self.engine = create_engine(cfg, model_path)
        self.counts = {"calls": 0, "expired_calls": 0}

    def chat(self, batch: list[Messages], max_new_tokens: int, deadline: float | None = None) -> list[str] | None:
        """Greedy answers, or None without generating when the caller's deadline (time.time()) has passed.

        Why the deadline: a call queued on an actor cannot be taken back safely, so the answers of callers that
        already timed out would still be generated, one after another, ahead of every new call; after a burst
        (the engine restarting, a slow batch) each new call would then time out too, and retry, for good."""
        self.counts["calls"] += 1
        if deadline is not None and time.time() > deadline:
            self.counts["expired_calls"] += 1
            return None
        return self.engine.chat([text_only(m) for m in batch], max_new_tokens, temperature=0.0)

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def shutdown(self) -> None:
        """Stop the engine inside this actor (before ray.shutdown, see STACK.md)."""
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
            except Exception as e:
                return [JudgeError(f"judge engine failed: {type(e).__name__}: {e}")] * len(batch)
        if texts is None:  # reached the engine just after the deadline
            return timed_out
        if len(texts) != len(batch):
            return [JudgeError(f"judge engine returned {len(texts)} texts for {len(batch)} requests")] * len(
                batch
            )
        return list(texts)

    def close(self) -> None:
        pass
