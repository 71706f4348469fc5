"""The DeepSpeed learner in one process on tiny random models (CPU, gloo): it learns, accumulates gradients
exactly, resumes bit-for-bit, runs LoRA and SFT, exports checkpoints that transformers loads, trains the
Omni thinker with video+audio media, and publishes weights as files (the broadcast media:
test_weight_media.py)."""

from __future__ import annotations

import glob
import math

import pytest
import torch

from buffer_service.records import ReplaySample, Trajectory
from learner import objective
from learner.config import LearnerConfig, LoraConfig
from learner.learner import Learner, SFTExample
from learner.weights import state_dict_checksum
from learner.weights.shared_file import SharedFileSender, latest_published, load_published
from policy.config import TinyModelConfig
from policy.logprobs import completion_logprobs
from policy.model import load_policy
from policy.tiny import ensure_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    """One gloo group for the module; removed (with DeepSpeed's shm leftovers of this run) afterwards."""
    before = set(glob.glob("/dev/shm/deepspeed_*"))
    yield
    from learner.distributed import shutdown_distributed

    shutdown_distributed()
    for path in set(glob.glob("/dev/shm/deepspeed_*")) - before:
        try:
            import os

            os.unlink(path)
        except OSError:
            pass


def cfg(**kw) -> LearnerConfig:
    base = dict(zero_stage=1, lr=1e-2, warmup_ratio=0.0, micro_batch_size=4)
    base.update(kw)
    return LearnerConfig(**base)


def problem(seed=0, n=4, plen=8, clen=6, vocab=500):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (plen,), generator=g).tolist()
    comps = [torch.randint(0, vocab, (clen + i % 2,), generator=g).tolist() for i in range(n)]
    return prompt, comps


def make_group(learner_or_logprobs, prompt, comps, rewards, tag, prompt_id="p0"):
    probes = [Trajectory(f"{tag}/{i}", tag, prompt_id, prompt, c, [0.0] * len(c), 0) for i, c in enumerate(comps)]
    lps = learner_or_logprobs(probes) if callable(learner_or_logprobs) else learner_or_logprobs
    return [Trajectory(f"{tag}/{i}", tag, prompt_id, prompt, c, [float(x) for x in lp], 0, reward=r)
            for i, (c, lp, r) in enumerate(zip(comps, lps, rewards))]


def seq_logps(learner, prompt, comps):
    return [float(lp.sum()) for lp in learner.completion_logprobs(make_group(lambda p: [[0.0] * len(c) for c in comps],
                                                                              prompt, comps, [0] * len(comps), "x"))]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_learner_raises_logprob_of_rewarded_completion(text_model, zero_stage):
    learner = Learner(cfg(zero_stage=zero_stage), text_model, total_steps=20)
    prompt, comps = problem()
    rewards = [1.0, 0.0, 0.0, 0.0]
    before = seq_logps(learner, prompt, comps)
    for step in range(4):  # on-policy: behaviour log-probs from the current weights each step
        group = make_group(learner.completion_logprobs, prompt, comps, rewards, f"g{step}")
        out = learner.train_step([group])
        assert out["step"] == step + 1 and out["ratio_max"] == pytest.approx(1.0, abs=1e-4)
        if step == 0:  # the policy is still the reference: no KL
            assert out["kl_per_trajectory"] == pytest.approx({t.trajectory_id: 0.0 for t in group}, abs=1e-6)
    # the hint rule's KL: per trajectory, the mean over its tokens of k3 = exp(ref - logp) - (ref - logp) - 1,
    # logp being the policy that took the step (here the behaviour log-probs, on-policy)
    ref = load_policy(text_model, "float32").model.eval()
    with torch.no_grad():
        ref_lps = completion_logprobs(ref, prompt, comps, learner.pad_id)
    for t, r in zip(group, ref_lps):
        d = r.double() - torch.tensor(t.behaviour_logprobs, dtype=torch.float64)
        assert out["kl_per_trajectory"][t.trajectory_id] == pytest.approx((d.exp() - d - 1).mean().item(), rel=1e-3)
    assert min(out["kl_per_trajectory"].values()) > 0
    after = seq_logps(learner, prompt, comps)
    assert after[0] - before[0] > 5.0, (before, after)  # rewarded: clearly more likely
    gains = [a - b for a, b in zip(after, before)]
    assert gains[0] > max(gains[1:]) + 5.0, gains  # and far more than the unrewarded ones
    assert set(out["advantages"]) == {f"g3/{i}" for i in range(4)}
    assert out["advantages"]["g3/0"] > 0 > out["advantages"]["g3/1"]
    assert out["mean_logratio_old_ref"]["g3/0"] > 0  # the policy moved away from the reference on it
    learner.close()


