"""The local judge: a text engine in its own Ray actor, and the Judge backend that calls it.

Until the rollout engine interface of actors/ is in place, the engine is vLLM's LLM used directly (text only,
greedy). Frames are not shown to a local judge yet: image parts of a message are dropped."""

from __future__ import annotations

import gc
import os
import threading
from typing import Protocol

import ray
from ray.exceptions import GetTimeoutError

from .config import JudgeConfig
from .judge import JudgeError, Messages


class TextEngine(Protocol):
    def chat(self, batch: list[Messages], max_new_tokens: int) -> list[str]:
        """Greedy completions of chat conversations, one per conversation."""
        ...

    def shutdown(self) -> None: ...


class VLLMTextEngine:
    """vllm.LLM on a local model folder; its tokenizer's chat template renders the messages."""

    def __init__(self, model_path: str, max_model_len: int = 4096, cpu_kvcache_gib: int = 1, seed: int = 0):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
        from vllm import LLM

        self.llm = LLM(model=model_path, max_model_len=max_model_len, seed=seed, dtype="float32")

    def chat(self, batch: list[Messages], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.chat([text_only(m) for m in batch], params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def shutdown(self) -> None:
        """Stop the engine process and free its shared memory (before ray.shutdown, see STACK.md)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def text_only(messages: Messages) -> Messages:
    """Messages with list contents flattened to their text parts."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if p.get("type") == "text")
        out.append({"role": m["role"], "content": content})
    return out


@ray.remote(num_cpus=0)
class JudgeEngineActor:
    """Owns the judge engine; one per cluster, shared by every RewardWorker."""

    def __init__(self, model_path: str, max_model_len: int = 4096, cpu_kvcache_gib: int = 1):
        self.engine: TextEngine = VLLMTextEngine(model_path, max_model_len, cpu_kvcache_gib)

    def chat(self, batch: list[Messages], max_new_tokens: int) -> list[str]:
        return self.engine.chat(batch, max_new_tokens)

    def shutdown(self) -> None:
        self.engine.shutdown()


class LocalJudgeBackend:
    """Sends each batch to the judge engine actor in one call. cfg.timeout_s bounds a call (a timed-out call is
    cancelled and all its requests count as timed out); cfg.max_concurrency bounds the calls in flight."""

    def __init__(self, cfg: JudgeConfig, engine):
        self.cfg = cfg
        self.engine = engine
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)

    def complete(self, batch: list[Messages]) -> list[str | BaseException]:
        with self._slots:
            ref = self.engine.chat.remote(batch, self.cfg.max_new_tokens)
            try:
                texts = ray.get(ref, timeout=self.cfg.timeout_s)
            except GetTimeoutError:
                ray.cancel(ref)
                return [TimeoutError(f"judge engine gave no answer within {self.cfg.timeout_s} s")] * len(
                    batch
                )
            except Exception as e:
                return [JudgeError(f"judge engine failed: {type(e).__name__}: {e}")] * len(batch)
        if len(texts) != len(batch):
            return [JudgeError(f"judge engine returned {len(texts)} texts for {len(batch)} requests")] * len(
                batch
            )
        return list(texts)

    def close(self) -> None:
        pass
