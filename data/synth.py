"""A synthetic audio-visual dataset whose questions need the eyes and the ears.

Each item is a real mp4 (H.264 video + AAC audio, written with PyAV) or an mp4 without sound plus a wav
file. Coloured shapes follow one another on screen (stage 3: several at once, left/centre/right) while
beeps sound, low (440 Hz) or high (1320 Hz). Questions by stage:
- 1, visual: the colour of the last shape (multiple choice); how many shapes were shown (numerical);
- 2, audio-visual: how many beeps sound while a given shape is on screen (numerical); which colour was
  showing when the high tone played (multiple choice);
- 3, localisation: which object makes the sound (it grows at each beep), answered "Left: red circle";
- tone_pitch (chosen with SynthConfig.kinds), audio: are the beeps (all one tone) high or low;
- 0, SFT: a mix of all, each with its chain-of-thought target.
Difficulty (easy/medium/hard) sets the number of shapes and beeps. Deterministic from the seed.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.console import configure_console

from .config import SynthConfig
from .manifest import write_manifest
from .sample import PromptSample

log = logging.getLogger(__name__)

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "center", "right")
LOW_HZ, HIGH_HZ = 440.0, 1320.0
BEEP_SECONDS = 0.15
SHORT_REASONING = "<think>I watch and listen.</think>"  # the short form's fixed reasoning (SynthConfig.short_answers)
BACKGROUND = (30, 30, 30)
LEVELS = {"easy": (2, (1, 2)), "medium": (3, (2, 4)), "hard": (4, (4, 6))}  # shapes, beeps (min, max)
KINDS_BY_STAGE = {1: ("last_colour", "count_shapes"), 2: ("beeps_during", "colour_at_high_tone"), 3: ("localization",)}


@dataclass
class Segment:
    colour: str
    shape: str
    position: str
    start: float
    end: float


@dataclass
class Beep:
    time: float
    high: bool


def draw_shape(frame: np.ndarray, shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float) -> None:
    h, w, _ = frame.shape
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    else:  # triangle pointing up
        mask = (yy <= cy + r * 0.8) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
    frame[mask] = colour


def position_x(position: str, size: int) -> float:
    return size * {"left": 1 / 6, "center": 1 / 2, "right": 5 / 6}[position]


def render_frames(segments: list[Segment], beeps: list[Beep], cfg: SynthConfig, sounding: Segment | None) -> np.ndarray:
    n = int(round(cfg.seconds * cfg.fps))
    frames = np.empty((n, cfg.size, cfg.size, 3), dtype=np.uint8)
    radius = cfg.size / 8 * cfg.shape_scale
    for i in range(n):
        t = (i + 0.5) / cfg.fps
        frame = frames[i]
        frame[:] = BACKGROUND
        beeping = any(b.time <= t < b.time + BEEP_SECONDS + 0.1 for b in beeps)
        for seg in segments:
            if seg.start <= t < seg.end:
                r = radius * (1.5 if (seg is sounding and beeping) else 1.0)
                draw_shape(frame, seg.shape, COLOURS[seg.colour], position_x(seg.position, cfg.size), cfg.size / 2, r)
    return frames


def render_audio(beeps: list[Beep], cfg: SynthConfig) -> np.ndarray:
    sr = cfg.sample_rate
    audio = np.zeros(int(cfg.seconds * sr), dtype=np.float32)
    t = np.arange(int(BEEP_SECONDS * sr)) / sr
    envelope = np.minimum(1.0, np.minimum(t, BEEP_SECONDS - t) / 0.01)  # 10 ms fades: no clicks
    for b in beeps:
        tone = 0.5 * envelope * np.sin(2 * np.pi * (HIGH_HZ if b.high else LOW_HZ) * t)
        start = int(b.time * sr)
        audio[start : start + tone.size] += tone[: audio.size - start]
    return audio


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None, sample_rate: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        vstream.options = {"crf": "16", "preset": "ultrafast"}
        astream = container.add_stream("aac", rate=sample_rate, layout="mono") if audio is not None else None
        for f in frames:
            for packet in vstream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            step = 1024
            for start in range(0, audio.size, step):
                chunk = audio[start : start + step].astype(np.float32)[None, :]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)


def spoken_answer(answer: str, options: list[str]) -> str:
    """The answer as the short form says it: a multiple-choice option by its text ("red", not "B"; the
    accuracy reward takes either), anything else as it is."""
    for option in options:
        letter, _, text = option.partition(". ")
        if letter == answer:
            return text
    return answer


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


class _Item:
    """Builds one item's timeline and its question."""

    def __init__(self, rng: np.random.Generator, cfg: SynthConfig, kind: str, level: str):
        self.rng, self.cfg, self.kind, self.level = rng, cfg, kind, level
        n_shapes, (bmin, bmax) = LEVELS[level]
        self.n_beeps = int(rng.integers(bmin, bmax + 1))
        if kind == "localization":
            self.segments = self._side_by_side(min(n_shapes, 3))
        else:
            self.segments = self._sequence(n_shapes)
        self.beeps = self._beeps(self.n_beeps, one_high=(kind == "colour_at_high_tone"),
                                 all_same=(kind == "tone_pitch"))
        self.sounding = self.segments[int(rng.integers(len(self.segments)))] if kind == "localization" else None

    def _distinct(self, n: int) -> list[tuple[str, str]]:
        colours = list(self.rng.permutation(list(COLOURS)))
        shapes = [SHAPES[int(self.rng.integers(len(SHAPES)))] for _ in range(n)]
        return list(zip(colours[:n], shapes))

    def _sequence(self, n: int) -> list[Segment]:
        length = self.cfg.seconds / n
        return [Segment(c, s, "center", i * length, (i + 1) * length) for i, (c, s) in enumerate(self._distinct(n))]

    def _side_by_side(self, n: int) -> list[Segment]:
        positions = sorted(self.rng.choice(POSITIONS, size=n, replace=False), key=POSITIONS.index)
        return [Segment(c, s, str(p), 0.0, self.cfg.seconds) for (c, s), p in zip(self._distinct(n), positions)]

    def _beeps(self, n: int, one_high: bool, all_same: bool) -> list[Beep]:
        # Beep times on a grid so that no two overlap and none sits on a segment boundary.
        slots = np.arange(0.2, self.cfg.seconds - 0.3, 0.35)
        bounds = {round(s.end, 3) for s in self.segments}
        slots = [t for t in slots if all(abs(t - b) > 0.2 and abs(t + BEEP_SECONDS - b) > 0.1 for b in bounds)]
        times = sorted(self.rng.choice(slots, size=min(n, len(slots)), replace=False).tolist())
        high = [False] * len(times)
        if one_high:
            high[int(self.rng.integers(len(times)))] = True
        elif all_same:
            high = [bool(self.rng.random() < 0.5)] * len(times)
        else:
            high = [bool(self.rng.random() < 0.5) for _ in times]
        return [Beep(round(t, 3), h) for t, h in zip(times, high)]

    def question(self) -> tuple[str, str, str, list[str], str, str, str]:
        """(problem_type, question, answer, options, cot, hint, audio caption)."""
        segs, beeps = self.segments, self.beeps
        caption = f"{len(beeps)} short beep(s): " + ", ".join(("high" if b.high else "low") for b in beeps)
        if self.kind == "beeps_during":
            target = segs[int(self.rng.integers(len(segs)))]
            inside = [b for b in beeps if target.start <= b.time < target.end]
            times = ", ".join(f"{b.time:.1f}s" for b in beeps)
            cot = (f"<think>1. The {target.colour} {target.shape} is on screen from {target.start:.1f}s to "
                   f"{target.end:.1f}s. 2. Beeps sound at {times}. 3. {len(inside)} of them fall while it is "
                   f"shown.</think><answer>{len(inside)}</answer>")
            q = f"How many beeps sound while the {target.colour} {target.shape} is on screen?"
            hint = f"First find when the {target.colour} {target.shape} is on screen, then count only the beeps in that interval."
            return "numerical", q, str(len(inside)), [], cot, hint, caption
        if self.kind == "colour_at_high_tone":
            beep = next(b for b in beeps if b.high)
            seg = next(s for s in segs if s.start <= beep.time < s.end)
            options, letter = self._colour_options(seg.colour)
            cot = (f"<think>1. The high tone plays at {beep.time:.1f}s. 2. At that moment the {seg.colour} "
                   f"{seg.shape} is showing.</think><answer>{letter}</answer>")
            q = "Which colour was showing when the high tone played?"
            hint = "Listen for the higher-pitched tone, then look at which colour is on screen at that moment."
            return "multiple_choice", q, letter, options, cot, hint, caption
        if self.kind == "tone_pitch":
            pitch = "high" if beeps[0].high else "low"
            choices = list(self.rng.permutation(["high", "low"]))
            letter = _letters(2)[choices.index(pitch)]
            cot = f"<think>1. Every beep is the same tone. 2. It is the {pitch} one.</think><answer>{letter}</answer>"
            return ("multiple_choice", "Are the beeps high or low?", letter,
                    [f"{x}. {c}" for x, c in zip(_letters(2), choices)], cot,
                    "Compare the beeps' pitch with a low 440 Hz tone.", caption)
        if self.kind == "last_colour":
            seg = segs[-1]
            options, letter = self._colour_options(seg.colour)
            cot = f"<think>1. The last shape shown is a {seg.colour} {seg.shape}.</think><answer>{letter}</answer>"
            return ("multiple_choice", "What colour is the shape when the video ends?", letter, options, cot,
                    "Look at the final frames of the video.", caption)
        if self.kind == "count_shapes":
            names = ", ".join(f"{s.colour} {s.shape}" for s in segs)
            cot = f"<think>1. The shapes shown are: {names}. 2. That is {len(segs)} shapes.</think><answer>{len(segs)}</answer>"
            return ("numerical", "How many shapes appear one after another?", str(len(segs)), [], cot,
                    "Count each shape as it replaces the previous one.", caption)
        # localization
        seg = self.sounding
        answer = f"{seg.position.capitalize()}: {seg.colour} {seg.shape}"
        cot = (f"<think>1. The {seg.colour} {seg.shape} grows each time a beep sounds. 2. It is on the "
               f"{seg.position}.</think><answer>{answer}</answer>")
        q = "Which object makes the sound, and where is it? Answer as 'Position: colour shape'."
        return "localization", q, answer, [], cot, "Watch which object changes when a beep sounds.", caption

    def _colour_options(self, correct: str) -> tuple[list[str], str]:
        n = {"easy": 2, "medium": 3, "hard": 4}[self.level]
        others = [c for c in self.rng.permutation(list(COLOURS)) if c != correct][: n - 1]
        choices = list(self.rng.permutation([correct, *others]))
        letters = _letters(n)
        return [f"{letter}. {c}" for letter, c in zip(letters, choices)], letters[choices.index(correct)]


