"""The synthetic dataset: deterministic, every difficulty present, and its answers recoverable from the
decoded media alone (so the questions really need both the video and the audio)."""

import functools
import json

import numpy as np
import pytest

from data.config import SynthConfig
from data.manifest import load_manifest
from data.synth import COLOURS, generate
from policy.config import ProcessorConfig
from policy.media import read_audio, read_video
from policy.processor import PromptProcessor
from policy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    return load_manifest(generate(SynthConfig(num_items=6, stage=2, seed=3), tmp_path_factory.mktemp("s2")))[0]


def _colour_of(pixel):
    return min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - pixel.astype(int)).sum())


@functools.cache
def _features():
    return PromptProcessor(ProcessorConfig(), build_tokenizer()).features


def _beeps(sample):
    """(onset seconds, high?) of each beep heard in the item's audio."""
    audio = read_audio(sample.audio or sample.video, 16000, 30)
    features = _features()
    mel = features(audio, sampling_rate=16000, return_tensors="np", padding="longest", truncation=False)
    mel = mel["input_features"][0]
    loud = mel.max(axis=0) > 0.5
    onsets = [i for i in range(1, loud.size) if loud[i] and not loud[i - 1]]
    return [(i / 100, mel[:, i + 5].argmax() > 35) for i in onsets]


def test_answers_follow_from_the_media(stage2):
    kinds = set()
    for s in stage2:
        frames, times = read_video(s.video, fps=8, min_frames=2, max_frames=64)

        def colour_at(t, frames=frames, times=times):
            return _colour_of(frames[np.searchsorted(times, t, side="right") - 1][56, 56])

        beeps = _beeps(s)
        assert beeps, s.id
        if s.question.startswith("How many beeps"):
            kinds.add("beeps_during")
            colour = s.question.split("the ")[1].split()[0]
            counted = sum(1 for t, _ in beeps if colour_at(t + 0.05) == colour)
            assert str(counted) == s.answer, (s.id, beeps)
        else:
            kinds.add("colour_at_high_tone")
            highs = [t for t, high in beeps if high]
            assert len(highs) == 1, (s.id, beeps)
            seen = colour_at(highs[0] + 0.05)
            letter = next(o[0] for o in s.options if o.endswith(seen))
            assert letter == s.answer, (s.id, seen, s.options)
    assert kinds == {"beeps_during", "colour_at_high_tone"}


def test_localisation_answer_is_the_object_that_grows_with_the_beeps(tmp_path):
    samples, _ = load_manifest(generate(SynthConfig(num_items=3, stage=3, seed=1), tmp_path))
    for s in samples:
        frames, times = read_video(s.video, fps=8, min_frames=2, max_frames=64)
        beeps = _beeps(s)
        beep_t = beeps[0][0] + 0.08
        during = frames[np.searchsorted(times, beep_t, side="right") - 1].astype(int)
        quiet_t = min((t for t in times if all(abs(t - b) > 0.4 for b, _ in beeps)), default=None)
        quiet = frames[list(times).index(quiet_t)].astype(int)
        grown = np.abs(during - quiet).sum(axis=2) > 60  # pixels that changed
        cols = np.nonzero(grown.any(axis=0))[0]
        assert cols.size, s.id
        x = cols.mean() / frames.shape[2]
        position = "Left" if x < 1 / 3 else "Center" if x < 2 / 3 else "Right"
        assert s.answer.startswith(position + ":"), (s.id, x, s.answer)
        ys, xs = np.nonzero(grown)
        assert _colour_of(during[ys[0], xs[0]]) in s.answer


def test_deterministic_and_every_difficulty(tmp_path):
    cfg = SynthConfig(num_items=15, stage=0, seed=5, separate_audio_fraction=0.5)
    a = (generate(cfg, tmp_path / "a")).read_text()
    b = (generate(cfg, tmp_path / "b")).read_text()
    assert a == b
    rows = [json.loads(line) for line in a.splitlines()]
    assert {r["difficulty"] for r in rows} == {"easy", "medium", "hard"}
    assert {r["problem_type"] for r in rows} == {"numerical", "multiple_choice", "localization"}
    assert any(r["audio"] for r in rows) and any(not r["audio"] for r in rows)
    for r in rows:
        assert r["cot"].startswith("<think>1. ") and r["cot"].endswith(f"<answer>{r['answer']}</answer>")
        assert r["hint"]
    fa, _ = read_video(tmp_path / "a" / rows[0]["video"], 2, 2, 16)
    fb, _ = read_video(tmp_path / "b" / rows[0]["video"], 2, 2, 16)
    assert np.array_equal(fa, fb)


def test_demo_family_short_answers_follow_from_the_media(tmp_path):
    """The demo's family (configs/demo_stage0.yaml): the last shape's colour and the beeps' one tone, with short
    answers that name the option's text, and shapes of 3/8 of the frame."""
    cfg = SynthConfig(num_items=6, stage=2, seed=5, kinds=["last_colour", "tone_pitch"], short_answers=True,
                      shape_scale=3.0)
    samples = load_manifest(generate(cfg, tmp_path))[0]
    assert [s.question for s in samples[:2]] == ["What colour is the shape when the video ends?",
                                                 "Are the beeps high or low?"]
    for s in samples:
        spoken = next(o.split(". ", 1)[1] for o in s.options if o.startswith(f"{s.answer}."))
        assert s.cot == f"<think>I watch and listen.</think><answer>{spoken}</answer>"
        if s.question.startswith("What colour"):
            frames, _ = read_video(s.video, fps=8, min_frames=2, max_frames=64)
            assert _colour_of(frames[-1][56, 56]) == spoken
            assert _colour_of(frames[-1][56, 56 + 20]) == spoken  # 20 px off centre: background at scale 1 (14 px)
        else:
            pitches = {high for _, high in _beeps(s)}
            assert pitches == {spoken == "high"}, (s.id, _beeps(s))
