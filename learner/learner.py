"""The DeepSpeed learner: feeds the pure objective (learner/objective.py) and steps.

One Learner per rank. It holds the policy inside a DeepSpeed engine (ZeRO 0-3, fp32 or bf16), the reference
policy (the base model with LoRA adapters disabled, or a frozen copy of the starting weights), the policy
version, and turns fresh groups plus replayed samples into one optimizer step.

Why the reference log-probs are computed here and not at rollout time: the rollout engines (vLLM) hold only
the current policy; a second model per engine would double their memory, and the reference never changes, so
one no-grad forward in the learner (cheap next to the backward) keeps the engines lean. It runs once per
trajectory: train_step returns the log-probs it computed (stats["ref_logprobs"]) for the caller to store with
the trajectory, and a trajectory that already carries ref_logprobs (e.g. a replayed one) is not recomputed.

Multimodal prompts (the Qwen2.5-Omni thinker): a micro-batch mixes rows of several prompts, each with its own
media. Each prompt's media go through the vision and audio towers once per forward (not once per row); the
text model gets the embeddings with the media features on their placeholder tokens and the 3-D rope
positions from per-row grids and audio lengths. With learner.freeze_media_encoders (the default) the towers
keep their starting weights, so their outputs are computed once per prompt under no_grad, cached by bytes
(learner.media_cache_mb) and shared by the policy and the reference forwards.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from buffer_service.records import ReplaySample, Trajectory
from policy.logprobs import encode_media, gather_logprobs, media_nbytes, media_positions, scatter_media
from policy.model import is_omni, load_policy

from .config import LearnerConfig
from .distributed import init_distributed, setup_accelerator_env
from .objective import ObjectiveInputs, avatar_loss, k3_kl, sft_loss, step_advantages
from .weights import Sender

MediaProvider = Callable[[str], Mapping[str, torch.Tensor] | None]


@dataclass
class SFTExample:
    """A stage-0 target: the processed prompt and the chain-of-thought completion to imitate."""

    prompt_token_ids: list[int]
    target_token_ids: list[int]
    prompt_id: str | None = None  # for media, as for trajectories


class _MediaEntry:
    """One prompt's media as the learner holds them: the processed tensors, or, once the frozen towers
    have encoded them, only the (video, audio) features plus what the rope positions need."""

    __slots__ = ("media", "features", "nbytes")

    def __init__(self, media: Mapping[str, torch.Tensor], features=None):
        self.media, self.features = media, features
        if features is not None:  # keep only the small tensors the positions need
            self.media = {k: v for k, v in media.items()
                          if k in ("video_grid_thw", "video_second_per_grid", "feature_attention_mask",
                                   "use_audio_in_video")}
        self.nbytes = media_nbytes(self.media) + media_nbytes(features)


class MediaCache:
    """Least-recently-used cache of per-prompt media, bounded by bytes (an entry larger than the bound is
    used but not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self._items: OrderedDict[str, _MediaEntry | None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> _MediaEntry | None:
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: str, entry: _MediaEntry | None) -> None:
        size = entry.nbytes if entry is not None else 0
        if size > self.max_bytes:
            return
        if key in self._items:
            old = self._items.pop(key)
            self.nbytes -= old.nbytes if old is not None else 0
        self._items[key] = entry
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes if old is not None else 0


@dataclass
class _Row:
    prompt_id: str | None
    prompt: list[int]
    completion: list[int]
    old: list[float] | None = None
    ref: list[float] | None = None


class WarmupSchedule:
    """lr multiplier: linear warm-up over `warmup` steps, then constant or a linear/cosine decay to 0."""

    def __init__(self, warmup: int, total: int, kind: str = "constant"):
        self.warmup, self.total, self.kind = warmup, total, kind

    @classmethod
    def for_stage(cls, warmup_ratio: float, total_steps: int, kind: str = "constant") -> WarmupSchedule:
        """The schedule of a stage of `total_steps` optimizer steps (pipeline.steps): warm-up over
        ceil(warmup_ratio * total_steps) steps (rounded first, so 0.07 * 100 is 7 and not 8)."""
        return cls(math.ceil(round(warmup_ratio * total_steps, 9)), total_steps, kind)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 1.0 - progress if self.kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def plan_micro_batches(keys: Sequence[str | None], micro: int, world: int, by_key: bool) -> list[list[list[int]]]:
    """Split row indices into micro-batches of at most `micro` rows, deal them round-robin to the ranks and
    pad every rank to the same count with empty micro-batches (ZeRO needs the same collectives on all
    ranks). by_key keeps rows of one prompt together (their media are repeated, not mixed)."""
    if by_key:
        groups: dict[str | None, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        chunks = [g[j : j + micro] for g in groups.values() for j in range(0, len(g), micro)]
    else:
        chunks = [list(range(j, min(j + micro, len(keys)))) for j in range(0, len(keys), micro)]
    per_rank = [chunks[r::world] for r in range(world)]
    count = max(1, max(len(c) for c in per_rank))
    return [c + [[] for _ in range(count - len(c))] for c in per_rank]


def _pad(rows: Sequence[Sequence[float]], width: int, starts: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, (values, s) in enumerate(zip(rows, starts)):
        if values:
            out[i, s : s + len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


class Learner:
    def __init__(
        self,
        cfg: LearnerConfig,
        model_path: str | Path,
        *,
        total_steps: int,
        media_provider: MediaProvider | None = None,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ):
        setup_accelerator_env()
        import deepspeed

        init_distributed(rank, world_size, master_addr, master_port)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.model_path = Path(model_path)
        self.media_provider = media_provider
        self._media_cache = MediaCache(int(cfg.media_cache_mb * 2**20))
        self._step_media: dict[str, _MediaEntry | None] = {}  # this step's entries (evictions cannot drop them)
        _seed_everything(cfg.seed + rank)
        dtype = "bfloat16" if cfg.precision == "bf16" else "float32"

        loaded = load_policy(model_path, dtype)
        self.tokenizer, self.multimodal = loaded.tokenizer, loaded.multimodal
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.key_prefix = "thinker." if is_omni(model_path) else ""
        model = loaded.model
        self.ref_model = None
        uses_ref = cfg.reference == "frozen_model" and cfg.objective.kl_beta > 0
        self.encoders_frozen = self.multimodal and cfg.freeze_media_encoders
        if self.encoders_frozen:
            model.visual.requires_grad_(False).eval()
            model.audio_tower.requires_grad_(False).eval()
        if cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            peft_cfg = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                      target_modules="all-linear", bias="none",
                                      exclude_modules=r"(visual|audio_tower)\..*" if self.encoders_frozen else None)
            model = get_peft_model(model, peft_cfg)
        elif uses_ref:
            self.ref_model = load_policy(model_path, dtype).model.eval().requires_grad_(False)
        self.uses_ref = uses_ref

        # the stage's length (pipeline.steps) sets the warm-up and the decay: one source for the step count
        self.schedule = schedule = WarmupSchedule.for_stage(cfg.warmup_ratio, total_steps, cfg.lr_schedule)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,  # micro-batches are accumulated by hand (set_..._boundary)
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.precision == "bf16"},
            "optimizer": {"type": "AdamW", "params": {
                "lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
                "torch_adam": True,  # no JIT-compiled fused Adam (40 s on CPU)
            }},
            "steps_per_print": 10**9,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.device = self.engine.device
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.step = 0
        self.policy_version = 0

    # --- forward passes -----------------------------------------------------------------------------------

    def _thinker(self) -> torch.nn.Module:
        """The policy's own model (under LoRA: the base model the adapters sit in)."""
        module = self.engine.module
        return module.get_base_model() if hasattr(module, "get_base_model") else module

    def _media(self, prompt_id: str | None) -> _MediaEntry | None:
        """Prompt media from the provider (the same processor as the rollout), cached per prompt_id (by
        bytes); with frozen towers the cache holds their outputs instead of the processed media."""
        if not self.multimodal or self.media_provider is None or prompt_id is None:
            return None
        if prompt_id in self._step_media:
            return self._step_media[prompt_id]
        if prompt_id in self._media_cache:
            entry = self._media_cache.get(prompt_id)
        else:
            media = self.media_provider(prompt_id)
            entry = None
            if media:
                features = None
                if self.encoders_frozen:
                    with torch.no_grad():
                        features = tuple(None if f is None else f.detach()
                                         for f in encode_media(self._thinker(), [media])[0])
                entry = _MediaEntry(media, features)
            self._media_cache.put(prompt_id, entry)
        self._step_media[prompt_id] = entry
        return entry

    def _prefetch_media(self, rows: Sequence[_Row]) -> None:
        """Hold this step's media, fetched (and with frozen towers encoded) in the batch's order: every rank
        sees the same full batch, so under ZeRO-3 all ranks run the same tower forwards."""
        self._step_media = {}
        for r in rows:
            self._media(r.prompt_id)

    def _inputs(self, rows: Sequence[_Row]) -> tuple[dict, torch.Tensor, list[int]]:
        seqs = [r.prompt + r.completion for r in rows]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width))
        for i, (r, s) in enumerate(zip(rows, seqs)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
            mask[i, len(r.prompt) : len(s)] = 1
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device),
                  "use_cache": False, "logits_from": min(len(r.prompt) for r in rows) - 1}
        entries = [self._media(r.prompt_id) for r in rows]
        if any(e is not None for e in entries):  # rows of several prompts, each with its own media
            kwargs["position_ids"] = media_positions(self._thinker(), kwargs["input_ids"], kwargs["attention_mask"],
                                                     [e.media if e is not None else None for e in entries])
            kwargs["media_rows"] = entries
        return kwargs, mask.to(self.device), [len(r.prompt) for r in rows]

    def _features(self, thinker: torch.nn.Module, entries: Sequence[_MediaEntry | None]) -> list:
        """Per row, its prompt's (video, audio) features: the cached frozen-tower outputs, or the towers of
        `thinker` run once per distinct prompt of the micro-batch (under the caller's grad mode)."""
        if self.encoders_frozen:
            return [e.features if e is not None else None for e in entries]
        distinct = list({id(e): e for e in entries if e is not None}.values())
        encoded = dict(zip(map(id, distinct), encode_media(thinker, [e.media for e in distinct])))
        return [encoded[id(e)] if e is not None else None for e in entries]

    def _logprobs(self, model: torch.nn.Module, kwargs: dict, thinker: torch.nn.Module | None = None
                  ) -> torch.Tensor:
        """[B, L]: entry t is log p(input_ids[t] | input_ids[:t]) for the completion positions t (entries
        before kwargs["logits_from"] + 1, inside the shortest prompt, are 0: the lm_head and the log-softmax
        run only from there on). `thinker` is the model whose towers, embeddings and lm_head serve `model`
        (the policy's by default)."""
        ids = kwargs["input_ids"]
        start = kwargs.get("logits_from", 0)
        thinker = thinker if thinker is not None else self._thinker()
        # the lm_head sees only the positions from `start` on (the prompt's logits are never used)
        head = thinker.get_output_embeddings().register_forward_pre_hook(
            lambda _, args: (args[0][:, start:], *args[1:]))
        try:
            entries = kwargs.get("media_rows")
            if entries is not None:
                embeds = scatter_media(thinker.get_input_embeddings()(ids), ids, thinker.config,
                                       self._features(thinker, entries))
                logits = model(inputs_embeds=embeds, attention_mask=kwargs["attention_mask"],
                               position_ids=kwargs["position_ids"], use_cache=False).logits
            else:
                logits = model(input_ids=ids, attention_mask=kwargs["attention_mask"], use_cache=False).logits
        finally:
            head.remove()
        logp = gather_logprobs(logits[:, :-1], ids[:, start + 1:])
        return torch.cat([logp.new_zeros(logp.shape[0], start + 1), logp], dim=1)

    @torch.no_grad()
    def _ref_logprobs(self, kwargs: dict) -> torch.Tensor:
        if self.cfg.lora.enabled:
            with self.engine.module.disable_adapter():
                return self._logprobs(self.engine.module, kwargs, self._thinker())
        return self._logprobs(self.ref_model, kwargs, self.ref_model)

    def _train_mode(self) -> None:
        self.engine.train()
        if self.encoders_frozen:  # frozen towers stay in eval mode (their cached outputs are deterministic)
            self._thinker().visual.eval()
            self._thinker().audio_tower.eval()

    @torch.no_grad()
    def completion_logprobs(self, items: Sequence[Trajectory | SFTExample]) -> list[torch.Tensor]:
        """Current-policy log-probs of each item's completion tokens (all ranks must call under ZeRO-3)."""
        rows = [_to_row(x) for x in items]
        self._prefetch_media(rows)
        out = []
        for chunk in plan_micro_batches([r.prompt_id for r in rows], self.cfg.micro_batch_size, 1, False)[0]:
            if not chunk:
                continue
            kwargs, mask, _ = self._inputs([rows[i] for i in chunk])
            logp = self._logprobs(self.engine, kwargs)
            out += [(i, logp[j][mask[j].bool()].float().cpu()) for j, i in enumerate(chunk)]
        self._step_media = {}
        return [lp for _, lp in sorted(out, key=lambda x: x[0])]

    # --- training steps -----------------------------------------------------------------------------------

    def train_step(self, fresh_groups: Sequence[Sequence[Trajectory]],
                   replay_samples: Sequence[ReplaySample] = ()) -> dict:
        """One optimizer step of the AVATAR objective on fresh groups (group advantages) plus replayed
        samples (VCRS advantages against their rbar). Every rank gets the same full batch and trains on its
        share. Returns the step's metrics and, per trajectory id, the advantage it used and the mean
        (behaviour - reference) log-prob, for the replay service's priority score."""
        start = time.perf_counter()
        trajs = [t for g in fresh_groups for t in g] + [s.trajectory for s in replay_samples]
        if not trajs:
            raise ValueError("train_step: empty batch (no fresh groups and no replay samples)")
        for t in trajs:
            if len(t.behaviour_logprobs) != len(t.completion_token_ids) or not t.completion_token_ids:
                raise ValueError(f"trajectory {t.trajectory_id}: {len(t.completion_token_ids)} completion tokens "
                                 f"but {len(t.behaviour_logprobs)} behaviour log-probs (need equal, non-zero)")
        n_fresh = len(trajs) - len(replay_samples)
        group_ids = {gid: i for i, gid in enumerate(dict.fromkeys(t.group_id for t in trajs))}
        adv = step_advantages(
            torch.tensor([t.reward for t in trajs], dtype=torch.float32),
            torch.tensor([group_ids[t.group_id] for t in trajs]),
            torch.tensor([i >= n_fresh for i in range(len(trajs))]),
            torch.tensor([0.0] * n_fresh + [s.rbar for s in replay_samples], dtype=torch.float32),
            self.cfg.objective)
        rows = [_to_row(t) for t in trajs]
        totals = self._accumulate(rows, lambda logp, old, ref, mask, idx, n_seq, n_tok: avatar_loss(
            ObjectiveInputs(logp, old, ref, mask, adv[idx], num_sequences=n_seq, num_tokens=n_tok),
            self.cfg.objective))
        gap, kl_seq = totals.pop("old_minus_ref"), totals.pop("kl_per_sequence")
        computed_ref = totals.pop("ref_computed")
        return {
            **totals,
            "adv_abs_mean": adv.abs().mean().item(),
            "replay_fraction": len(replay_samples) / len(trajs),
            "seconds": time.perf_counter() - start,
            "advantages": {t.trajectory_id: float(a) for t, a in zip(trajs, adv)},
            "mean_logratio_old_ref": {t.trajectory_id: gap.get(i) for i, t in enumerate(trajs)},
            # mean per-token k3 KL of the current policy to the reference, per trajectory (the hint rule's KL)
            "kl_per_trajectory": {t.trajectory_id: kl_seq[i] for i, t in enumerate(trajs) if i in kl_seq},
            # reference log-probs per completion token, for the trajectories whose reference was computed in
            # this step (those that came without): stored with the trajectory, they are not computed again
            "ref_logprobs": {t.trajectory_id: computed_ref[i] for i, t in enumerate(trajs) if i in computed_ref},
        }

    def sft_step(self, examples: Sequence[SFTExample]) -> dict:
        """Stage 0: one optimizer step of supervised fine-tuning on chain-of-thought targets."""
        start = time.perf_counter()
        if not examples:
            raise ValueError("sft_step: no examples")
        rows = [_to_row(e) for e in examples]
        totals = self._accumulate(rows, lambda logp, old, ref, mask, idx, n_seq, n_tok: _SFTOut(
            sft_loss(logp, mask, self.cfg.objective.aggregation, n_seq, n_tok)), needs_old=False)
        totals.pop("old_minus_ref"), totals.pop("kl_per_sequence"), totals.pop("ref_computed")
        return {**totals, "seconds": time.perf_counter() - start}

    def _accumulate(self, rows: list[_Row], loss_fn, needs_old: bool = True) -> dict:
        """Forward/backward this rank's micro-batches (gradients accumulate), then one engine step. Losses
        use the whole step's denominators, times world_size because DeepSpeed averages gradients over ranks."""
        import torch.distributed as dist

        n_seq, n_tok = len(rows), sum(len(r.completion) for r in rows)
        # rows without reference log-probs first, so that as many micro-batches as possible need no
        # reference forward; micro-batches mix prompts (each row carries its own prompt's media)
        order = sorted(range(n_seq), key=lambda i: not (needs_old and self.uses_ref and rows[i].ref is None))
        plan = [[order[j] for j in chunk] for chunk in plan_micro_batches(
            [rows[i].prompt_id for i in order], self.cfg.micro_batch_size, self.world_size, False)[self.rank]]
        self._prefetch_media(rows)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, tokens, clip*tok, kl*tok, zero_adv*tok
        ratio_max = torch.tensor([0.0], dtype=torch.float64)
        gap: dict[int, float] = {}
        kl_seq: dict[int, float] = {}
        computed_ref: dict[int, list[float]] = {}
        self._train_mode()
        for k, chunk in enumerate(plan):
            dummy = not chunk  # keeps collectives in step on a rank without work; contributes 0
            idx = chunk or [0]
            self.engine.set_gradient_accumulation_boundary(k == len(plan) - 1)
            kwargs, mask, starts = self._inputs([rows[i] for i in idx])
            width = mask.shape[1]
            old = _pad([rows[i].old or [] for i in idx], width, starts).to(self.device) if needs_old else None
            ref = None
            if needs_old and self.uses_ref:
                ref = _pad([rows[i].ref or [] for i in idx], width, starts).to(self.device)
                need = [j for j, i in enumerate(idx) if rows[i].ref is None]
                if need:  # the reference forward only on the rows that come without reference log-probs
                    sub = kwargs if len(need) == len(idx) else self._inputs([rows[idx[j]] for j in need])[0]
                    fresh_ref = self._ref_logprobs(sub).float()
                    ref[need, : fresh_ref.shape[1]] = fresh_ref
                    if not dummy:
                        for j in need:
                            computed_ref[idx[j]] = ref[j][mask[j].bool()].cpu().tolist()
                for j, i in enumerate(idx):
                    sel = mask[j].bool()
                    gap[i] = (old[j][sel] - ref[j][sel]).mean().item()
            logp = self._logprobs(self.engine, kwargs)
            if ref is not None:
                with torch.no_grad():
                    k3 = k3_kl(logp.detach().float(), ref)
                for j, i in enumerate(idx):
                    kl_seq[i] = k3[j][mask[j].bool()].mean().item()
            out = loss_fn(logp, old, ref, mask, torch.tensor(idx), n_seq, n_tok)
            loss = out.loss * (0.0 if dummy else float(self.world_size))
            self.engine.backward(loss, scale_wrt_gas=False)
            if not dummy:
                tok = out.stats.get("tokens", float(mask.sum()))
                sums += torch.tensor([out.loss.item(), tok, out.stats.get("clip_fraction", 0.0) * tok,
                                      out.stats.get("kl", 0.0) * tok, out.stats.get("zero_adv_token_fraction", 0.0)
                                      * tok], dtype=torch.float64)
                ratio_max = torch.maximum(ratio_max, torch.tensor([out.stats.get("ratio_max", 0.0)],
                                                                  dtype=torch.float64))
        self.engine.step()
        self.step += 1
        self._step_media = {}
        if self.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX)
            gathered: list[tuple] = [() for _ in range(self.world_size)]
            dist.all_gather_object(gathered, (gap, kl_seq, computed_ref))
            gap = {k: v for g, _, _ in gathered for k, v in g.items()}
            kl_seq = {k: v for _, g, _ in gathered for k, v in g.items()}
            computed_ref = {k: v for _, _, g in gathered for k, v in g.items()}
        tokens = max(sums[1].item(), 1.0)
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "step": self.step, "policy_version": self.policy_version, "lr": self.scheduler.get_last_lr()[0],
            "loss": sums[0].item(), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens": int(n_tok), "sequences": n_seq, "clip_fraction": sums[2].item() / tokens,
            "kl": sums[3].item() / tokens, "zero_adv_token_fraction": sums[4].item() / tokens,
            "ratio_max": ratio_max.item(), "old_minus_ref": gap, "kl_per_sequence": kl_seq,
            "ref_computed": computed_ref,
        }

    # --- weights out --------------------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights (LoRA merged) on CPU, named exactly as in the base checkpoint
        (`thinker.` prefix for Qwen2.5-Omni; tied lm_head left out where the base leaves it out).
        Every rank must call (ZeRO-3 gathers the partitions)."""
        raw = self._gathered_state()
        if self.cfg.lora.enabled:
            raw = _merge_lora(raw, self.cfg.lora.alpha / self.cfg.lora.r)
        base_keys = _checkpoint_keys(self.model_path)
        out = {self.key_prefix + k: v for k, v in raw.items() if self.key_prefix + k in base_keys}
        missing = {k for k in base_keys if k.startswith(self.key_prefix)} - set(out)
        if missing:
            raise RuntimeError(f"checkpoint_state_dict: {len(missing)} base weights not produced, e.g. "
                               f"{sorted(missing)[:3]}")
        return out

    def _gathered_state(self) -> dict[str, torch.Tensor]:
        from contextlib import nullcontext

        import deepspeed

        module = self.engine.module
        gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                  if self.cfg.zero_stage == 3 else nullcontext())
        with gather:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter alone in peft's saved format, under the base checkpoint's prefix (what vLLM's LoRA
        loader maps onto its modules, e.g. base_model.model.thinker.model.layers.0.mlp.up_proj.lora_A.weight).
        Every rank must call (ZeRO-3 gathers the partitions)."""
        head = "base_model.model."
        return {head + self.key_prefix + k.removeprefix(head).replace(".default.", "."): v
                for k, v in self._gathered_state().items() if ".lora_" in k}

    def adapter_config(self) -> dict:
        """The adapter's adapter_config.json (peft's, with its target modules listed)."""
        cfg = self.engine.module.peft_config["default"].to_dict()
        targets = cfg.get("target_modules")
        cfg["target_modules"] = sorted(targets) if isinstance(targets, set | list | tuple) else targets
        cfg["exclude_modules"] = None  # the towers have no adapter modules to exclude: nothing to match
        cfg["base_model_name_or_path"] = str(self.model_path)
        return json.loads(json.dumps(cfg, default=str))

    def publish(self, sender: Sender | None, bump: bool = True, version: int | None = None,
                receivers: int = 0) -> dict | None:
        """Bump the policy version and publish the weights under it through `sender`, a medium's sending side
        (learner/weights/; rank 0 sends, other ranks only help gather; `receivers`: how many engines take a
        broadcast). Returns the announcement (None off rank 0). bump=False republishes the current version;
        `version` publishes under that version (a resumed job whose lost run had published past its
        checkpoint: versions stay monotonic, so nothing generated by the lost versions looks fresh)."""
        state = self.adapter_state_dict() if self.cfg.publish_medium == "lora" else self.checkpoint_state_dict()
        if version is not None:
            if version < self.policy_version:
                raise ValueError(f"publish: version {version} is older than the learner's {self.policy_version}")
            self.policy_version = version
        elif bump:
            self.policy_version += 1
        if self.rank != 0 or sender is None:
            return None
        return sender.publish(state, self.policy_version, receivers)

    def export_hf(self, out_dir: str | Path) -> Path:
        from .checkpoint import export_hf

        state = self.checkpoint_state_dict()
        if self.rank == 0:
            export_hf(state, self.model_path, out_dir, self.key_prefix)
        _barrier()
        return Path(out_dir)

    def save_checkpoint(self, directory: str | Path) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, directory)

    def load_checkpoint(self, directory: str | Path) -> dict:
        from .checkpoint import load_checkpoint

        return load_checkpoint(self, directory)

    def close(self) -> None:
        """Free the engine; the process group stays (tests and actors tear it down with the process)."""
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        self.engine = None
        self.ref_model = None


class _SFTOut:
    def __init__(self, loss: torch.Tensor):
        self.loss, self.stats = loss, {}


def _to_row(x: Trajectory | SFTExample) -> _Row:
    if isinstance(x, Trajectory):
        return _Row(x.prompt_id, list(x.prompt_token_ids), list(x.completion_token_ids),
                    list(x.behaviour_logprobs), list(x.ref_logprobs) if x.ref_logprobs is not None else None)
    return _Row(x.prompt_id, list(x.prompt_token_ids), list(x.target_token_ids))


def _merge_lora(raw: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft names -> base names with W + scaling * B @ A folded in (done by hand so it also works on
    gathered ZeRO-3 copies)."""
    out = {}
    for key, value in raw.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            stem = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            if key.endswith(".weight") and f"{stem}.lora_A.default.weight" in raw:
                a, b = raw[f"{stem}.lora_A.default.weight"], raw[f"{stem}.lora_B.default.weight"]
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out


def _checkpoint_keys(model_path: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            keys.update(h.keys())
    if not keys:
        raise FileNotFoundError(f"{model_path}: no *.safetensors weights found")
    return keys


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