def generate(cfg: SynthConfig, out_dir: str | Path, progress: bool = False) -> Path:
    """Write `cfg.num_items` items and manifest.jsonl into out_dir; returns the manifest path."""
    out = Path(out_dir)
    (out / "media").mkdir(parents=True, exist_ok=True)
    kinds = cfg.kinds or KINDS_BY_STAGE.get(cfg.stage) or tuple(k for ks in KINDS_BY_STAGE.values() for k in ks)
    levels = tuple(LEVELS)
    samples = []
    for i in range(cfg.num_items):
        rng = np.random.default_rng([cfg.seed, cfg.stage, i])
        kind, level = kinds[i % len(kinds)], levels[(i // len(kinds)) % len(levels)]
        item = _Item(rng, cfg, kind, level)
        ptype, question, answer, options, cot, hint, caption = item.question()
        if cfg.short_answers:
            cot = f"{SHORT_REASONING}<answer>{spoken_answer(answer, options)}</answer>"
        frames = render_frames(item.segments, item.beeps, cfg, item.sounding)
        audio = render_audio(item.beeps, cfg)
        item_id = f"s{cfg.stage}-{cfg.seed}-{i:05d}"
        video = out / "media" / f"{item_id}.mp4"
        separate = rng.random() < cfg.separate_audio_fraction
        wav = out / "media" / f"{item_id}.wav" if separate else None
        write_mp4(video, frames, cfg.fps, None if separate else audio, cfg.sample_rate)
        if wav is not None:
            import soundfile as sf

            sf.write(str(wav), audio, cfg.sample_rate)
        samples.append(PromptSample(
            id=item_id, question=question, problem_type=ptype, answer=answer, video=video, audio=wav,
            options=options, hint=hint, audio_caption=caption, stage=cfg.stage, cot=cot, difficulty=level,
        ))
        if progress and (i + 1) % 10 == 0:
            log.info(f"{i + 1}/{cfg.num_items} items")
    return write_manifest(samples, out / "manifest.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic audio-visual dataset")
    parser.add_argument("out_dir")
    parser.add_argument("--num-items", type=int, default=SynthConfig().num_items)
    parser.add_argument("--stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_console()
    path = generate(SynthConfig(num_items=args.num_items, stage=args.stage, seed=args.seed), args.out_dir, progress=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
