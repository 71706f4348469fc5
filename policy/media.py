"""Decoding media files: video frames with decord, audio with soundfile (or PyAV for a video's own audio
track), resampled to the model's rate. Every failure names the file."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np


class MediaError(ValueError):
    """A media file is missing, corrupt or unusable; the message names the file."""


def _check_file(path: Path, max_bytes: int | None = None) -> None:
    if not path.is_file():
        raise MediaError(f"{path}: media file not found")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{path}: media file is empty")
    if max_bytes is not None and size > max_bytes:
        raise MediaError(f"{path}: media file is {size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.1f} MiB "
                         "(processor.max_media_mb)")


def sample_frame_indices(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int,
                         temporal_patch: int = 2) -> np.ndarray:
    """Indices of the frames to keep: `fps` frames per second of video, clamped to [min_frames, max_frames]
    and to what the video has, rounded down to a multiple of the temporal patch (as Qwen2-VL's processor)."""
    limit = max(temporal_patch, (min(max_frames, total) // temporal_patch) * temporal_patch)
    wanted = total / video_fps * fps
    n = min(max(wanted, min_frames), limit)
    n = max(temporal_patch, int(math.floor(n / temporal_patch)) * temporal_patch)
    # With fewer decoded frames than n (a very short clip) indices repeat, which keeps the grid valid.
    return (np.arange(n) * (total / n)).astype(np.int64).clip(0, total - 1)


def read_video(path: str | Path, fps: float, min_frames: int, max_frames: int, max_pixels: int | None = None,
               max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the sampled frames of a video: (uint8 array [T, H, W, 3], timestamps in seconds [T]).

    A video much larger than max_pixels per frame (4K, 8K) is decoded already scaled down to about twice
    max_pixels, so its frames never sit in memory at full size (the processor's resize then does the rest)."""
    import decord

    path = Path(path)
    _check_file(path, max_bytes)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        video_fps = float(reader.get_avg_fps())
        if total < 1 or not video_fps > 0:
            raise MediaError(f"{path}: video has no decodable frames")
        height, width = reader[0].shape[:2]
        if max_pixels is not None and height * width > 4 * max_pixels:
            scale = math.sqrt(2 * max_pixels / (height * width))
            h, w = max(2, round(height * scale / 2) * 2), max(2, round(width * scale / 2) * 2)
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, width=w, height=h)
        idx = sample_frame_indices(total, video_fps, fps, min_frames, max_frames)
        frames = reader.get_batch(idx.tolist()).asnumpy()
    except MediaError:
        raise
    except Exception as exc:  # decord raises its own DECORDError and RuntimeErrors
        raise MediaError(f"{path}: cannot decode video ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return frames, idx / video_fps


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32)
    from scipy.signal import resample_poly

    ratio = Fraction(target, rate).limit_denominator(1000)
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)


def _read_audio_track(path: Path, max_seconds: float) -> tuple[np.ndarray, int]:
    """The first max_seconds of a container's (mp4, mkv...) audio track via PyAV: mono float32 and its rate."""
    import av

    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise MediaError(f"{path}: video has no audio track (give the prompt a separate audio file)")
        stream = streams[0]
        chunks, kept, wanted = [], 0, math.ceil(max_seconds * stream.rate) if stream.rate else None
        for frame in container.decode(stream):
            if wanted is not None and kept >= wanted:  # a long track: decode no further than needed
                break
            data = frame.to_ndarray()
            if data.dtype.kind == "i":
                data = data / float(np.iinfo(data.dtype).max)
            # planar: [channels, samples]; packed: [1, samples * channels]
            if frame.format.is_planar:
                mono = data.mean(axis=0)
            else:
                mono = data.reshape(-1, len(frame.layout.channels)).mean(axis=1)
            chunks.append(mono.astype(np.float32))
            kept += len(mono)
        rate = stream.rate
    if not chunks:
        raise MediaError(f"{path}: audio track holds no samples")
    return np.concatenate(chunks), rate


def read_audio(path: str | Path, sample_rate: int, max_seconds: float, max_bytes: int | None = None) -> np.ndarray:
    """Mono float32 audio at `sample_rate`, cut to `max_seconds` (only that much is read from the file).
    WAV/FLAC/OGG/MP3 through soundfile; a video file's own audio track through PyAV."""
    import soundfile as sf

    path = Path(path)
    _check_file(path, max_bytes)
    try:
        if path.suffix.lower() in (".mp4", ".mkv", ".mov", ".webm", ".avi"):
            audio, rate = _read_audio_track(path, max_seconds)
        else:
            with sf.SoundFile(str(path)) as f:
                rate = f.samplerate
                data = f.read(frames=math.ceil(max_seconds * rate), dtype="float32", always_2d=True)
            audio = data.mean(axis=1)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{path}: cannot decode audio ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if audio.size == 0:
        raise MediaError(f"{path}: audio holds no samples")
    if not np.isfinite(audio).all():
        raise MediaError(f"{path}: audio holds NaN or infinite samples")
    audio = resample(audio, rate, sample_rate)
    return audio[: int(max_seconds * sample_rate)]
