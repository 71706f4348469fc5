"""The tiny-model factory: models built offline, saved like the real checkpoints, loaded back, trained and
sampled on a real synthetic mp4."""

import json

import pytest
import torch
from safetensors import safe_open

from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from policy import ProcessorConfig, PromptProcessor, TinyModelConfig, build_tiny_model, load_policy
from policy.logprobs import completion_logprobs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    return load_policy(build_tiny_model(TinyModelConfig(kind="omni"), tmp_path_factory.mktemp("omni")))


def test_omni_is_saved_in_the_real_checkpoint_layout(omni):
    config = json.loads((omni.path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["enable_audio_output"] is False
    with safe_open(str(omni.path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("thinker.") for k in keys)
    assert any(k.startswith("thinker.visual.") for k in keys) and any(k.startswith("thinker.audio_tower.") for k in keys)
    assert omni.multimodal and len(omni.tokenizer) == omni.model.config.text_config.vocab_size


def test_same_seed_same_weights(tmp_path, omni):
    other = load_policy(build_tiny_model(TinyModelConfig(kind="omni"), tmp_path))
    for (name, a), (_, b) in zip(omni.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_forward_backward_generate_on_a_real_mp4(tmp_path, omni):
    samples, _ = load_manifest(generate(SynthConfig(num_items=2, stage=2), tmp_path))
    proc = PromptProcessor(ProcessorConfig(max_frames=8), omni.tokenizer)
    p = proc.build(samples[0])
    ids = torch.tensor([p.prompt_token_ids])
    target = torch.tensor([proc.target_ids(samples[0].cot)])
    full = torch.cat([ids, target], 1)
    out = omni.model(input_ids=full, attention_mask=torch.ones_like(full), **p.media)
    loss = torch.nn.functional.cross_entropy(out.logits[0, ids.shape[1] - 1 : -1], target[0])
    loss.backward()
    # gradients reach all three towers: the media really enter the model
    for tower in (omni.model.visual, omni.model.audio_tower, omni.model.model):
        assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in tower.parameters())
    omni.model.zero_grad()
    with torch.no_grad():
        gen = omni.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **p.media,
                                  max_new_tokens=8, do_sample=False)
    completion = gen[0, ids.shape[1]:].tolist()
    assert 1 <= len(completion) <= 8
    # the greedy tokens are the argmax of the log-probs recomputed by the policy helper
    logp = completion_logprobs(omni.model, p.prompt_token_ids, [completion], omni.tokenizer.pad_token_id, p.media)[0]
    assert logp.shape == (len(completion),) and (logp <= 0).all()
    # another video changes the output distribution: the model conditions on the media
    other = proc.build(samples[1])
    logp_other = completion_logprobs(omni.model, other.prompt_token_ids, [completion], omni.tokenizer.pad_token_id,
                                     other.media)[0]
    assert not torch.allclose(logp, logp_other)


def test_text_model_and_head_dim_guard(tmp_path):
    text = load_policy(build_tiny_model(TinyModelConfig(kind="text"), tmp_path / "t"))
    assert not text.multimodal and text.model.config.tie_word_embeddings
    ids = text.tokenizer("<|im_start|>user\nhi<|im_end|>\n", return_tensors="pt")["input_ids"]
    gen = text.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    with pytest.raises(ValueError, match="head_dim >= 32"):
        build_tiny_model(TinyModelConfig(kind="text", hidden_size=64, num_heads=4), tmp_path / "bad")
