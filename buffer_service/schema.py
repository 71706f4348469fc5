"""The versioned Arrow schema of a trajectory record and of a group (a list of trajectories).

A group is encoded as one Arrow IPC stream holding one record batch with one row per trajectory; a single
trajectory is a group of one. The schema version travels in the schema metadata. Decoding checks the version
and every field (presence, type, nulls) and raises SchemaError naming the field at fault. Nothing is pickled:
bytes read from Redis are only ever parsed as Arrow.

validate_group() is the semantic check (lengths agree, finite numbers, one group and prompt per group) that the
replay service runs before accepting a group; it raises RecordError with the reason.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa

from buffer_service.records import Trajectory

SCHEMA_VERSION = 2  # 2: token_policy_versions
VERSION_KEY = b"avatar.schema_version"


class SchemaError(ValueError):
    """Bytes that are not a trajectory record of this schema version; the message names the field at fault."""


class RecordError(ValueError):
    """A record that decodes but is not valid (e.g. log-probs and tokens of different lengths)."""


# (name, Arrow type, nullable). Token ids fit int32 (vocabularies are far below 2**31); log-probs are float64
# so that a record round-trips exactly.
_FIELDS: list[tuple[str, pa.DataType, bool]] = [
    ("trajectory_id", pa.string(), False),
    ("group_id", pa.string(), False),
    ("prompt_id", pa.string(), False),
    ("prompt_token_ids", pa.list_(pa.int32()), False),
    ("completion_token_ids", pa.list_(pa.int32()), False),
    ("behaviour_logprobs", pa.list_(pa.float64()), False),
    ("policy_version", pa.int64(), False),
    ("completion_text", pa.string(), False),
    ("ref_logprobs", pa.list_(pa.float64()), True),
    ("rewards", pa.map_(pa.string(), pa.float64()), False),
    ("reward", pa.float64(), False),
    ("hinted", pa.bool_(), False),
    ("stage", pa.int64(), False),
    ("truncated", pa.bool_(), False),
    ("created_at", pa.float64(), False),
    ("scored_at", pa.float64(), True),
    ("advantage", pa.float64(), True),
    ("mean_logratio_old_ref", pa.float64(), True),
    ("token_policy_versions", pa.list_(pa.int32()), True),
]

TRAJECTORY_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=nullable) for name, typ, nullable in _FIELDS],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


_NUMPY = {pa.int32(): np.int32, pa.float64(): np.float64}


def _list_array(rows: list, typ: pa.ListType) -> pa.Array:
    """list<number> column through numpy: an order of magnitude faster than pa.array on Python lists."""
    dtype = _NUMPY[typ.value_type]
    parts = [np.asarray(r, dtype=np.int64 if dtype is np.int32 else dtype) for r in rows if r is not None]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if dtype is np.int32 and flat.size and (flat.min() < -(2**31) or flat.max() >= 2**31):
        raise OverflowError(f"token id out of int32 range ({flat.min()}..{flat.max()})")
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([0 if r is None else len(r) for r in rows], out=offsets[1:])
    mask = pa.array([r is None for r in rows]) if any(r is None for r in rows) else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(dtype)), type=typ, mask=mask)


def encode_group(group: list[Trajectory]) -> bytes:
    """A list of trajectories -> Arrow IPC stream bytes (schema version in the metadata)."""
    columns: dict[str, list] = {name: [] for name, _, _ in _FIELDS}
    for traj in group:
        for name, _, _ in _FIELDS:
            value = getattr(traj, name)
            if name == "rewards":
                value = list(value.items())
            columns[name].append(value)
    try:
        arrays = []
        for name, typ, _ in _FIELDS:
            if pa.types.is_list(typ):
                arrays.append(_list_array(columns[name], typ))
            else:
                arrays.append(pa.array(columns[name], type=typ))
        batch = pa.record_batch(arrays, schema=TRAJECTORY_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        raise RecordError(f"cannot encode group: {exc}") from None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, TRAJECTORY_SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def encode_trajectory(traj: Trajectory) -> bytes:
    return encode_group([traj])


def _read_table(data: bytes) -> pa.Table:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(f"expected Arrow IPC bytes, got {type(data).__name__}")
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        table.validate(full=True)  # offsets and lengths inside their buffers before anything reads them
        return table
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # a corrupted field name is not UTF-8
        raise SchemaError(f"not an Arrow IPC stream: {exc}") from None


def decode_group(data: bytes) -> list[Trajectory]:
    """Arrow IPC bytes -> list of trajectories. Raises SchemaError on another version or a missing/bad field."""
    table = _read_table(data)
    metadata = table.schema.metadata or {}
    version = metadata.get(VERSION_KEY)
    if version is None:
        raise SchemaError(f"record has no schema version (metadata key {VERSION_KEY.decode()!r})")
    if version != str(SCHEMA_VERSION).encode():
        raise SchemaError(
            f"record has schema version {version.decode(errors='replace')}, expected {SCHEMA_VERSION}"
        )
    columns = {}
    for name, typ, nullable in _FIELDS:
        if name not in table.schema.names:
            raise SchemaError(f"record is missing field '{name}'")
        column = table.column(name)
        if not column.type.equals(typ):
            raise SchemaError(f"field '{name}' has type {column.type}, expected {typ}")
        if not nullable and column.null_count:
            raise SchemaError(f"field '{name}' is null but is required")
        columns[name] = _list_column(column) if pa.types.is_list(typ) else column.to_pylist()
    group = []
    for row in range(table.num_rows):
        values = {name: columns[name][row] for name, _, _ in _FIELDS}
        values["rewards"] = dict(values["rewards"])
        group.append(Trajectory(**values))
    return group


def _list_column(column: pa.ChunkedArray) -> list:
    """list<number> column -> Python lists through numpy (to_pylist converts element by element)."""
    arr = column.combine_chunks()
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy()
    nulls = arr.is_null().to_pylist() if arr.null_count else [False] * len(arr)
    return [None if nulls[i] else values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(arr))]


def decode_trajectory(data: bytes) -> Trajectory:
    group = decode_group(data)
    if len(group) != 1:
        raise SchemaError(f"expected one trajectory, the record holds {len(group)}")
    return group[0]


def _finite(values) -> bool:
    # One C-speed sum instead of a Python loop: inf or nan anywhere makes the sum non-finite
    # (a sum of log-probs cannot overflow to inf).
    return math.isfinite(sum(values))


def validate_trajectory(traj: Trajectory) -> None:
    """Raise RecordError naming what is wrong with one trajectory."""
    for name in ("trajectory_id", "group_id", "prompt_id"):
        if not isinstance(getattr(traj, name), str) or not getattr(traj, name):
            raise RecordError(f"{name} must be a non-empty string")
    tid = traj.trajectory_id
    if any(c.isspace() for c in tid):
        raise RecordError(f"trajectory_id {tid!r} must not contain whitespace")
    n = len(traj.completion_token_ids)
    if len(traj.behaviour_logprobs) != n:
        raise RecordError(
            f"{tid}: {len(traj.behaviour_logprobs)} behaviour_logprobs for {n} completion tokens"
        )
    if traj.ref_logprobs is not None and len(traj.ref_logprobs) != n:
        raise RecordError(f"{tid}: {len(traj.ref_logprobs)} ref_logprobs for {n} completion tokens")
    if not _finite(traj.behaviour_logprobs) or not _finite(traj.ref_logprobs or []):
        raise RecordError(f"{tid}: log-probs must be finite")
    if not math.isfinite(traj.reward):
        raise RecordError(f"{tid}: reward must be finite, got {traj.reward}")
    for name in ("advantage", "mean_logratio_old_ref"):
        value = getattr(traj, name)
        if value is not None and not math.isfinite(value):
            raise RecordError(f"{tid}: {name} must be finite, got {value}")
    if traj.policy_version < 0:
        raise RecordError(f"{tid}: policy_version must be >= 0, got {traj.policy_version}")
    versions = traj.token_policy_versions
    if versions is not None and (len(versions) != n or min(versions, default=traj.policy_version) != traj.policy_version):
        raise RecordError(f"{tid}: token_policy_versions must have one version per completion token, the oldest "
                          f"being policy_version {traj.policy_version}")


def validate_group(group: list[Trajectory]) -> None:
    """Raise RecordError unless the group is non-empty, of one group and prompt, with unique valid records."""
    if not group:
        raise RecordError("empty group")
    for traj in group:
        if not isinstance(traj, Trajectory):
            raise RecordError(f"expected Trajectory, got {type(traj).__name__}")
        validate_trajectory(traj)
    if len({t.group_id for t in group}) != 1:
        raise RecordError(f"a group must share one group_id, got {sorted({t.group_id for t in group})}")
    if len({t.prompt_id for t in group}) != 1:
        raise RecordError(f"a group must share one prompt_id, got {sorted({t.prompt_id for t in group})}")
    ids = [t.trajectory_id for t in group]
    if len(set(ids)) != len(ids):
        raise RecordError(f"duplicate trajectory_id inside group {group[0].group_id}")


def schema_field_names() -> list[str]:
    return [name for name, _, _ in _FIELDS]


# The schema must cover the dataclass exactly; fail at import rather than drop a field silently.
if set(schema_field_names()) != {f.name for f in dataclasses.fields(Trajectory)}:
    raise RuntimeError(
        "buffer_service.schema is out of date with records.Trajectory: add the new fields to _FIELDS"
    )
