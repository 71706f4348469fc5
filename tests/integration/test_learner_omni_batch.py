"""The learner's batched multimodal forward on the tiny Qwen2.5-Omni thinker: several prompts with media of
different sizes in one forward give the per-prompt log-probs; the reference log-probs it returns equal
recomputed ones and are not recomputed when a trajectory carries them; frozen towers stay put while the text
model trains; the media cache stays within its byte bound."""

from __future__ import annotations

import pytest
import torch

from buffer_service.records import ReplaySample
from data.config import SynthConfig
from data.sample import PromptSample
from data.synth import Beep, Segment, render_audio, render_frames, write_mp4
from learner.config import LearnerConfig, LoraConfig
from learner.learner import Learner
from policy.config import ProcessorConfig, TinyModelConfig
from policy.logprobs import completion_logprobs
from policy.model import load_policy
from policy.processor import PromptProcessor
from policy.tiny import ensure_tiny_model

from .test_learner import _process_group, make_group  # noqa: F401  (module fixture: one gloo group)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """The tiny thinker and three prompts whose videos and audios differ in size (frames, pixels, seconds)."""
    root = tmp_path_factory.mktemp("omni_batch")
    model = ensure_tiny_model(TinyModelConfig(kind="omni"), root / "models")
    tok = load_policy(model).tokenizer
    processor = PromptProcessor(ProcessorConfig(max_frames=8, max_pixels=112 * 112, max_audio_seconds=4.0), tok)
    prompts = {}
    for pid, seconds, size in (("a", 1.0, 56), ("b", 2.0, 84), ("c", 1.5, 112)):
        synth = SynthConfig(seconds=seconds, fps=8, size=size)
        beeps = [Beep(0.3, True)]
        frames = render_frames([Segment("red", "square", "center", 0.0, seconds)], beeps, synth, None)
        write_mp4(root / f"{pid}.mp4", frames, synth.fps, render_audio(beeps, synth), synth.sample_rate)
        sample = PromptSample(id=pid, question="How many beeps?", problem_type="numerical", answer="1",
                              video=root / f"{pid}.mp4")
        prompts[pid] = processor.build(sample)
    grids = {tuple(p.media["video_grid_thw"][0].tolist()) for p in prompts.values()}
    mels = {int(p.media["feature_attention_mask"].sum()) for p in prompts.values()}
    assert len(grids) == 3 and len(mels) == 3  # really different media sizes
    return model, tok, prompts


def _cfg(**kw) -> LearnerConfig:
    base = dict(zero_stage=1, lr=1e-2, warmup_ratio=0.0, micro_batch_size=8)
    base.update(kw)
    return LearnerConfig(**base)


