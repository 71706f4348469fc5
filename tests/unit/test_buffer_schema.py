"""The trajectory record schema: exact round trip, and clear rejections of other versions and bad fields."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from buffer_service.records import Trajectory
from buffer_service.schema import (
    TRAJECTORY_SCHEMA,
    VERSION_KEY,
    RecordError,
    SchemaError,
    decode_group,
    decode_trajectory,
    encode_group,
    encode_trajectory,
    validate_group,
)
from buffer_service.tiers import allocate, priority_score


def full_traj(tid="t1", **kw) -> Trajectory:
    values = dict(
        trajectory_id=tid,
        group_id="g1",
        prompt_id="p1",
        prompt_token_ids=[151644, 8948, 2],
        completion_token_ids=[10, 11, 12],
        behaviour_logprobs=[-0.123456789012345, -2.5, -1e-9],
        policy_version=7,
        completion_text="<think>1. look</think><answer>B</answer>",
        ref_logprobs=[-0.2, -2.25, -0.5],
        rewards={"format": 1.0, "acc": 0.0, "judge": None},
        reward=0.5,
        hinted=True,
        stage=2,
        truncated=False,
        created_at=1700000000.25,
        scored_at=1700000001.5,
        advantage=-0.75,
        mean_logratio_old_ref=0.125,
    )
    values.update(kw)
    return Trajectory(**values)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _table(group) -> pa.Table:
    return pa.ipc.open_stream(encode_group(group)).read_all()


def test_round_trip_is_exact_for_every_field():
    group = [full_traj("a"), full_traj("b", ref_logprobs=None, scored_at=None, advantage=None, rewards={}),
             full_traj("c", token_policy_versions=[7, 8, 8])]
    assert decode_group(encode_group(group)) == group
    assert [t.last_policy_version for t in group] == [7, 7, 8]
    assert decode_trajectory(encode_trajectory(group[0])) == group[0]


def test_other_schema_version_is_rejected():
    table = _table([full_traj()])
    table = table.replace_schema_metadata({VERSION_KEY: b"1"})  # before token_policy_versions
    with pytest.raises(SchemaError, match="schema version 1, expected 2"):
        decode_group(_ipc(table))
    with pytest.raises(SchemaError, match="no schema version"):
        decode_group(_ipc(table.replace_schema_metadata({})))


def test_missing_field_is_named():
    table = _table([full_traj()])
    table = table.drop_columns(["behaviour_logprobs"])
    with pytest.raises(SchemaError, match="missing field 'behaviour_logprobs'"):
        decode_group(_ipc(table))


def test_wrong_type_and_null_are_named():
    table = _table([full_traj()])
    idx = table.schema.get_field_index("reward")
    bad = table.set_column(idx, "reward", pa.array(["high"]))
    with pytest.raises(SchemaError, match="field 'reward' has type string"):
        decode_group(_ipc(bad))
    nulls = table.set_column(idx, pa.field("reward", pa.float64()), pa.array([None], type=pa.float64()))
    with pytest.raises(SchemaError, match="field 'reward' is null"):
        decode_group(_ipc(nulls.replace_schema_metadata(TRAJECTORY_SCHEMA.metadata)))


def test_unencodable_record_is_a_record_error():
    with pytest.raises(RecordError, match="cannot encode group"):
        encode_group([full_traj(completion_token_ids=[1, 2, 2**31])])


def test_garbage_is_not_arrow():
    with pytest.raises(SchemaError, match="not an Arrow IPC stream"):
        decode_group(b"\x80\x04K\x01.")  # a pickle of 1: never unpickled, just rejected
    with pytest.raises(SchemaError, match="expected one trajectory"):
        decode_trajectory(encode_group([full_traj("a"), full_traj("b")]))


@pytest.mark.parametrize(
    "group, message",
    [
        ([], "empty group"),
        ([full_traj(behaviour_logprobs=[-1.0])], "1 behaviour_logprobs for 3 completion tokens"),
        ([full_traj(ref_logprobs=[-1.0, -1.0])], "2 ref_logprobs for 3 completion tokens"),
        ([full_traj(reward=math.nan)], "reward must be finite"),
        ([full_traj(behaviour_logprobs=[-1.0, math.inf, -1.0])], "log-probs must be finite"),
        ([full_traj(trajectory_id="")], "trajectory_id must be a non-empty string"),
        ([full_traj(trajectory_id="a b")], "must not contain whitespace"),
        ([full_traj("a"), full_traj("b", prompt_id="p2")], "one prompt_id"),
        ([full_traj("a"), full_traj("b", group_id="g2")], "one group_id"),
        ([full_traj("a"), full_traj("a")], "duplicate trajectory_id"),
        ([full_traj(policy_version=-1)], "policy_version must be >= 0"),
        ([full_traj(token_policy_versions=[7, 8])], "one version per completion token"),
        ([full_traj(token_policy_versions=[8, 8, 9])], "the oldest being policy_version 7"),
    ],
)
def test_validation_names_the_problem(group, message):
    with pytest.raises(RecordError, match=message):
        validate_group(group)


def test_allocate_rounds_to_the_total():
    ratios = {"easy": 0.25, "medium": 0.35, "hard": 0.40}
    assert allocate(10_000, ratios) == {"easy": 2500, "medium": 3500, "hard": 4000}
    # 2.5 / 3.5 / 4.0 -> floors 2 / 3 / 4, one left; the .5 remainders tie -> the larger ratio (medium)
    assert allocate(10, ratios) == {"easy": 2, "medium": 4, "hard": 4}
    # 2 / 2.8 / 3.2 -> floors 2 / 2 / 3, one left -> the largest remainder (medium)
    assert allocate(8, ratios) == {"easy": 2, "medium": 3, "hard": 3}
    # 1 / 1.4 / 1.6 -> floors 1 / 1 / 1, one left -> hard (.6)
    assert allocate(4, ratios) == {"easy": 1, "medium": 1, "hard": 2}
    assert allocate(1, ratios) == {"easy": 0, "medium": 0, "hard": 1}


def test_priority_score_by_hand():
    # 1.0 * -0.75 - 0.1 * 0.125
    assert priority_score(full_traj()) == pytest.approx(-0.7625, abs=1e-15)
    # no stored mean: computed from behaviour - ref = mean(0.5, 0.5, 0.25) = 0.41666..
    t = full_traj(
        mean_logratio_old_ref=None, behaviour_logprobs=[-0.5, -1.5, -0.25], ref_logprobs=[-1.0, -2.0, -0.5]
    )
    assert priority_score(t) == pytest.approx(-0.75 - 0.1 * (1.25 / 3), abs=1e-15)
    assert priority_score(full_traj(advantage=None, mean_logratio_old_ref=None, ref_logprobs=None)) == 0.0
