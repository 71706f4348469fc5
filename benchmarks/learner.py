"""The learner's train step on the demo's batch against a bare-torch floor, side by side in one run.

    python -m benchmarks.learner [--steps 4] [--replay-has-ref] [--set freeze_media_encoders=false ...]

The batch is the demo's (configs/demo.yaml): the tiny Qwen2.5-Omni thinker of demo_stage0.yaml, synthetic
stage-2 items (data.synth.generate, 4 s videos at 112x112 with audio) through policy.PromptProcessor with the
demo's processor settings; 4 fresh groups of 4 completions plus 16 replayed samples of 16 other prompts. The
completions are random token ids of random length 60-128 (fixed seed; the same for every run), their
behaviour log-probs the current policy's.

Project: learner.Learner.train_step with the demo's learner settings (ZeRO 1, fp32, micro-batch 8; `--set`
overrides LearnerConfig keys). Floor: the least work the same update needs, in bare torch: the same model and
inputs, learner.objective.avatar_loss, torch AdamW (clipped to the same norm), no DeepSpeed, each prompt's
media encoded once per step, all prompts in one call per tower (frozen towers: once, under no_grad, kept across
steps and shared by the reference), the reference forward only on the trajectories that lack ref log-probs,
all 32 sequences in one forward pass, the lm_head and log-softmax only from the shortest prompt's end on. (One
pass pads every row to the longest; on CPU, where a bigger batch buys no efficiency, the project's
micro-batches of 8 pad less and can come out below this floor.)
Both run with torch.set_num_threads(1) (as Ray gives an actor with num_cpus=0), steps interleaved so the
machine's load hits both alike; the first step of each is a warm-up and is not timed.

Prints a table (step time, ratio project/floor, the project step's breakdown) and writes
benchmarks/results/learner.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from buffer_service.records import ReplaySample, Trajectory
from learner.config import LearnerConfig
from learner.learner import Learner
from learner.objective import ObjectiveInputs, avatar_loss, step_advantages
from policy.config import ProcessorConfig, TinyModelConfig
from policy.logprobs import encode_media, gather_logprobs
from policy.model import load_policy
from policy.processor import PromptProcessor
from policy.tiny import ensure_tiny_model

log = logging.getLogger("benchmarks.learner")

TINY = TinyModelConfig(kind="omni", vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
PROCESSOR = ProcessorConfig(max_frames=8, max_pixels=12544)
DEMO_LEARNER = dict(mode="rl", lr=5e-5, warmup_ratio=0.05, zero_stage=1, micro_batch_size=8)


# --- the batch ------------------------------------------------------------------------------------------

def demo_prompts(cache: Path, tokenizer, n: int) -> dict[str, object]:
    from data.config import SynthConfig
    from data.manifest import load_manifest
    from data.synth import generate

    manifest = cache / "synth" / "manifest.jsonl"
    synth = SynthConfig(num_items=n, stage=2, seconds=4.0, fps=8, size=112)
    if not manifest.is_file() or sum(1 for _ in manifest.open()) < n:
        generate(synth, manifest.parent)
    samples = load_manifest(manifest)[0][:n]
    processor = PromptProcessor(PROCESSOR, tokenizer)
    return {s.id: processor.build(s) for s in samples}


def demo_batch(prompts: dict, logprob_fn, groups: int, group: int, replay: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = list(prompts)
    trajs = []
    for k in range(groups + replay):
        pid = ids[k]
        n = group if k < groups else 1
        for i in range(n):
            length = int(torch.randint(60, 129, (1,), generator=g))
            comp = torch.randint(10, 780, (length,), generator=g).tolist()
            gid = f"g{k}" if k < groups else f"old{k}"
            trajs.append(Trajectory(f"{k}/{i}", gid, pid, prompts[pid].prompt_token_ids, comp, [0.0] * length, 0,
                                    reward=float(torch.rand(1, generator=g).round())))
    for t, lp in zip(trajs, logprob_fn(trajs)):
        t.behaviour_logprobs = lp.tolist()
    fresh = [trajs[k * group:(k + 1) * group] for k in range(groups)]
    replayed = [ReplaySample(t, rbar=0.5, tier="medium") for t in trajs[groups * group:]]
    return fresh, replayed


# --- timers ---------------------------------------------------------------------------------------------

class Timers:
    """Exclusive wall time per name: a call nested in another is charged to itself, not to its caller."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    def push(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        name, t0, child = self.stack.pop()
        dt = time.perf_counter() - t0
        self.total[name] += dt - child
        if self.stack:
            self.stack[-1][2] += dt

    def top(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def wrap(self, obj, attr: str, name) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            self.push(name() if callable(name) else name)
            try:
                return fn(*a, **kw)
            finally:
                self.pop()

        setattr(obj, attr, timed)

    def hook(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.push(name))
        module.register_forward_hook(lambda *_: self.pop())


def _thinker(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def instrument(learner: Learner, timers: Timers) -> None:
    """Charge the project's step to: media encoding (the vision and audio towers, wherever they run),
    reference forward, policy forward, backward, optimizer, host copies (building and copying the inputs)."""
    in_ref = lambda: "reference forward" if timers.top() == "reference forward" else "policy forward"  # noqa: E731
    for attr, name in (("_inputs", "host copies"), ("_ref_logprobs", "reference forward"), ("_logprobs", in_ref)):
        if hasattr(learner, attr):
            timers.wrap(learner, attr, name)
    if hasattr(learner, "_media"):
        timers.wrap(learner, "_media", "host copies")
    timers.wrap(learner.engine, "backward", "backward")
    timers.wrap(learner.engine, "step", "optimizer")
    for model in (_thinker(learner.engine.module), learner.ref_model):
        if model is not None:
            timers.hook(model.visual, "media encoding")
            timers.hook(model.audio_tower, "media encoding")


# --- the floor ------------------------------------------------------------------------------------------

class Floor:
    """The same update with the least work, in bare torch."""

    def __init__(self, model_path: Path, prompts: dict, cfg: LearnerConfig, freeze: bool):
        self.model = load_policy(model_path).model.train()
        self.ref = load_policy(model_path).model.eval().requires_grad_(False)
        self.freeze, self.cfg, self.prompts = freeze, cfg, prompts
        if freeze:
            self.model.visual.requires_grad_(False)
            self.model.audio_tower.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=cfg.weight_decay)
        self.pad = 788  # the tiny tokenizer's pad id (overwritten in main)
        self.timers = Timers()
        self.losses: list[float] = []

    def _encode(self, model, pids, grad: bool):
        if self.freeze:  # frozen towers: each prompt's media encoded once, ever (kept for later steps)
            cache = self.__dict__.setdefault("_frozen", {})
            missing = [p for p in pids if p not in cache]
            cache.update(self._run_towers(model, missing, False))
            return {p: cache[p] for p in pids}
        return self._run_towers(model, pids, grad)

    def _run_towers(self, model, pids, grad: bool):
        """All prompts' media through the towers in one call per tower (per-video grids, per-audio lengths)."""
        with torch.set_grad_enabled(grad):
            return dict(zip(pids, encode_media(model, [self.prompts[p].media for p in pids]))) if pids else {}

    def _embeds(self, model, ids, pids_per_row, feats):
        x = model.get_input_embeddings()(ids)
        video_mask = (ids == model.config.video_token_id).unsqueeze(-1)
        audio_mask = (ids == model.config.audio_token_id).unsqueeze(-1)
        x = x.masked_scatter(video_mask, torch.cat([feats[p][0] for p in pids_per_row]).to(x.dtype))
        return x.masked_scatter(audio_mask, torch.cat([feats[p][1] for p in pids_per_row]).to(x.dtype))

    @staticmethod
    def _logits(model, embeds, attn, positions, start):
        hidden = model.model(inputs_embeds=embeds, attention_mask=attn, position_ids=positions,
                             use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, start:])

    def step(self, fresh, replayed) -> float:
        t = self.timers
        start = time.perf_counter()
        trajs = [x for g in fresh for x in g] + [s.trajectory for s in replayed]
        n_fresh = len(trajs) - len(replayed)
        obj = self.cfg.objective
        group_ids = {gid: i for i, gid in enumerate(dict.fromkeys(x.group_id for x in trajs))}
        adv = step_advantages(
            torch.tensor([x.reward for x in trajs]), torch.tensor([group_ids[x.group_id] for x in trajs]),
            torch.tensor([i >= n_fresh for i in range(len(trajs))]),
            torch.tensor([0.0] * n_fresh + [s.rbar for s in replayed]), obj)
        t.push("host copies")
        seqs = [x.prompt_token_ids + x.completion_token_ids for x in trajs]
        width = max(map(len, seqs))
        ids = torch.full((len(trajs), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(trajs), width), dtype=torch.long)
        mask, old, ref = (torch.zeros(len(trajs), width) for _ in range(3))
        for i, (x, s) in enumerate(zip(trajs, seqs)):
            p = len(x.prompt_token_ids)
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
            mask[i, p:len(s)] = 1
            old[i, p:len(s)] = torch.tensor(x.behaviour_logprobs)
            if x.ref_logprobs is not None:
                ref[i, p:len(s)] = torch.tensor(x.ref_logprobs)
        pids = [x.prompt_id for x in trajs]
        media = [self.prompts[p].media for p in pids]
        positions, _ = self.model.get_rope_index(
            ids, None, torch.cat([m["video_grid_thw"] for m in media]), attn, False,
            torch.cat([m["feature_attention_mask"].sum(1) for m in media]),
            torch.cat([m["video_second_per_grid"] for m in media]))
        t.pop()
        first = min(len(x.prompt_token_ids) for x in trajs) - 1  # no logits inside the prompts
        unique = list(dict.fromkeys(pids))
        need = [i for i, x in enumerate(trajs) if x.ref_logprobs is None]
        t.push("media encoding")
        feats = self._encode(self.model, unique, grad=not self.freeze)
        ref_feats = feats if self.freeze else self._encode(self.ref, list(dict.fromkeys(pids[i] for i in need)), False)
        t.pop()
        if need:
            t.push("reference forward")
            with torch.no_grad():
                sub = torch.tensor(need)
                emb = self._embeds(self.ref, ids[sub], [pids[i] for i in need], ref_feats)
                logits = self._logits(self.ref, emb, attn[sub], positions[:, sub], first)
                lp = gather_logprobs(logits[:, :-1], ids[sub, first + 1:])
                ref[sub, first + 1:] = torch.where(mask[sub, first + 1:].bool(), lp, ref[sub, first + 1:])
            t.pop()
        t.push("policy forward")
        emb = self._embeds(self.model, ids, pids, feats)
        logits = self._logits(self.model, emb, attn, positions, first)
        lp = torch.cat([torch.zeros(len(trajs), first + 1), gather_logprobs(logits[:, :-1], ids[:, first + 1:])], 1)
        out = avatar_loss(ObjectiveInputs(lp, old, ref, mask, adv, len(trajs), int(mask.sum())), obj)
        t.pop()
        self.losses.append(out.loss.item())
        t.push("backward")
        out.loss.backward()
        t.pop()
        t.push("optimizer")
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t.pop()
        return time.perf_counter() - start


