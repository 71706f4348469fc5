"""The prompt side of the driver: the dataset in a seeded order with a cursor (part of every checkpoint),
and the media provider the learner uses to rebuild a prompt's media exactly as the rollout did."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

from common.node_files import NodePaths
from data.manifest import load_manifest
from data.sample import PromptSample
from data.synth import generate
from policy.config import ProcessorConfig

log = logging.getLogger(__name__)

EVAL_SPLIT_SALT = "avatar-eval-split"


def eval_split_key(prompt_id: str) -> float:
    """A number in [0, 1) from a stable hash (sha256) of the prompt id: the same on every machine and
    run, whatever the row order or Python's hash seed."""
    digest = hashlib.sha256(f"{EVAL_SPLIT_SALT}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(prompt_id: str, fraction: float) -> bool:
    """Whether a prompt of data.manifest belongs to the held-out share data.eval_fraction."""
    return eval_split_key(prompt_id) < fraction


def _read_manifest(path: str, cfg, rejected: list | None, what: str) -> list[PromptSample]:
    samples, bad = load_manifest(path, on_error="skip", allow_outside_paths=cfg.data.allow_outside_paths)
    if bad:
        log.warning("%s: skipped %d invalid rows, e.g. line %d: %s", what, len(bad), bad[0][0], bad[0][1])
    if rejected is not None:
        rejected.extend(bad)
    return samples


def _synthetic(cfg, run_dir: Path, split: str) -> list[PromptSample]:
    """The synthetic dataset generated (once) into the runs folder. The eval split is generated with the seed
    + 1000: item ids are `s<stage>-<seed>-<index>`, so its ids never equal a training id."""
    synth = cfg.data.synth
    if split == "eval":
        synth = synth.model_copy(update={"seed": synth.seed + 1000, "num_items": max(cfg.pipeline.eval_items, 1)})
    variant = "" if synth.kinds is None and not synth.short_answers else \
        "-" + hashlib.sha256(synth.model_dump_json().encode()).hexdigest()[:8]  # the kinds, the answer form
    folder = run_dir.parent / "_data" / f"stage{synth.stage}-seed{synth.seed}-n{synth.num_items}{variant}"
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        generate(synth, folder, progress=True)
    return load_manifest(manifest)[0]


def _manifest_splits(cfg, rejected: list | None, with_eval: bool) -> tuple[list[PromptSample], list[PromptSample]]:
    data = cfg.data
    samples = _read_manifest(data.manifest, cfg, rejected, "data.manifest")
    if data.eval_manifest:
        held = _read_manifest(data.eval_manifest, cfg, rejected if with_eval else None, "data.eval_manifest")
        held_ids = {s.id for s in held}
        train = [s for s in samples if s.id not in held_ids]
        if len(train) < len(samples):
            log.warning("%d prompts of data.manifest (%s) are also in data.eval_manifest (%s): they are evaluated "
                        "and left out of training", len(samples) - len(train), data.manifest, data.eval_manifest)
    else:
        train = [s for s in samples if not is_held_out(s.id, data.eval_fraction)]
        held = [s for s in samples if is_held_out(s.id, data.eval_fraction)]
        log.info("data.manifest: %d prompts for training, %d held out for evaluation (data.eval_fraction=%s)",
                 len(train), len(held), data.eval_fraction)
    return train, held


def load_splits(cfg, run_dir: Path, rejected: list | None = None, with_eval: bool = True
                ) -> tuple[list[PromptSample], list[PromptSample]]:
    """(training prompts, held-out evaluation prompts), disjoint by id.

    With data.manifest: the evaluation prompts are data.eval_manifest's (their ids are taken out of training,
    with a warning), else the share data.eval_fraction of data.manifest chosen by a stable hash of the id.
    Without: the synthetic dataset, its eval split generated with another seed. The evaluation uses at most
    pipeline.eval_items prompts (those first by the hash of their id); with_eval=False skips it. Invalid
    manifest rows are skipped and logged; `rejected` (if given) receives them (data.manifest.RejectedRow)."""
    if cfg.data.manifest:
        train, held = _manifest_splits(cfg, rejected, with_eval)
    else:
        train = _synthetic(cfg, run_dir, "train")
        held = _synthetic(cfg, run_dir, "eval") if with_eval else []
    if not with_eval:
        return train, []
    overlap = {s.id for s in train} & {s.id for s in held}
    if overlap:  # cannot happen by construction; a held-out evaluation must never score training prompts
        raise RuntimeError(f"{len(overlap)} prompt ids are both trained on and held out, e.g. {sorted(overlap)[:3]}")
    return train, _cap(held, cfg.pipeline.eval_items)


def _cap(held: list[PromptSample], n: int) -> list[PromptSample]:
    if len(held) <= n:
        return held
    log.info("evaluating %d of %d held-out prompts (pipeline.eval_items)", n, len(held))
    return sorted(held, key=lambda s: eval_split_key(s.id))[:n]


def load_prompts(cfg, run_dir: Path, split: str = "train", rejected: list | None = None) -> list[PromptSample]:
    """One split of load_splits: "train" or "eval" (the held-out prompts, never trained on)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval" and not cfg.data.manifest:  # without generating the training set
        return _cap(_synthetic(cfg, run_dir, "eval"), cfg.pipeline.eval_items)
    train, held = load_splits(cfg, run_dir, rejected, with_eval=split == "eval")
    return train if split == "train" else held


MAX_SKIPPED_FRACTION = 0.5


def check_skipped(skipped: int, handed_out: int, last_reason: str) -> None:
    """Prompts with unreadable media are skipped and counted; when they are most of what was handed out, the
    job stops naming the last reason (a wrong media root or a broken mount, not a few bad files)."""
    if skipped >= 20 and skipped > MAX_SKIPPED_FRACTION * handed_out:
        raise ValueError(f"{skipped} of the first {handed_out} prompts have unreadable media; the last: {last_reason}")


class PromptOrder:
    """Pass p visits every prompt once in an order seeded by (seed, p); task i is the cursor's i-th."""

    def __init__(self, samples: list[PromptSample], seed: int, shuffle: bool):
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

    def __init__(self, samples: list[PromptSample], processor: ProcessorConfig, model_path: str,
                 paths: NodePaths | None = None):
        self.samples = {s.id: s for s in samples}
        self.processor_cfg, self.model_path = processor, model_path
        self.paths = paths or NodePaths()  # where the node it is called on has the model and the media
        self._processor = None

    def __call__(self, prompt_id: str):
        if self._processor is None:
            from transformers import AutoTokenizer

            from policy.model import is_omni
            from policy.processor import PromptProcessor

            model_path = self.paths.path(self.model_path)
            tok = AutoTokenizer.from_pretrained(model_path)
            self._processor = PromptProcessor(self.processor_cfg, tok, multimodal=is_omni(model_path),
                                              model_path=model_path)
        sample = self.samples.get(prompt_id)
        if sample is None:
            raise KeyError(f"prompt {prompt_id!r} is not in this job's dataset")
        return self._processor.build(self.paths.sample(sample)).media or None
