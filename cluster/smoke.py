"""The foundation check: build the tiny model and the synthetic data, then one forward/backward and one
generate of the tiny Omni thinker on a real synthetic mp4."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from data.manifest import load_manifest
from data.synth import generate
from policy import PromptProcessor, load_policy, resolve_model_path

from .config import JobConfig


def run_smoke(cfg: JobConfig, run_dir: Path) -> dict:
    t0 = time.time()
    model_dir = resolve_model_path(cfg.model, run_dir.parent / "_models")
    print(f"[smoke] model: {model_dir}", flush=True)
    manifest = Path(cfg.data.manifest) if cfg.data.manifest else generate(cfg.data.synth, run_dir / "data", progress=True)
    samples, _ = load_manifest(manifest)
    print(f"[smoke] data: {manifest} ({len(samples)} prompts)", flush=True)
    policy = load_policy(model_dir, cfg.model.dtype)
    processor = PromptProcessor(cfg.processor, policy.tokenizer, multimodal=policy.multimodal, model_path=model_dir)
    sample = samples[0]
    prompt = processor.build(sample, hint=sample.hint)
    ids = torch.tensor([prompt.prompt_token_ids])
    target = torch.tensor([processor.target_ids(sample.cot or sample.answer)])
    full = torch.cat([ids, target], dim=1)
    out = policy.model(input_ids=full, attention_mask=torch.ones_like(full), **prompt.media)
    logits = out.logits[0, ids.shape[1] - 1 : -1]
    loss = torch.nn.functional.cross_entropy(logits.float(), target[0])
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in policy.model.parameters() if p.grad is not None))
    policy.model.zero_grad()
    with torch.no_grad():
        gen = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.media,
                                    max_new_tokens=16, do_sample=False)
    completion = policy.tokenizer.decode(gen[0, ids.shape[1]:])
    result = {
        "prompt_tokens": ids.shape[1],
        "video_grid_thw": prompt.media.get("video_grid_thw", torch.zeros(1, 3)).tolist()[0],
        "sft_loss": round(float(loss.detach()), 4),
        "grad_norm": round(float(grad_norm), 4),
        "generated": completion,
        "seconds": round(time.time() - t0, 1),
    }
    print(f"[smoke] {sample.id}: {result['prompt_tokens']} prompt tokens, video grid {result['video_grid_thw']}, "
          f"SFT loss {result['sft_loss']}, grad norm {result['grad_norm']}", flush=True)
    print(f"[smoke] greedy completion of the random model: {completion!r}", flush=True)
    return result