# --- main -----------------------------------------------------------------------------------------------

PARTS = ("media encoding", "policy forward", "reference forward", "backward", "optimizer", "host copies", "other")


def _head_learner(path: str, settings: dict, model: Path, prompts: dict):
    """The learner of an earlier revision (a copy of its learner/ package importable as `learner_head` from
    `path`, e.g. made with git show), for a before/after in one run. It knows only the keys it knew."""
    import importlib
    import sys

    sys.path.insert(0, path)
    mod = importlib.import_module("learner_head.learner")
    cfg_cls = importlib.import_module("learner_head.config").LearnerConfig
    known = {k: v for k, v in settings.items() if k in cfg_cls.model_fields}
    return mod.Learner(cfg_cls(**known), model, total_steps=10**6, media_provider=lambda pid: prompts[pid].media)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--replay", type=int, default=16)
    ap.add_argument("--replay-has-ref", action="store_true",
                    help="replayed trajectories carry their reference log-probs (stored when they were fresh)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="LearnerConfig override on top of the demo's learner settings (JSON values)")
    ap.add_argument("--head", default=None, metavar="DIR",
                    help="also time an earlier learner: DIR holds its learner/ package copied as learner_head/")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="benchmarks/results/learner.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cache = Path(tempfile.gettempdir()) / "avatar_bench_learner"
    model = ensure_tiny_model(TINY, cache / "models")
    settings = dict(DEMO_LEARNER)
    for kv in args.set:
        key, value = kv.split("=", 1)
        settings[key] = json.loads(value)
    cfg = LearnerConfig(**settings)
    freeze = bool(getattr(cfg, "freeze_media_encoders", False))
    tok = load_policy(model).tokenizer
    prompts = demo_prompts(cache, tok, args.groups + args.replay)
    learners = {"project": Learner(cfg, model, total_steps=10**6, media_provider=lambda pid: prompts[pid].media)}
    if args.head:
        learners = {"HEAD": _head_learner(args.head, settings, model, prompts), **learners}
    fresh, replayed = demo_batch(prompts, learners["project"].completion_logprobs, args.groups, args.group,
                                 args.replay)
    if args.replay_has_ref:
        ref_model = load_policy(model).model.eval()
        from policy.logprobs import completion_logprobs

        for s in replayed:
            t = s.trajectory
            t.ref_logprobs = completion_logprobs(ref_model, t.prompt_token_ids, [t.completion_token_ids],
                                                 tok.pad_token_id, prompts[t.prompt_id].media)[0].tolist()
    floor = Floor(model, prompts, cfg, freeze)
    floor.pad = tok.pad_token_id
    timers = {name: Timers() for name in learners}
    for name, learner in learners.items():
        instrument(learner, timers[name])
    losses: dict[str, list[float]] = {name: [] for name in learners}

    def project_step(name):
        out = learners[name].train_step(fresh, replayed)
        losses[name].append(out["loss"])
        return out["seconds"]

    runners = {name: (lambda n=name: project_step(n)) for name in learners}
    runners["floor"] = lambda: floor.step(fresh, replayed)
    losses["floor"] = floor.losses
    timers["floor"] = floor.timers
    for run in runners.values():  # warm-up
        run()
    for tm in timers.values():
        tm.total.clear()
    times = {name: [] for name in runners}
    for _ in range(args.steps):  # interleaved: the machine's load hits every variant alike
        for name, run in runners.items():
            times[name].append(run())
    for learner in learners.values():
        learner.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    breakdown = {}
    for name, tm in timers.items():
        total = sum(times[name])
        parts = {p: tm.total.get(p, 0.0) / args.steps for p in PARTS[:-1]}
        parts["other"] = total / args.steps - sum(parts.values())
        breakdown[name] = parts
    tokens = sum(len(t.completion_token_ids) for t in [x for g in fresh for x in g] + [s.trajectory for s in replayed])
    prompt_len = statistics.mean(len(p.prompt_token_ids) for p in prompts.values())
    ratios = {name: med[name] / med["floor"] for name in runners}
    print(f"learner step on the demo batch ({args.groups}x{args.group} fresh + {args.replay} replayed, "
          f"{tokens} completion tokens, prompts ~{prompt_len:.0f} tokens; torch threads {torch.get_num_threads()}; "
          f"replay carries ref: {args.replay_has_ref}; freeze towers: {freeze}; "
          f"micro-batch {cfg.micro_batch_size}; median of {args.steps} steps; {args.label})")
    print(f"{'':<8} {'step s':>7} {'/floor':>6} " + " ".join(f"{p[:12]:>12}" for p in PARTS))
    for name in runners:
        print(f"{name:<8} {med[name]:>7.3f} {ratios[name]:>6.2f} "
              + " ".join(f"{breakdown[name][p]:>12.3f}" for p in PARTS))
    # the same update: at the first (warm-up) step every variant starts from the same weights
    print("first-step loss (same weights, same batch): "
          + ", ".join(f"{name} {values[0]:.6f}" for name, values in losses.items()))
    result = {"losses": losses, "config": vars(args), "learner": settings, "freeze_media_encoders": freeze, "step_s": med,
              "step_times": times, "ratio_to_floor": ratios, "breakdown_s": breakdown, "completion_tokens": tokens,
              "torch_threads": torch.get_num_threads(),
              "completions": "random token ids, random length 60-128 (seed 0)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
