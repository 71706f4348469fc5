import json

import pytest

from data.manifest import ManifestError, load_manifest, write_manifest
from data.sample import PromptSample


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "question": "How many beeps?", "problem_type": "numerical", "answer": "3"}


def test_each_malformed_row_is_reported_with_line_and_reason(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    rows = [
        GOOD,                                                                  # 1 ok
        "{not json",                                                           # 2
        {"id": "b", "question": "q", "problem_type": "numerical"},            # 3 no answer
        {**GOOD, "id": "c", "problem_type": "essay"},                          # 4 bad type
        {**GOOD, "id": "d", "problem_type": "multiple_choice", "answer": "E",
         "options": ["A. x", "B. y"]},                                         # 5 letter out of range
        {**GOOD, "id": "e", "answer": "many"},                                 # 6 not a number
        {**GOOD, "id": "f", "video": "missing.mp4"},                           # 7 missing media
        {**GOOD, "id": "a"},                                                   # 8 duplicate id
        {**GOOD, "id": "g", "colour": "red"},                                  # 9 unknown field
        {**GOOD, "id": "h", "stage": 7},                                       # 10 bad stage
        {**GOOD, "id": "i", "video": "clip.mp4"},                              # 11 ok
    ]
    path = _write(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    rejected = dict(err.value.rejected)
    assert sorted(rejected) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert "not valid JSON" in rejected[2]
    assert "answer" in rejected[3]
    assert "essay" in rejected[4]
    assert "'E'" in rejected[5]
    assert "not a number" in rejected[6]
    assert "missing.mp4" in rejected[7]
    assert "duplicate id 'a'" in rejected[8]
    assert "colour" in rejected[9]
    assert "stage" in rejected[10]
    assert "line 7" in str(err.value)

    good, skipped = load_manifest(path, on_error="skip")
    assert [s.id for s in good] == ["a", "i"]
    assert len(skipped) == 9
    assert good[1].video == tmp_path / "clip.mp4"  # relative to the manifest's folder


def test_jsonl_and_parquet_round_trip(tmp_path):
    (tmp_path / "media").mkdir()
    video = tmp_path / "media" / "v.mp4"
    video.write_bytes(b"x")
    samples = [
        PromptSample(id="1", question="Which colour?", problem_type="multiple_choice", answer="B",
                     options=["A. red", "B. blue"], video=video, hint="look", stage=2),
        PromptSample(id="2", question="Where?", problem_type="localization", answer="Left: red circle", stage=3),
    ]
    for name in ("m.jsonl", "m.parquet"):
        loaded, rejected = load_manifest(write_manifest(samples, tmp_path / name))
        assert rejected == []
        assert loaded == samples
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["video"] == "media/v.mp4"


def test_empty_or_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="no rows"):
        load_manifest(_write(tmp_path / "empty.jsonl", []))
