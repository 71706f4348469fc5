"""The learner on the tiny Qwen2.5-Omni thinker with real video+audio prompts: current log-probs are
recomputed with the processor's media (cached per prompt), training moves them, and the export keeps the
Qwen2.5-Omni layout (config qwen2_5_omni, weights under `thinker.`) and reproduces the learner's log-probs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from data.config import SynthConfig
from data.sample import PromptSample
from data.synth import Beep, Segment, render_audio, render_frames, write_mp4
from learner.config import LearnerConfig
from learner.learner import Learner
from policy.config import ProcessorConfig, TinyModelConfig
from policy.logprobs import completion_logprobs
from policy.model import load_policy
from policy.processor import PromptProcessor
from policy.tiny import ensure_tiny_model

from .test_learner import _process_group, make_group  # noqa: F401  (module fixture: one gloo group)

pytestmark = pytest.mark.integration


def test_omni_learner_with_media_and_export(tmp_path):
    model = ensure_tiny_model(TinyModelConfig(kind="omni"), tmp_path / "models")
    synth = SynthConfig(seconds=1.0, fps=8, size=56)
    frames = render_frames([Segment("red", "square", "center", 0.0, 1.0)], [Beep(0.5, True)], synth, None)
    write_mp4(tmp_path / "v.mp4", frames, synth.fps, render_audio([Beep(0.5, True)], synth), synth.sample_rate)
    sample = PromptSample(id="q1", question="How many beeps?", problem_type="numerical", answer="1",
                          video=tmp_path / "v.mp4")
    tok = load_policy(model).tokenizer
    processor = PromptProcessor(ProcessorConfig(max_frames=4, max_pixels=56 * 56, max_audio_seconds=2.0), tok)
    processed = processor.build(sample)
    assert processed.media and "pixel_values_videos" in processed.media
    calls = []

    def media_provider(prompt_id):
        calls.append(prompt_id)
        return processor.build(sample).media

    learner = Learner(LearnerConfig(zero_stage=2, lr=1e-2, warmup_ratio=0.0, micro_batch_size=4), model,
                      total_steps=10, media_provider=media_provider)
    prompt = processed.prompt_token_ids
    g = torch.Generator().manual_seed(0)
    comps = [torch.randint(0, 700, (5,), generator=g).tolist() for _ in range(4)]
    before = [float(x.sum()) for x in learner.completion_logprobs(make_group(
        lambda p: [[0.0] * 5] * 4, prompt, comps, [0] * 4, "x", prompt_id="q1"))]
    # the media matter: without them the same ids give other log-probs
    hf = load_policy(model)
    with_media = completion_logprobs(hf.model, prompt, comps, tok.pad_token_id, processed.media)
    assert [float(x.sum()) for x in with_media] == pytest.approx(before, abs=1e-4)
    for step in range(3):
        out = learner.train_step([make_group(learner.completion_logprobs, prompt, comps, [0, 1.0, 0, 0],
                                             f"o{step}", prompt_id="q1")])
    assert calls == ["q1"]  # built once, then cached
    after = [float(x.sum()) for x in learner.completion_logprobs(make_group(
        lambda p: [[0.0] * 5] * 4, prompt, comps, [0] * 4, "x", prompt_id="q1"))]
    assert after[1] - before[1] > 2.0 and out["kl"] > 0

    export = learner.export_hf(tmp_path / "export")
    assert json.loads((export / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    with safe_open(str(export / "model.safetensors"), "pt") as f, \
            safe_open(str(model / "model.safetensors"), "pt") as b:
        assert set(f.keys()) == set(b.keys()) and all(k.startswith("thinker.") for k in f.keys())
    reloaded = load_policy(export)
    assert reloaded.multimodal
    lps = completion_logprobs(reloaded.model, prompt, comps, tok.pad_token_id, processed.media)
    assert [float(x.sum()) for x in lps] == pytest.approx(after, abs=1e-3)
    learner.close()