@pytest.mark.gpu
def test_learner_steps_in_bf16_on_cuda(text_model):
    """The release's precision on its hardware: bf16 weights in the DeepSpeed engine on a CUDA device; the
    rewarded completion becomes more likely than the others."""
    learner = Learner(cfg(precision="bf16", zero_stage=2), text_model, total_steps=20)
    assert learner.device.type == "cuda"
    assert {p.dtype for p in learner.engine.module.parameters()} == {torch.bfloat16}
    prompt, comps = problem()
    before = seq_logps(learner, prompt, comps)
    for step in range(4):
        group = make_group(learner.completion_logprobs, prompt, comps, [1.0, 0.0, 0.0, 0.0], f"g{step}")
        out = learner.train_step([group])
        assert out["step"] == step + 1 and math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    gains = [a - b for a, b in zip(seq_logps(learner, prompt, comps), before)]
    assert gains[0] > 1.0 and gains[0] > max(gains[1:]), gains
    learner.close()


def test_train_step_is_the_objectives_composition(text_model, monkeypatch):
    """The learner's loss is learner.objective's, the path the hand-computed and GRPO-reduction tests check:
    step_advantages once per step, avatar_loss once per micro-batch. A learner that built its loss any other way
    would not call them; and its reported loss equals avatar_loss on the whole batch, computed here from the
    model's log-probs before the step (the reference is the starting model; a replayed trajectory brings its own
    reference log-probs, so the KL term is not 0)."""
    import learner.learner as learner_module

    calls = {"step_advantages": 0, "avatar_loss": 0}

    def spy(name):
        def call(*args):
            calls[name] += 1
            return getattr(objective, name)(*args)
        return call

    for name in calls:
        monkeypatch.setattr(learner_module, name, spy(name))
    lcfg = cfg(micro_batch_size=2)
    learner = Learner(lcfg, text_model, total_steps=20)
    prompt, comps = problem(seed=3)
    fresh = make_group(learner.completion_logprobs, prompt, comps, [1.0, 0.0, 0.5, 0.0], "f")
    fresh[1].behaviour_logprobs = [x + 0.3 for x in fresh[1].behaviour_logprobs]  # A < 0, ratio exp(-0.3): clipped
    old = make_group(learner.completion_logprobs, prompt, comps[:2], [1.0, 0.0], "r", prompt_id="p1")
    old[0].ref_logprobs = [x + 0.2 for x in old[0].behaviour_logprobs]
    replay = [ReplaySample(t, rbar=0.25, tier="hard") for t in old]
    trajs = fresh + old
    current = learner.completion_logprobs(trajs)  # the policy before the step = the reference
    out = learner.train_step([fresh], replay)
    assert calls == {"step_advantages": 1, "avatar_loss": 3}  # 6 sequences in micro-batches of 2

    width = max(len(t.completion_token_ids) for t in trajs)

    def rows(values):
        return torch.stack([torch.nn.functional.pad(torch.tensor(v, dtype=torch.float32), (0, width - len(v)))
                            for v in values])

    mask = rows([[1.0] * len(t.completion_token_ids) for t in trajs])
    adv = objective.step_advantages(torch.tensor([t.reward for t in trajs]), torch.tensor([0, 0, 0, 0, 1, 2]),
                                    torch.tensor([False] * 4 + [True] * 2), torch.tensor([0.0] * 4 + [0.25] * 2),
                                    lcfg.objective)
    ref = [t.ref_logprobs if t.ref_logprobs is not None else lp.tolist() for t, lp in zip(trajs, current)]
    by_hand = objective.avatar_loss(objective.ObjectiveInputs(
        rows([lp.tolist() for lp in current]), rows([t.behaviour_logprobs for t in trajs]), rows(ref), mask, adv),
        lcfg.objective)
    assert out["advantages"] == pytest.approx({t.trajectory_id: a for t, a in zip(trajs, adv.tolist())})
    assert out["loss"] == pytest.approx(by_hand.loss.item(), rel=1e-4, abs=1e-6)
    assert out["kl"] == pytest.approx(by_hand.stats["kl"], rel=1e-3) and out["kl"] > 0
    assert out["clip_fraction"] == pytest.approx(by_hand.stats["clip_fraction"]) and out["clip_fraction"] > 0
    learner.close()


def test_replay_and_accumulation_match_one_big_micro_batch(text_model):
    """Mixed fresh+replay step: micro-batches of 1 accumulate to the same update as one micro-batch of 8."""
    prompt, comps = problem(seed=1)
    params = []
    for micro in (8, 1):
        learner = Learner(cfg(micro_batch_size=micro, zero_stage=2), text_model, total_steps=20)
        fresh = make_group(learner.completion_logprobs, prompt, comps, [1.0, 0.0, 1.0, 0.0], "f")
        old = make_group(learner.completion_logprobs, prompt, comps[:3], [1.0, 0.0, 0.0], "r", prompt_id="p1")
        old[0].behaviour_logprobs = [x - 0.3 for x in old[0].behaviour_logprobs]  # stale: ratio != 1
        replay = [ReplaySample(t, rbar=0.4, tier="hard") for t in old]
        out = learner.train_step([fresh], replay)
        params.append((out, torch.cat([p.detach().flatten().clone() for p in learner.engine.module.parameters()])))
        learner.close()
    (a, pa), (b, pb) = params
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["advantages"] == pytest.approx(b["advantages"])
    assert a["replay_fraction"] == pytest.approx(3 / 7) and a["ratio_max"] > 1.2  # exp(0.3)
    assert a["clip_fraction"] > 0
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # same gradient scale (Adam hides it)
    assert torch.allclose(pa, pb, atol=1e-4)  # Adam's first step is ~lr * sign(g): 1e-4 is 1% of a step


