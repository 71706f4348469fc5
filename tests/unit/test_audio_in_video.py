"""processor.use_audio_in_video: the interleaved token layout (the video's own audio in time chunks) and its
time-aligned 3-D positions, against hand-computed layouts and positions and the thinker's get_rope_index
(transformers' video processor needs torchvision, absent on the CPU stack, so its processor cannot run here)."""

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from cluster.config import ConfigError, load_config
from data.config import SynthConfig
from data.sample import PromptSample
from data.synth import Beep, Segment, render_audio, render_frames, write_mp4
from policy.config import ProcessorConfig, TinyModelConfig
from policy.logprobs import media_positions
from policy.model import load_policy
from policy.processor import (
    Chunking,
    PromptProcessor,
    audio_token_count,
    chunk_bounds,
    interleave_chunks,
    model_chunking,
)
from policy.tiny import ensure_tiny_model

V, A = "V", "A"  # a <|VIDEO|> and an <|AUDIO|> placeholder in the run-length layouts below


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("aiv")
    model = ensure_tiny_model(TinyModelConfig(kind="omni"), root / "models")
    policy = load_policy(model)
    clips = {}
    for seconds in (1.0, 4.0, 5.5):  # 1, 2 and 3 chunks of 2 s at 2 fps
        synth = SynthConfig(seconds=seconds, fps=8, size=56)
        beeps = [Beep(0.3, True)]
        frames = render_frames([Segment("red", "square", "center", 0.0, seconds)], beeps, synth, None)
        write_mp4(root / f"{seconds}.mp4", frames, synth.fps, render_audio(beeps, synth), synth.sample_rate)
        clips[seconds] = root / f"{seconds}.mp4"
    sf.write(str(root / "beeps.wav"), render_audio([Beep(0.3, True)], SynthConfig(seconds=4.0)), 16000)
    return model, policy, clips, root


def _processor(policy, model, **kw):
    cfg = ProcessorConfig(max_frames=12, max_pixels=56 * 56, max_audio_seconds=6.0, use_audio_in_video=True, **kw)
    return PromptProcessor(cfg, policy.tokenizer, model_path=model)


def _sample(video, audio=None):
    return PromptSample(id="x", question="How many beeps?", problem_type="numerical", answer="1", video=video,
                        audio=audio)


def _runs(tok, ids):
    """The media part of a prompt as (token, count) runs, placeholders as V / A."""
    names = {"<|VIDEO|>": V, "<|AUDIO|>": A}
    runs = []
    for t in tok.convert_ids_to_tokens(ids):
        if not t.startswith("<|") or t in ("<|im_start|>", "<|im_end|>"):
            continue
        t = names.get(t, t)
        if runs and runs[-1][0] == t and t in (V, A):
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return [tuple(r) for r in runs]


