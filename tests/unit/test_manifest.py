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


def test_a_field_of_the_wrong_type_is_a_named_rejection(tmp_path):
    """Wrong JSON types are rejected by name, never coerced (a number question used to become "42", an
    integer difficulty stayed an int in a str field)."""
    rows = [
        {**GOOD, "id": "ok"},                                                  # 1 ok
        {**GOOD, "id": "b", "difficulty": 3},                                  # 2
        {**GOOD, "id": "c", "question": 42},                                   # 3
        {**GOOD, "id": "d", "hint": ["look"]},                                 # 4
        {**GOOD, "id": "e", "cot": 5},                                         # 5
        {**GOOD, "id": "f", "audio_caption": {"text": "beep"}},                # 6
        {**GOOD, "id": True},                                                  # 7
        {**GOOD, "id": "g", "answer": False},                                  # 8
        {**GOOD, "id": "h", "problem_type": 1},                                # 9
        {**GOOD, "id": 1.5},                                                   # 10
        {**GOOD, "id": 7, "answer": 3, "difficulty": None, "hint": ""},        # 11 ok: integer id, number answer
    ]
    path = _write(tmp_path / "m.jsonl", rows)
    good, rejected = load_manifest(path, on_error="skip")
    assert [(s.id, s.answer, s.difficulty, s.hint) for s in good] == [("ok", "3", None, None), ("7", "3", None, None)]
    reasons = dict(rejected)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert reasons[2] == "difficulty must be a string, got int 3"
    assert reasons[3] == "question must be a string, got int 42"
    assert reasons[4].startswith("hint must be a string, got list")
    assert reasons[5].startswith("cot must be a string") and reasons[6].startswith("audio_caption must be a string")
    assert reasons[7] == "id must be a string (or an integer), got bool True"
    assert reasons[8] == "answer must be a string (or a number), got bool"
    assert reasons[9] == "problem_type must be a string, got int"
    assert reasons[10].startswith("id must be a string")
    assert {r.line: r.id for r in rejected} == {2: "b", 3: "c", 4: "d", 5: "e", 6: "f", 7: None, 8: "g", 9: "h",
                                                10: None}
    with pytest.raises(ManifestError) as err:  # and counted in the strict mode's message
        load_manifest(path)
    assert "9 invalid row(s)" in str(err.value) and "line 2: difficulty must be a string" in str(err.value)


def test_rejected_rows_carry_line_id_reason_and_file(tmp_path):
    import pickle

    path = _write(tmp_path / "m.jsonl", [GOOD, "{broken", {"id": "x", "question": "q", "problem_type": "numerical"}])
    _, rejected = load_manifest(path, on_error="skip")
    assert [r.as_dict() for r in rejected] == [
        {"manifest": str(path), "line": 2, "id": None, "reason": rejected[0].reason},
        {"manifest": str(path), "line": 3, "id": "x", "reason": "missing required field(s) answer"},
    ]
    line, reason = rejected[1]  # still unpacks as (line, reason)
    assert (line, reason) == (3, "missing required field(s) answer")
    again = pickle.loads(pickle.dumps(rejected[1]))
    assert again == rejected[1] and again.as_dict() == rejected[1].as_dict()


def test_media_paths_are_absolute_whatever_the_manifest_path_was(tmp_path, monkeypatch):
    """A relative path would mean another folder on a node whose working folder is another (common/node_files)."""
    (tmp_path / "d" / "media").mkdir(parents=True)
    (tmp_path / "d" / "media" / "clip.mp4").write_bytes(b"x")
    _write(tmp_path / "d" / "m.jsonl", [{**GOOD, "video": "media/../media/clip.mp4"}])
    monkeypatch.chdir(tmp_path)
    [sample], _ = load_manifest("d/m.jsonl")
    assert sample.video.is_absolute() and sample.video == tmp_path / "d" / "media" / "clip.mp4"
