"""The processor on real decoded media: shapes, placeholder counts, colours at known times, beeps in the
log-mel, and clear errors for broken files."""

import numpy as np
import pytest
import soundfile as sf
import torch

from data.config import SynthConfig
from data.sample import PromptSample
from data.synth import COLOURS, Beep, Segment, render_audio, render_frames, write_mp4
from policy.config import ProcessorConfig
from policy.media import MediaError, read_audio, read_video, sample_frame_indices
from policy.processor import PromptProcessor, audio_token_count, smart_resize, video_patches
from policy.tokenizer import build_tokenizer

CFG = SynthConfig(seconds=4.0, fps=8, size=112)
# red for the first second, green for the second, blue for the rest; a high beep at 1.5 s, a low one at 3.0 s
SEGMENTS = [Segment("red", "square", "center", 0.0, 1.0), Segment("green", "circle", "center", 1.0, 2.0),
            Segment("blue", "square", "center", 2.0, 4.0)]
BEEPS = [Beep(1.5, True), Beep(3.0, False)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    frames = render_frames(SEGMENTS, BEEPS, CFG, None)
    audio = render_audio(BEEPS, CFG)
    write_mp4(root / "av.mp4", frames, CFG.fps, audio, CFG.sample_rate)
    write_mp4(root / "silent.mp4", frames, CFG.fps, None, CFG.sample_rate)
    sf.write(str(root / "beeps.wav"), audio, CFG.sample_rate)
    sf.write(str(root / "beeps44k.wav"), np.interp(np.arange(int(4.0 * 44100)) / 44100,
                                                  np.arange(audio.size) / 16000, audio), 44100)
    return root


@pytest.fixture(scope="module")
def processor():
    return PromptProcessor(ProcessorConfig(), build_tokenizer())


def test_smart_resize_by_hand():
    assert smart_resize(112, 112, 28, 784, 224 * 224) == (112, 112)
    # beta = sqrt(480*640/50176) = 2.474: floor(480/2.474/28)*28 = 168, floor(640/2.474/28)*28 = 252
    assert smart_resize(480, 640, 28, 784, 224 * 224) == (168, 252)
    assert smart_resize(20, 20, 28, 784, 224 * 224) == (28, 28)


def test_frame_indices_follow_fps_and_limits():
    # 32 frames at 8 fps = 4 s; 2 fps -> 8 frames, evenly spaced every 4 frames
    assert sample_frame_indices(32, 8.0, 2.0, 2, 16).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert len(sample_frame_indices(400, 8.0, 2.0, 2, 16)) == 16  # capped by max_frames
    assert len(sample_frame_indices(3, 8.0, 2.0, 2, 16)) == 2  # rounded down to the temporal patch


def test_video_patch_order_matches_qwen2vl():
    # Each pixel holds (frame, row, col) information so that we can find where it ended up.
    t, h, w = 2, 56, 56
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    for f in range(t):
        for r in range(h // 14):
            for c in range(w // 14):
                frames[f, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = (40 * f + 10, 20 * r + 10, 20 * c + 10)
    pixels, grid = video_patches(frames, 784, 224 * 224)
    assert grid.tolist() == [[1, 4, 4]] and pixels.shape == (16, 3 * 2 * 14 * 14)
    patch = pixels.reshape(16, 3, 2, 14, 14)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)

    def decode(i, tp):  # the (frame, row, col) code of patch i, temporal slot tp
        rgb = ((patch[i, :, tp] * std + mean) * 255).round()[:, 7, 7]
        return int((rgb[0] - 10) / 40), int((rgb[1] - 10) / 20), int((rgb[2] - 10) / 20)

    # patches come in merged 2x2 groups: (0,0) (0,1) (1,0) (1,1), then the group to the right
    assert [decode(i, 0)[1:] for i in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)]
    assert decode(0, 0)[0] == 0 and decode(0, 1)[0] == 1  # the temporal pair holds frames 0 and 1


@pytest.mark.parametrize("height,width", [(64, 64), (112, 112), (96, 160), (224, 224)])
def test_video_patches_equal_transformers_image_processor(height, width):
    # A clip of two identical frames is what Qwen2-VL's image processor makes of one image (it repeats the
    # image over the temporal patch), so transformers' PIL processor (no torchvision needed) is the reference.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(height * 1000 + width)
    frame = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    min_pixels, max_pixels = 56 * 56, 224 * 224
    ours, grid = video_patches(np.stack([frame, frame]), min_pixels, max_pixels)
    hf = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(
        images=[frame], return_tensors="pt")
    assert grid.tolist() == hf["image_grid_thw"].tolist()
    assert ours.shape == hf["pixel_values"].shape
    assert torch.equal(ours, hf["pixel_values"].to(ours.dtype))


def test_audio_token_count_by_hand():
    assert audio_token_count(100) == 25  # (99//2+1)=50 -> (50-2)//2+1 = 25
    assert audio_token_count(403) == 101  # 202 -> 101
    assert audio_token_count(3000) == 750


def test_frame_at_known_time_holds_the_colour_drawn(media):
    frames, times = read_video(media / "av.mp4", fps=8.0, min_frames=2, max_frames=32)
    assert frames.shape == (32, 112, 112, 3)
    for frame, t in zip(frames, times):
        want = next(s.colour for s in SEGMENTS if s.start <= t + 0.0625 < s.end)
        centre = frame[56, 56].astype(int)
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
        assert nearest == want, (t, centre)
        assert np.abs(np.array(COLOURS[want]) - centre).max() < 40


@pytest.mark.parametrize("name", ["av.mp4", "beeps.wav", "beeps44k.wav"])
def test_beep_is_visible_in_the_log_mel_where_written(media, processor, name):
    audio = read_audio(media / name, 16000, 30.0)
    assert abs(audio.size - 64000) <= 1024  # 4 s at 16 kHz (AAC adds at most one frame of padding)
    feats = processor.features(audio, sampling_rate=16000, return_tensors="np", padding="longest", truncation=False)
    mel = feats["input_features"][0]  # [128, frames], 100 frames per second
    loudest = mel.max(axis=0)  # a beep is a narrow band: look at the loudest bin of each frame
    beep_frames = [int(b.time * 100) + 7 for b in BEEPS]  # the middle of each 150 ms beep
    silent = loudest[250:290].max()  # 2.5-2.9 s: no beep
    for f in beep_frames:
        assert loudest[f] > silent + 1.0, (name, f, loudest[f], silent)
        assert loudest[f - 25] < silent + 0.1  # 0.25 s before the beep: nothing yet
    # the high beep (1320 Hz) puts its energy in higher mel bins than the low one (440 Hz)
    assert mel[:, beep_frames[0]].argmax() > mel[:, beep_frames[1]].argmax()


def test_processor_inputs_match_model_placeholders(media, processor):
    tok = processor.tokenizer
    sample = PromptSample(id="x", question="How many beeps?", problem_type="numerical", answer="2",
                          video=media / "av.mp4")
    p = processor.build(sample, hint="count the beeps")
    ids = p.prompt_token_ids
    grid = p.media["video_grid_thw"]
    assert grid.tolist() == [[4, 8, 8]]  # 8 frames at 2 fps of 112x112 -> 4 x 8 x 8 patches
    assert ids.count(tok.convert_tokens_to_ids("<|VIDEO|>")) == int(grid.prod()) // 4 == 64
    mel_frames = int(p.media["feature_attention_mask"].sum())
    assert ids.count(tok.convert_tokens_to_ids("<|AUDIO|>")) == audio_token_count(mel_frames)
    assert p.media["input_features"].shape[:2] == (1, 128)
    assert p.media["video_second_per_grid"].tolist() == [1.0]  # 2 frames per grid at 2 fps
    # the hint is the first system message
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nHint: count the beeps<|im_end|>\n<|im_start|>system\nYou are")
    assert text.endswith("How many beeps?<|im_end|>\n<|im_start|>assistant\n")
    unhinted = processor.build(sample)
    assert "Hint:" not in tok.decode(unhinted.prompt_token_ids) and not unhinted.hinted and p.hinted


def test_separate_audio_file(media, processor):
    sample = PromptSample(id="x", question="q", problem_type="numerical", answer="1",
                          video=media / "silent.mp4", audio=media / "beeps.wav")
    p = processor.build(sample)
    assert int(p.media["feature_attention_mask"].sum()) == 400


def test_broken_media_errors_name_the_file(media, processor, tmp_path):
    good = (media / "av.mp4").read_bytes()
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.wav").write_bytes(b"RIFF????WAVEfmt garbage")
    for name in ("garbage.mp4", "truncated.mp4", "empty.mp4", "absent.mp4"):
        sample = PromptSample(id="x", question="q", problem_type="numerical", answer="1", video=tmp_path / name)
        with pytest.raises(MediaError, match=name):
            processor.build(sample)
    with pytest.raises(MediaError, match="noise.wav"):
        read_audio(tmp_path / "noise.wav", 16000, 30)
    no_track = PromptSample(id="x", question="q", problem_type="numerical", answer="1", video=media / "silent.mp4")
    with pytest.raises(MediaError, match="silent.mp4: video has no audio track"):
        processor.build(no_track)


def test_huge_media_is_read_within_bounds(tmp_path, processor):
    """A 4K video is decoded already scaled down; an hour of audio is read only as far as max_audio_seconds;
    a file over processor.max_media_mb is rejected before decoding, naming the file and the limit."""
    import tracemalloc

    # 4K frames, red left half / blue right half: the colours must survive the scaled decode
    big = np.zeros((4, 2160, 3840, 3), dtype=np.uint8)
    big[:, :, :1920] = (220, 0, 0)
    big[:, :, 1920:] = (0, 0, 220)
    write_mp4(tmp_path / "uhd.mp4", big, 4, None, 16000)
    frames, _ = read_video(tmp_path / "uhd.mp4", 2.0, 2, 16, max_pixels=224 * 224)
    height, width = frames.shape[1:3]
    assert height * width <= 4 * 224 * 224 and abs(width / height - 16 / 9) < 0.05, frames.shape
    assert frames[0, height // 2, width // 4, 0] > 150 and frames[0, height // 2, 3 * width // 4, 2] > 150
    full, _ = read_video(tmp_path / "uhd.mp4", 2.0, 2, 16)  # without the bound: full size
    assert full.shape[1:3] == (2160, 3840)

    # one hour of 16 kHz audio (115 MB on disk, 230 MB as float32): at most 30 s of it is ever read
    with sf.SoundFile(str(tmp_path / "hour.wav"), "w", 16000, 1, subtype="PCM_16") as f:
        block = (0.1 * np.sin(np.arange(16000 * 60) / 16000 * 2 * np.pi * 440)).astype(np.float32)
        for _ in range(60):
            f.write(block)
    tracemalloc.start()
    audio = read_audio(tmp_path / "hour.wav", 16000, 30.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert audio.shape == (30 * 16000,)
    assert peak < 10 * audio.nbytes, f"reading 30 s of a 1 h file peaked at {peak / 2**20:.0f} MiB"

    # PCM_16: 16000 * 3600 * 2 bytes + the 44-byte header = 109.9 MiB
    write_mp4(tmp_path / "small.mp4", big[:2, :112, :112].copy(), 4, None, 16000)
    sample = PromptSample(id="x", question="q", problem_type="numerical", answer="1", video=tmp_path / "small.mp4",
                          audio=tmp_path / "hour.wav")
    bounded = PromptProcessor(ProcessorConfig(max_media_mb=1.0), build_tokenizer())
    with pytest.raises(MediaError, match=r"hour.wav: media file is 109.9 MiB, over the limit of 1.0 MiB"):
        bounded.build(sample)
    assert processor.build(sample).media["feature_attention_mask"].sum() == 3000  # 30 s of 10 ms mel frames


def test_silent_audio_is_valid_input(media, processor, tmp_path):
    """Digital silence is a valid (if uninformative) input: finite features, the full placeholder count."""
    sf.write(str(tmp_path / "silence.wav"), np.zeros(4 * 16000, dtype=np.float32), 16000)
    sample = PromptSample(id="x", question="q", problem_type="numerical", answer="1", video=media / "silent.mp4",
                          audio=tmp_path / "silence.wav")
    p = processor.build(sample)
    assert torch.isfinite(p.media["input_features"]).all()
    assert int(p.media["feature_attention_mask"].sum()) == 400
