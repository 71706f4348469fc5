"""The prompt side of the driver: the dataset in a seeded order with a cursor (part of every checkpoint),
and the media provider the learner uses to rebuild a prompt's media exactly as the rollout did."""

from __future__ import annotations

import random
from pathlib import Path

from data.manifest import load_manifest
from data.sample import PromptSample
from data.synth import generate
from policy.config import ProcessorConfig


def load_prompts(cfg, run_dir: Path, split: str = "train", rejected: list | None = None) -> list[PromptSample]:
    """The manifest named by cfg.data.manifest, or the synthetic dataset generated (once) into the run
    folder. The eval split is generated with another seed, so it holds prompts never trained on.
    Invalid manifest rows are skipped and printed; `rejected` (if given) receives their (line, reason)."""
    if cfg.data.manifest:
        samples, bad = load_manifest(cfg.data.manifest, on_error="skip",
                                     allow_outside_paths=cfg.data.allow_outside_paths)
        if bad:
            print(f"[data] skipped {len(bad)} invalid manifest rows, e.g. line {bad[0][0]}: {bad[0][1]}", flush=True)
        if rejected is not None:
            rejected.extend(bad)
        return samples
    synth = cfg.data.synth
    if split == "eval":
        synth = synth.model_copy(update={"seed": synth.seed + 1000, "num_items": max(cfg.pipeline.eval_items, 1)})
    folder = run_dir.parent / "_data" / f"stage{synth.stage}-seed{synth.seed}-n{synth.num_items}"
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        generate(synth, folder, progress=True)
    return load_manifest(manifest)[0]


MAX_SKIPPED_FRACTION = 0.5


def check_skipped(skipped: int, handed_out: int, last_reason: str) -> None:
    """Prompts with unreadable media are skipped and counted; when they are most of what was handed out, the
    job stops naming the last reason (a wrong media root or a broken mount, not a few bad files)."""
    if skipped >= 20 and skipped > MAX_SKIPPED_FRACTION * handed_out:
        raise ValueError(f"{skipped} of the first {handed_out} prompts have unreadable media; the last: {last_reason}")


class PromptOrder:
    """Pass p visits every prompt once in an order seeded by (seed, p); task i is the cursor's i-th."""

    def __init__(self, samples: list[PromptSample], seed: int, shuffle: bool = True):
        if not samples:
            raise ValueError("no prompts to train on")
        self.samples, self.seed, self.shuffle = samples, seed, shuffle
        self._orders: dict[int, list[int]] = {}

    def task(self, cursor: int) -> tuple[str, PromptSample]:
        n = len(self.samples)
        pass_no, index = divmod(cursor, n)
        if pass_no not in self._orders:
            order = list(range(n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + pass_no).shuffle(order)
            self._orders[pass_no] = order
        sample = self.samples[self._orders[pass_no][index]]
        return f"{sample.id}#{pass_no}", sample


class PromptMedia:
    """prompt_id -> the thinker's media tensors (picklable: it travels to the learner actors)."""

    def __init__(self, samples: list[PromptSample], processor: ProcessorConfig, model_path: str):
        self.samples = {s.id: s for s in samples}
        self.processor_cfg, self.model_path = processor, model_path
        self._processor = None

    def __call__(self, prompt_id: str):
        if self._processor is None:
            from transformers import AutoTokenizer

            from policy.model import is_omni
            from policy.processor import PromptProcessor

            tok = AutoTokenizer.from_pretrained(self.model_path)
            self._processor = PromptProcessor(self.processor_cfg, tok, multimodal=is_omni(self.model_path))
        sample = self.samples.get(prompt_id)
        if sample is None:
            raise KeyError(f"prompt {prompt_id!r} is not in this job's dataset")
        return self._processor.build(sample).media or None
