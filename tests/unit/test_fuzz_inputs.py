"""Bad input, fuzzed (hypothesis): manifest rows and files, trajectory record bytes, judge replies, configs.
Each must give a clear error of the documented type (or a counted skip), never another exception."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from buffer_service.records import Trajectory
from buffer_service.schema import RecordError, SchemaError, decode_group, encode_group, validate_group
from data.manifest import ManifestError, load_manifest, validate_row
from data.sample import PromptSample
from reward_workers.judge import parse_judge_output

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- manifest rows --------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.text(max_size=8), kids, max_size=3), max_leaves=8)
FIELDS = ("id", "question", "problem_type", "answer", "video", "audio", "options", "hint", "audio_caption",
          "stage", "cot", "difficulty")
field_values = {
    "problem_type": st.sampled_from(["multiple_choice", "numerical", "ocr", "free_form", "localization"]) | json_values,
    "answer": st.sampled_from(["A", "b", "3", "1e400", "nan", "-0.5"]) | json_values,
    "options": st.lists(st.text(max_size=5), max_size=4) | json_values,
    "stage": st.sampled_from([0, 1, 2, 3, True, 4, -1, "1", 1.0]) | json_values,
    "video": st.sampled_from(["clip.mp4", "../clip.mp4", "/etc/passwd", "", "sub/../clip.mp4"]) | json_values,
    "audio": st.sampled_from(["clip.wav", "../../x.wav", "/dev/null"]) | json_values,
}
rows = st.fixed_dictionaries({}, optional={k: field_values.get(k, json_values) for k in FIELDS}) | st.dictionaries(
    st.text(max_size=8), json_values, max_size=5) | json_values


@FUZZ
@given(row=rows)
def test_manifest_row_is_a_sample_or_a_value_error(row, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "fuzz_manifest_root"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "clip.mp4").write_bytes(b"x")
    (root / "clip.wav").write_bytes(b"x")
    try:
        sample = validate_row(row, root)
    except ValueError as exc:
        assert str(exc)  # a reason, always
        return
    assert isinstance(sample, PromptSample)
    assert sample.id and sample.question and sample.stage in (0, 1, 2, 3) and type(sample.stage) is int
    for p in (sample.video, sample.audio):  # media never escape the manifest's folder (the default)
        assert p is None or p.resolve().is_relative_to(root.resolve())


@FUZZ
@given(lines=st.lists(st.binary(max_size=60) | st.text(max_size=60).map(str.encode)
                      | rows.map(lambda r: json.dumps(r).encode()), min_size=1, max_size=8))
def test_manifest_file_of_random_lines_loads_or_lists_bad_lines(lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        samples, rejected = load_manifest(path, on_error="skip")
    except ManifestError as exc:  # nothing usable: every reason listed
        assert exc.rejected
        return
    assert all(isinstance(s, PromptSample) for s in samples)
    assert all(isinstance(n, int) and reason for n, reason in rejected)
    assert len({s.id for s in samples}) == len(samples)


def test_pathological_manifest_lines_are_rejected_with_their_line_number(tmp_path):
    good = {"id": "a", "question": "q", "problem_type": "numerical", "answer": "1"}
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps(good).encode(),
        b"\xff\xfe not utf-8",                       # 2
        b"[" * 100_000 + b"]" * 100_000,               # 3: nesting deeper than the JSON parser's recursion limit
        json.dumps({**good, "id": "b", "video": 5}).encode(),          # 4: a path that is not a string
        json.dumps({**good, "id": "c", "stage": True}).encode(),       # 5: a boolean is not a stage
        json.dumps({**good, "id": "d", "video": "../outside.mp4"}).encode(),  # 6: escapes the folder
    ]))
    (tmp_path.parent / "outside.mp4").write_bytes(b"x")
    samples, rejected = load_manifest(path, on_error="skip")
    assert [s.id for s in samples] == ["a"]
    reasons = dict(rejected)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "UTF-8" in reasons[2]
    assert "nested" in reasons[3]
    assert "video" in reasons[4]
    assert "stage" in reasons[5]
    assert "outside" in reasons[6] and "allow_outside_paths" in reasons[6]


def test_paths_outside_the_manifest_folder_only_when_allowed(tmp_path):
    inner = tmp_path / "data"
    inner.mkdir()
    (tmp_path / "shared.mp4").write_bytes(b"x")
    (inner / "link.mp4").symlink_to(tmp_path / "shared.mp4")  # a symlink out of the folder escapes too
    rows = [{"id": "rel", "question": "q", "problem_type": "numerical", "answer": "1", "video": "../shared.mp4"},
            {"id": "abs", "question": "q", "problem_type": "numerical", "answer": "1",
             "video": str(tmp_path / "shared.mp4")},
            {"id": "sym", "question": "q", "problem_type": "numerical", "answer": "1", "video": "link.mp4"}]
    path = inner / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert sorted(dict(err.value.rejected)) == [1, 2, 3]
    samples, rejected = load_manifest(path, allow_outside_paths=True)
    assert [s.id for s in samples] == ["rel", "abs", "sym"] and not rejected


# --- trajectory records ---------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def groups(draw):
    n = draw(st.integers(1, 3))
    out = []
    for i in range(n):
        k = draw(st.integers(0, 6))
        out.append(Trajectory(
            trajectory_id=f"g/{i}", group_id="g", prompt_id="p",
            prompt_token_ids=draw(st.lists(st.integers(0, 2**31 - 1), max_size=6)),
            completion_token_ids=draw(st.lists(st.integers(0, 2**31 - 1), min_size=k, max_size=k)),
            behaviour_logprobs=draw(st.lists(st.floats(max_value=0, allow_nan=False, allow_infinity=False),
                                             min_size=k, max_size=k)),
            policy_version=draw(st.integers(0, 2**40)), completion_text=draw(st.text(max_size=30)),
            rewards=draw(st.dictionaries(st.sampled_from(["format", "accuracy", "judge"]), st.none() | finite)),
            reward=draw(finite), hinted=draw(st.booleans()), stage=draw(st.integers(0, 3)),
            created_at=draw(finite)))
    return out


@FUZZ
@given(group=groups())
def test_valid_groups_round_trip_exactly(group):
    assert decode_group(encode_group(group)) == group


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_never_decode_to_anything_but_a_schema_error(data):
    with pytest.raises(SchemaError):
        decode_group(data)


@FUZZ
@given(group=groups(), data=st.data())
def test_corrupted_records_raise_schema_or_record_errors(group, data):
    """Flip, drop or truncate bytes of a valid record: it decodes to a group that passes validation, or it
    raises SchemaError/RecordError. (Arrow's full validation runs on every decode, so a corrupt offset is an
    error, not a read out of bounds.)"""
    blob = bytearray(encode_group(group))
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        i = data.draw(st.integers(0, len(blob)))
        blob = blob[:i] + data.draw(st.binary(min_size=1, max_size=64)) + blob[i:]
    assume(bytes(blob) != encode_group(group))
    try:
        decoded = decode_group(bytes(blob))
        validate_group(decoded)
    except (SchemaError, RecordError) as exc:
        assert str(exc)


def test_a_field_name_that_is_not_utf8_is_a_schema_error():
    """Found by the fuzz test above: a flipped byte inside a field name made pyarrow raise UnicodeDecodeError."""
    traj = Trajectory(trajectory_id="g/0", group_id="g", prompt_id="p", prompt_token_ids=[1],
                      completion_token_ids=[2], behaviour_logprobs=[-1.0], policy_version=0)
    blob = bytearray(encode_group([traj]))
    i = blob.index(b"trajectory_id")
    blob[i] = 0x80
    with pytest.raises(SchemaError, match="not an Arrow IPC stream"):
        decode_group(bytes(blob))


def test_records_with_wrong_types_name_the_field():
    table = pa.table({"trajectory_id": pa.array([1, 2])})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(SchemaError, match="schema version"):
        decode_group(sink.getvalue().to_pybytes())


# --- judge replies --------------------------------------------------------------------------------------------

@FUZZ
@given(reply=st.binary(max_size=400).map(lambda b: b.decode("utf-8", errors="replace")) | st.text(max_size=400)
       | st.none())
def test_judge_reply_of_random_bytes_is_a_score_in_0_1_or_none(reply):
    score = parse_judge_output(reply)
    assert score is None or (0.0 <= score <= 1.0 and math.isfinite(score))


@FUZZ
@given(values=st.fixed_dictionaries({k: json_values for k in ("correctness", "reasoning", "evidence", "clarity")}))
def test_judge_json_with_random_values(values):
    from reward_workers.judge import JUDGE_KEYS

    reply = json.dumps({k: v for k, v in zip(JUDGE_KEYS, values.values())})
    score = parse_judge_output("noise " + reply + " more")
    assert score is None or 0.0 <= score <= 1.0


def test_pathological_judge_replies():
    from reward_workers.judge import JUDGE_KEYS

    ok = json.dumps({k: 1 for k in JUDGE_KEYS})
    assert parse_judge_output("{" * 50_000) is None  # many openings: no quadratic blow-up, no crash
    assert parse_judge_output("[" * 50_000 + ok) == 1.0
    assert parse_judge_output('{"a": ' * 5_000 + "1" + "}" * 5_000) is None  # deeper than the recursion limit
    assert parse_judge_output("\x00\udcff" + ok) == 1.0


# --- configs --------------------------------------------------------------------------------------------------

config_values = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=10) | st.lists(
    st.integers(), max_size=2)
KEYS = ["learner.lr", "learner.zero_stage", "rollout.group_size", "pipeline.steps", "pipeline.max_staleness",
        "buffer.capacity", "buffer.tier_ratios", "reward.judge.timeout_s", "learner.publish_timeout_s",
        "data.synth.num_items", "processor.fps", "stage", "learner.objective.tas_shape", "pipeline.prompts_per_step",
        "buffer.redis.url", "nonexistent.key", "learner.nope"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.dictionaries(st.sampled_from(KEYS), config_values, min_size=1, max_size=3))
def test_bad_config_values_name_the_key(overrides, tmp_path_factory):
    from cluster.config import load_config

    path = tmp_path_factory.getbasetemp() / "fuzz_config.yaml"
    path.write_text("name: fuzz\n")
    args = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    try:
        load_config(path, args)
    except (ValueError, ValidationError) as exc:
        message = str(exc)
        assert any(k in message or k.split(".")[-1] in message for k in overrides), message