def _comps(n, seed, lo=3, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 780, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _mixed(prompts, tag, logprob_fn, rewards=(0.0, 1.0)):
    """One group of two completions per prompt (different lengths), with behaviour log-probs from logprob_fn."""
    groups = []
    for k, (pid, p) in enumerate(prompts.items()):
        comps = _comps(2, seed=k)
        groups.append(make_group(logprob_fn, p.prompt_token_ids, comps, list(rewards), f"{tag}{pid}", prompt_id=pid))
    return groups


@pytest.mark.parametrize("freeze", [True, False])
def test_batched_forward_matches_per_prompt(omni, freeze):
    model, tok, prompts = omni
    learner = Learner(_cfg(freeze_media_encoders=freeze), model, total_steps=10,
                      media_provider=lambda pid: prompts[pid].media)
    items = [t for g in _mixed(prompts, "x", lambda p: [[0.0] * len(t.completion_token_ids) for t in p]) for t in g]
    calls = []
    hook = learner._thinker().model.register_forward_hook(lambda *_: calls.append(1))
    batched = learner.completion_logprobs(items)
    hook.remove()
    assert len(calls) == 1  # six rows of three prompts: one forward
    hf = load_policy(model).model.eval()
    for pid, p in prompts.items():  # the per-prompt forward with the prompt's media repeated per row
        rows = [t for t in items if t.prompt_id == pid]
        ref = completion_logprobs(hf, p.prompt_token_ids, [t.completion_token_ids for t in rows], tok.pad_token_id,
                                  p.media)
        for t, r in zip(rows, ref):
            assert torch.allclose(batched[items.index(t)], r, atol=1e-5, rtol=0), (pid, freeze)
    learner.close()


def test_reference_logprobs_returned_and_reused(omni):
    model, tok, prompts = omni
    cfg = _cfg(lr=1e-3)
    a = Learner(cfg, model, total_steps=10, media_provider=lambda pid: prompts[pid].media)
    groups = _mixed(prompts, "r", a.completion_logprobs)
    replay = [ReplaySample(t, rbar=0.5, tier="medium") for t in _mixed(prompts, "old", a.completion_logprobs)[0]]
    out_a = a.train_step(groups, replay)
    trajs = [t for g in groups for t in g] + [s.trajectory for s in replay]
    assert set(out_a["ref_logprobs"]) == {t.trajectory_id for t in trajs}
    base = load_policy(model).model.eval()  # the reference is the starting weights
    for t in trajs:
        want = completion_logprobs(base, t.prompt_token_ids, [t.completion_token_ids], tok.pad_token_id,
                                   prompts[t.prompt_id].media)[0]
        got = torch.tensor(out_a["ref_logprobs"][t.trajectory_id])
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)
    a.close()

    # a twin learner on the same batch, the trajectories now carrying the stored reference log-probs
    b = Learner(cfg, model, total_steps=10, media_provider=lambda pid: prompts[pid].media)
    calls = []
    b._ref_logprobs = lambda kwargs: calls.append(1)  # would fail if called
    for t in trajs:
        t.ref_logprobs = out_a["ref_logprobs"][t.trajectory_id]
    out_b = b.train_step(groups, replay)
    assert calls == [] and out_b["ref_logprobs"] == {}
    for key in ("loss", "kl", "grad_norm", "clip_fraction"):
        assert out_b[key] == pytest.approx(out_a[key], rel=1e-5, abs=1e-7), key
    assert out_b["mean_logratio_old_ref"] == pytest.approx(out_a["mean_logratio_old_ref"], abs=1e-6)
    b.close()


def _weights(module, prefix):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("freeze,lora", [(True, False), (False, False), (True, True)])
def test_frozen_encoders(omni, freeze, lora):
    model, tok, prompts = omni
    learner = Learner(_cfg(freeze_media_encoders=freeze, lora=LoraConfig(enabled=lora)), model, total_steps=10,
                      media_provider=lambda pid: prompts[pid].media)
    thinker = learner._thinker()
    if lora:
        names = [n for n, _ in learner.engine.module.named_parameters() if "lora_" in n]
        assert names and not any(".visual." in n or ".audio_tower." in n for n in names)
    towers = {p: _weights(getattr(thinker, p), "") for p in ("visual", "audio_tower")}
    text_before = _weights(thinker.model, "")
    for step in range(2):
        learner.train_step(_mixed(prompts, f"f{step}", learner.completion_logprobs, rewards=(0.0, 1.0)))
    for part, before in towers.items():
        after = _weights(getattr(thinker, part), "")
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == freeze, part
    if lora:  # the text model's adapters trained (merged weights differ from the base)
        merged = learner.checkpoint_state_dict()
        base = load_policy(model).model.state_dict()
        assert any(not torch.equal(merged["thinker." + k], v) for k, v in base.items() if k.startswith("model."))
        assert all(torch.equal(merged["thinker." + k], v) for k, v in base.items()
                   if k.startswith(("visual.", "audio_tower.")))
    else:
        text_after = _weights(thinker.model, "")
        assert any(not torch.equal(text_before[k], text_after[k]) for k in text_before)
    learner.close()