# 56x56 frames: a 4x4 patch grid, 4 merged tokens per temporal patch (two frames, one second at 2 fps):
# temporal patch k sits at time k * 25 positions, a chunk is 2 s = 50 positions = two temporal patches,
# and an audio token is 40 ms, so a chunk holds up to 50 audio tokens.
@pytest.mark.parametrize("seconds,grid_t,layout", [
    (1.0, 1, lambda a: [(V, 4), (A, a)]),
    (4.0, 4, lambda a: [(V, 8), (A, 50), (V, 8), (A, a - 50)]),
    (5.5, 5, lambda a: [(V, 8), (A, 50), (V, 8), (A, 50), (V, 4), (A, a - 100)]),
])
def test_interleaved_layout_of_real_clips(tiny, seconds, grid_t, layout):
    model, policy, clips, _ = tiny
    built = _processor(policy, model).build(_sample(clips[seconds]))
    assert built.media["video_grid_thw"].tolist() == [[grid_t, 4, 4]]
    a = audio_token_count(int(built.media["feature_attention_mask"].sum()))
    assert 0 < a - 50 * (len(layout(a)) // 2 - 1) <= 55  # the clip's audio fills its last chunk (AAC pads a little)
    want = [("<|vision_bos|>", 1), ("<|audio_bos|>", 1), *layout(a), ("<|audio_eos|>", 1), ("<|vision_eos|>", 1)]
    assert _runs(policy.tokenizer, built.prompt_token_ids) == want
    assert built.media["use_audio_in_video"] is True
    # the thinker's own forward (its get_rope_index with use_audio_in_video) accepts the layout
    ids = torch.tensor([built.prompt_token_ids])
    with torch.no_grad():
        out = policy.model(input_ids=ids, attention_mask=torch.ones_like(ids), **built.media)
    assert out.logits.shape[1] == ids.shape[1]


def test_separate_audio_file_stays_a_separate_item(tiny):
    model, policy, clips, root = tiny
    built = _processor(policy, model).build(_sample(clips[4.0], audio=root / "beeps.wav"))
    a = audio_token_count(int(built.media["feature_attention_mask"].sum()))
    assert _runs(policy.tokenizer, built.prompt_token_ids) == [
        ("<|vision_bos|>", 1), (V, 16), ("<|vision_eos|>", 1), ("<|audio_bos|>", 1), (A, a), ("<|audio_eos|>", 1)]
    assert "use_audio_in_video" not in built.media
    off = PromptProcessor(ProcessorConfig(max_frames=12, max_pixels=56 * 56, max_audio_seconds=6.0), policy.tokenizer)
    assert _runs(policy.tokenizer, off.build(_sample(clips[4.0])).prompt_token_ids)[1] == (V, 16)


def _hand_positions(prefix, grid_t, per_t, chunk_t, n_audio, suffix):
    """Interleaved TMRoPE positions written out: text 0..prefix-1; <|vision_bos|> and <|audio_bos|> share the
    next position p; from s = p + 1 video token of temporal patch k, row r, column c is (s + 25k, s + r, s + c)
    and audio token i is s + i on all three axes, in chunks of chunk_t temporal patches / 50 audio tokens;
    <|audio_eos|> and <|vision_eos|> share one past the largest position of the last piece laid out (the last
    chunk's audio, else its video: transformers' rule, which may fall below an earlier video position); the
    text goes on from there."""
    p = prefix
    s = p + 1
    cols = [[i] * 3 for i in range(prefix)] + [[p] * 3, [p] * 3]
    rc = [(0, 0), (0, 1), (1, 0), (1, 1)][:per_t]
    for j in range(max(-(-grid_t // chunk_t), -(-n_audio // 50))):
        video = [[s + 25 * k, s + r, s + c] for k in range(j * chunk_t, min(grid_t, (j + 1) * chunk_t)) for r, c in rc]
        audio = [[s + i] * 3 for i in range(j * 50, min(n_audio, (j + 1) * 50))]
        cols += video + audio
        last = audio or video
    end = max(max(c) for c in last) + 1
    cols += [[end] * 3, [end] * 3] + [[end + 1 + i] * 3 for i in range(suffix)]
    return torch.tensor(cols).T


@pytest.mark.parametrize("grid_t,n_audio,chunks", [(2, 30, 1), (4, 60, 2), (6, 110, 3)])
def test_positions_by_hand_and_get_rope_index(tiny, grid_t, n_audio, chunks):
    _, policy, _, _ = tiny
    tok = policy.tokenizer
    ids_of = {t: tok.convert_tokens_to_ids(t) for t in ("<|VIDEO|>", "<|AUDIO|>", "<|vision_bos|>",
                                                       "<|vision_eos|>", "<|audio_bos|>", "<|audio_eos|>")}
    body = interleave_chunks([grid_t, 4, 4], 1.0, n_audio, Chunking(25, 2), ids_of["<|VIDEO|>"], ids_of["<|AUDIO|>"])
    assert len(chunk_bounds([25 * k for k in range(grid_t)], 50)) == chunks
    ids = ([5, 6, 7] + [ids_of["<|vision_bos|>"], ids_of["<|audio_bos|>"]] + body
           + [ids_of["<|audio_eos|>"], ids_of["<|vision_eos|>"]] + [8, 9])
    want = _hand_positions(3, grid_t, 4, 2, n_audio, 2)
    if grid_t == 4:  # one case written out in full numbers: s = 4, video t at 4, 29 | 54, 79, audio 4..53 | 54..63
        assert want[0, 5:13].tolist() == [4, 4, 4, 4, 29, 29, 29, 29]
        assert want[:, 13].tolist() == [4, 4, 4] and want[:, 62].tolist() == [53, 53, 53]
        assert want[0, 63:71].tolist() == [54] * 4 + [79] * 4 and want[0, 71:81].tolist() == list(range(54, 64))
        assert want[0, 81:].tolist() == [64, 64, 65, 66]  # past the last audio token (63), not the video's 79
    mels = {30: 120, 60: 240, 110: 440}[n_audio]  # log-mel frames giving n_audio audio tokens
    assert audio_token_count(mels) == n_audio
    media = {"video_grid_thw": torch.tensor([[grid_t, 4, 4]]), "video_second_per_grid": torch.tensor([1.0]),
             "feature_attention_mask": torch.ones(1, mels, dtype=torch.long), "use_audio_in_video": True}
    x = torch.tensor([ids])
    got, _ = policy.model.get_rope_index(x, None, media["video_grid_thw"], torch.ones_like(x), True,
                                         torch.tensor([mels]), media["video_second_per_grid"])
    assert torch.equal(got[:, 0], want)
    assert torch.equal(media_positions(policy.model, x, torch.ones_like(x), [media])[:, 0], want)


def test_mixed_layout_rows_get_their_own_positions(tiny):
    """media_positions: a batch with an interleaved row, a separate-items row and a text row (right-padded)
    equals each row's own get_rope_index."""
    model, policy, clips, root = tiny
    proc = _processor(policy, model)
    prompts = [proc.build(_sample(clips[4.0])), proc.build(_sample(clips[4.0], audio=root / "beeps.wav")),
               proc.build(PromptSample(id="t", question="q", problem_type="numerical", answer="1"))]
    width = max(len(p.prompt_token_ids) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p.prompt_token_ids)] = torch.tensor(p.prompt_token_ids)
        mask[i, :len(p.prompt_token_ids)] = 1
    got = media_positions(policy.model, ids, mask, [p.media or None for p in prompts])
    for i, p in enumerate(prompts):
        x = torch.tensor([p.prompt_token_ids])
        m = p.media
        alone, _ = policy.model.get_rope_index(
            x, None, m.get("video_grid_thw"), torch.ones_like(x), bool(m.get("use_audio_in_video")),
            m["feature_attention_mask"].sum(-1) if m else None, m.get("video_second_per_grid"))
        assert torch.equal(got[:, i, :x.shape[1]], alone[:, 0]), i
    assert (got[:, 0] != got[:, 1]).any()  # the two layouts really place the media apart


def test_chunking_comes_from_the_model_config(tiny, tmp_path):
    model, policy, clips, _ = tiny
    assert model_chunking(model) == Chunking(25.0, 2.0)
    config = json.loads((model / "config.json").read_text())
    config["thinker_config"].update(position_id_per_seconds=10, seconds_per_chunk=1)
    config["thinker_config"]["vision_config"]["tokens_per_second"] = 10
    (tmp_path / "config.json").write_text(json.dumps(config))
    built = _processor(policy, tmp_path).build(_sample(clips[4.0]))
    # 10 positions a second, 1 s chunks: each temporal patch (1 s) is its own chunk, 10 audio tokens each
    a = audio_token_count(int(built.media["feature_attention_mask"].sum()))
    runs = _runs(policy.tokenizer, built.prompt_token_ids)[2:-2]
    assert runs == [(V, 4), (A, 10)] * 3 + [(V, 4), (A, a - 30)]  # the audio past 4 s follows the last video chunk
    config["thinker_config"]["vision_config"]["tokens_per_second"] = 25  # vLLM would cut at 25/s
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokens_per_second"):
        model_chunking(tmp_path)
    with pytest.raises(ValueError, match="needs the model folder"):
        PromptProcessor(ProcessorConfig(use_audio_in_video=True), policy.tokenizer)


def test_config_refuses_audio_in_video_without_a_track(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nstage: 0\nprocessor: {use_audio_in_video: true}\n"
                    "data: {synth: {separate_audio_fraction: 1.0}}\n")
    with pytest.raises(ConfigError, match="separate_audio_fraction is 1"):
        load_config(str(path))
    assert load_config(str(Path(__file__).parents[2] / "configs" / "demo.yaml")).processor.use_audio_in_video


def test_console_line_names_the_layout_and_counts(tiny):
    from policy.processor import prompt_layout

    model, _, clips, root = tiny
    samples = [_sample(clips[1.0]), _sample(clips[4.0]), _sample(clips[4.0], audio=root / "beeps.wav"),
               PromptSample(id="t", question="q", problem_type="numerical", answer="1")]
    line = prompt_layout(ProcessorConfig(use_audio_in_video=True), model, samples)
    assert "interleaved with the video in 2 s chunks" in line and "for 2 of 3 prompts with a video; 1 with a " \
        "separate audio file" in line
    assert "separate item after the video for all 3" in prompt_layout(ProcessorConfig(), model, samples)