def test_resume_is_bit_for_bit(text_model, tmp_path):
    prompt, comps = problem(seed=2)
    rewards = [0.0, 1.0, 0.5, 0.0]
    base = Learner(cfg(zero_stage=2, warmup_ratio=0.25, lr_schedule="cosine"), text_model, total_steps=8)
    batches = [make_group(base.completion_logprobs, prompt, comps, rewards, f"b{i}") for i in range(4)]
    outs = [base.train_step([b]) for b in batches]
    full = [o["loss"] for o in outs]
    base.close()
    # the stage's 8 steps set the schedule: warm-up ceil(0.25 * 8) = 2 steps, then cosine to 0 at step 8. The
    # lr reported after step k is the one step k + 1 uses: 2/3 (warm-up), 1, then 0.5 (1 + cos(pi k / 6)).
    assert base.schedule.warmup == 2 and base.schedule.total == 8
    assert [o["lr"] for o in outs] == pytest.approx(
        [1e-2 * m for m in (2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 6)), 0.5 * (1 + math.cos(math.pi / 3)))])

    first = Learner(cfg(zero_stage=2, warmup_ratio=0.25, lr_schedule="cosine"), text_model, total_steps=8)
    head = [first.train_step([b])["loss"] for b in batches[:2]]
    first.policy_version = 7
    first.save_checkpoint(tmp_path / "ckpt")
    first.close()
    resumed = Learner(cfg(zero_stage=2, warmup_ratio=0.25, lr_schedule="cosine"), text_model, total_steps=8)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert (resumed.step, resumed.policy_version) == (2, 7)
    tail = [resumed.train_step([b])["loss"] for b in batches[2:]]
    assert head + tail == full  # exact equality, not approx
    assert len(set(full)) == 4
    resumed.close()


def test_lora_learns_and_merged_export_matches(text_model, tmp_path):
    learner = Learner(cfg(lora=LoraConfig(enabled=True), lr=5e-2), text_model, total_steps=20)
    trainable = [n for n, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    prompt, comps = problem(seed=3)
    before = seq_logps(learner, prompt, comps)
    for step in range(3):
        out = learner.train_step([make_group(learner.completion_logprobs, prompt, comps, [0, 0, 1.0, 0], f"l{step}")])
    after = seq_logps(learner, prompt, comps)
    assert after[2] - before[2] > 1.0
    assert out["kl"] > 0  # reference = adapters disabled, so the KL sees the update
    learner.export_hf(tmp_path / "export")
    hf = load_policy(tmp_path / "export")
    lps = completion_logprobs(hf.model, prompt, comps, hf.tokenizer.pad_token_id)
    assert [float(x.sum()) for x in lps] == pytest.approx(after, abs=1e-3)
    learner.close()


def test_sft_stage0_lowers_target_nll(text_model):
    learner = Learner(cfg(mode="sft", lr=1e-2), text_model, total_steps=20)
    prompt, comps = problem(seed=4)
    examples = [SFTExample(prompt, c) for c in comps[:2]]
    losses = [learner.sft_step(examples)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.5, losses
    learner.close()


def test_export_hf_text_and_transformers_greedy(text_model, tmp_path):
    learner = Learner(cfg(zero_stage=2), text_model, total_steps=20)
    prompt, comps = problem(seed=5)
    learner.train_step([make_group(learner.completion_logprobs, prompt, comps, [1.0, 0, 0, 0], "e")])
    out = learner.export_hf(tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    hf = load_policy(out)
    ours = seq_logps(learner, prompt, comps)
    theirs = [float(x.sum()) for x in completion_logprobs(hf.model, prompt, comps, hf.tokenizer.pad_token_id)]
    assert theirs == pytest.approx(ours, abs=1e-4)
    base = [float(x.sum()) for x in completion_logprobs(load_policy(text_model).model, prompt, comps, 0)]
    assert theirs != pytest.approx(base, abs=1e-3)  # the export holds the trained weights
    learner.close()


# --- weight publishing ----------------------------------------------------------------------------------------


def test_safetensors_publish_bumps_version_and_verifies(text_model, tmp_path):
    learner = Learner(cfg(), text_model, total_steps=20)
    sender = SharedFileSender(tmp_path / "pub", timeout_s=60, keep=2)
    infos = [learner.publish(sender) for _ in range(3)]
    assert [i["version"] for i in infos] == [1, 2, 3] and learner.policy_version == 3
    version, path = latest_published(tmp_path / "pub")
    assert version == 3
    v, sd, checksum = load_published(path)
    assert v == 3 and checksum == infos[-1]["checksum"] == state_dict_checksum(learner.checkpoint_state_dict())
    assert "lm_head.weight" not in sd  # tied, as in the base checkpoint (what vLLM's reload expects)
    assert len(list((tmp_path / "pub").glob("weights-v*.safetensors"))) == 2  # old versions pruned
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # flip a weight byte
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        load_published(path)
    learner.close()