@pytest.mark.parametrize("freeze", [True, False])
def test_media_cache_byte_bound(omni, freeze):
    model, tok, prompts = omni
    sizes = {}
    probe = Learner(_cfg(freeze_media_encoders=freeze), model, total_steps=10,
                    media_provider=lambda pid: prompts[pid].media)
    for pid in prompts:
        probe._media(pid)
        sizes[pid] = probe._media_cache.get(pid).nbytes
    probe.close()
    bound = max(sizes.values()) + min(sizes.values()) // 2  # room for one entry, never for two
    calls = []

    def provider(pid):
        calls.append(pid)
        return prompts[pid].media

    learner = Learner(_cfg(freeze_media_encoders=freeze, media_cache_mb=bound / 2**20), model, total_steps=10,
                      media_provider=provider)
    items = [t for g in _mixed(prompts, "m", lambda p: [[0.0] * len(t.completion_token_ids) for t in p]) for t in g]
    for _ in range(2):
        learner.completion_logprobs(items)
        assert learner._media_cache.nbytes <= bound and len(learner._media_cache) == 1
    assert calls.count("a") == 2  # evicted and fetched again (least recently used first)
    learner.train_step(_mixed(prompts, "s", learner.completion_logprobs))  # one step's media held past evictions
    assert learner._media_cache.nbytes <= bound
    learner.close()


@pytest.fixture(scope="module")
def interleaved(omni, tmp_path_factory):
    """Prompts whose video carries its own audio, interleaved in 1, 2 and 3 chunks (processor.use_audio_in_video),
    and one whose audio is a separate wav (separate items): both layouts in one batch."""
    import soundfile as sf

    model, tok, _ = omni
    root = tmp_path_factory.mktemp("interleaved")
    processor = PromptProcessor(ProcessorConfig(max_frames=12, max_pixels=56 * 56, max_audio_seconds=6.0,
                                                use_audio_in_video=True), tok, model_path=model)
    prompts = {}
    for pid, seconds in (("one", 1.0), ("two", 4.0), ("three", 5.5), ("wav", 2.0)):
        synth = SynthConfig(seconds=seconds, fps=8, size=56)
        beeps = [Beep(0.3, True)]
        frames = render_frames([Segment("red", "square", "center", 0.0, seconds)], beeps, synth, None)
        audio = render_audio(beeps, synth)
        write_mp4(root / f"{pid}.mp4", frames, synth.fps, None if pid == "wav" else audio, synth.sample_rate)
        wav = None
        if pid == "wav":
            wav = root / "wav.wav"
            sf.write(str(wav), audio, synth.sample_rate)
        prompts[pid] = processor.build(PromptSample(id=pid, question="How many beeps?", problem_type="numerical",
                                                    answer="1", video=root / f"{pid}.mp4", audio=wav))
    assert [bool(p.media.get("use_audio_in_video")) for p in prompts.values()] == [True, True, True, False]
    return model, tok, prompts


@pytest.mark.parametrize("freeze", [True, False])
def test_batched_forward_with_interleaved_prompts(interleaved, freeze):
    """Interleaved prompts (1-3 chunks) and a separate-items prompt in one forward: each row's log-probs equal
    those of its prompt alone through the thinker's own forward (its get_rope_index with the prompt's layout)."""
    model, tok, prompts = interleaved
    learner = Learner(_cfg(freeze_media_encoders=freeze), model, total_steps=10,
                      media_provider=lambda pid: prompts[pid].media)
    items = [t for g in _mixed(prompts, "i", lambda p: [[0.0] * len(t.completion_token_ids) for t in p]) for t in g]
    batched = learner.completion_logprobs(items)
    hf = load_policy(model).model.eval()
    for pid, p in prompts.items():
        rows = [t for t in items if t.prompt_id == pid]
        ref = completion_logprobs(hf, p.prompt_token_ids, [t.completion_token_ids for t in rows], tok.pad_token_id,
                                  p.media)
        for t, r in zip(rows, ref):
            assert torch.allclose(batched[items.index(t)], r, atol=1e-5, rtol=0), (pid, freeze)
    # the aligned positions matter: the same tokens with separate-item positions give other log-probs
    two = prompts["two"]
    sep = {k: v for k, v in two.media.items() if k != "use_audio_in_video"}
    rows = [t for t in items if t.prompt_id == "two"]
    alt = completion_logprobs(hf, two.prompt_token_ids, [rows[0].completion_token_ids], tok.pad_token_id, sep)[0]
    assert (alt - batched[items.index(rows[0])]).abs().max().item() > 1e-4
    learner.close()
