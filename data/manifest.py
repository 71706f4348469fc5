"""Prompt manifests (JSONL or Parquet): loading with validation. Each bad row is reported with its line
(or row) number and the reason; paths are relative to the manifest's folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .sample import PROBLEM_TYPES, PromptSample

REQUIRED = ("id", "question", "problem_type", "answer")
OPTIONAL = ("video", "audio", "options", "hint", "audio_caption", "stage", "cot", "difficulty")
TEXT_FIELDS = ("question", "hint", "audio_caption", "cot", "difficulty")  # a string (or, if optional, null)


class RejectedRow(tuple):
    """One rejected manifest row. It unpacks as the pair (line, reason), as before; `.id` is the row's id
    where it has a usable one and `.manifest` the file it came from."""

    def __new__(cls, line: int, reason: str, id: str | None = None, manifest: str | None = None):
        self = super().__new__(cls, (line, reason))
        self.id, self.manifest = id, manifest
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.id, self.manifest)

    @property
    def line(self) -> int:
        return self[0]

    @property
    def reason(self) -> str:
        return self[1]

    def as_dict(self) -> dict:
        return {"manifest": self.manifest, "line": self.line, "id": self.id, "reason": self.reason}


class ManifestError(ValueError):
    """One or more manifest rows are invalid; `.rejected` lists them (RejectedRow: (line number, reason))."""

    def __init__(self, path: Path, rejected: list[RejectedRow]):
        self.path = path
        self.rejected = rejected
        shown = "\n".join(f"  line {n}: {reason}" for n, reason in rejected[:20])
        more = f"\n  ... and {len(rejected) - 20} more" if len(rejected) > 20 else ""
        super().__init__(f"{path}: {len(rejected)} invalid row(s)\n{shown}{more}")


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append((n, ValueError(f"not valid UTF-8 (byte {exc.start})")))
            continue
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append((n, ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})")))
        except RecursionError:
            rows.append((n, ValueError("not valid JSON (nested too deeply)")))
    return rows


def validate_row(row: Any, root: Path, allow_outside_paths: bool = False) -> PromptSample:
    """A PromptSample from one manifest row, or ValueError with the reason. Media paths are relative to `root`
    and must stay inside it (after resolving `..` and symlinks) unless allow_outside_paths."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if row.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing required field(s) {', '.join(missing)}")
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    _check_types(row)
    ptype = row["problem_type"]
    if ptype not in PROBLEM_TYPES:
        raise ValueError(f"problem_type {ptype!r} is not one of {', '.join(PROBLEM_TYPES)}")
    answer = str(row["answer"])
    options = row.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError("options must be a list of strings")
    if ptype == "multiple_choice":
        if len(options) < 2:
            raise ValueError("multiple_choice needs at least two options")
        letters = [chr(ord("A") + i) for i in range(len(options))]
        if answer.strip().upper() not in letters:
            raise ValueError(f"multiple_choice answer {answer!r} is not one of the option letters {letters}")
    if ptype == "numerical":
        try:
            value = float(answer)
        except ValueError:
            raise ValueError(f"numerical answer {answer!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"numerical answer {answer!r} is not finite")
    stage = row.get("stage", 1)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    paths = {}
    for key in ("video", "audio"):
        value = row.get(key)
        if value in (None, ""):
            paths[key] = None
            continue
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"{key} must be a path string, got {type(value).__name__}")
        p = Path(value)
        p = p if p.is_absolute() else root / p
        if not allow_outside_paths and not p.resolve().is_relative_to(Path(root).resolve()):
            raise ValueError(f"{key} path {value!r} is outside the manifest's folder {root} "
                             "(set data.allow_outside_paths=true to allow it)")
        if not p.is_file():
            raise ValueError(f"{key} file not found: {p}")
        paths[key] = Path(os.path.abspath(p))  # absolute (not resolved): the same wherever it is read from
    return PromptSample(
        id=str(row["id"]), question=str(row["question"]), problem_type=ptype, answer=answer,
        video=paths["video"], audio=paths["audio"], options=options, hint=row.get("hint") or None,
        audio_caption=row.get("audio_caption") or None, stage=stage, cot=row.get("cot") or None,
        difficulty=row.get("difficulty") or None,
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_types(row: dict) -> None:
    """Each field's JSON type, before any value is read: a wrong type is a rejection naming the field, never
    a silent str() (a number `question` used to become "42", an integer `difficulty` stayed an int)."""
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise ValueError(f"id must be a string (or an integer), got {_kind(rid)} {rid!r}"[:200])
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise ValueError(f"answer must be a string (or a number), got {_kind(answer)}")
    if not isinstance(row["problem_type"], str):
        raise ValueError(f"problem_type must be a string, got {_kind(row['problem_type'])}")
    for key in TEXT_FIELDS:
        value = row.get(key)
        if not (isinstance(value, str) or (value is None and key != "question")):
            raise ValueError(f"{key} must be a string, got {_kind(value)} {value!r}"[:200])


def _row_id(row: Any) -> str | None:
    """The id of a (possibly invalid) row, for the list of rejected rows."""
    if isinstance(row, dict):
        rid = row.get("id")
        if isinstance(rid, str | int) and not isinstance(rid, bool) and rid != "":
            return str(rid)[:200]
    return None


def load_manifest(path: str | Path, on_error: str = "raise", allow_outside_paths: bool = False
                  ) -> tuple[list[PromptSample], list[RejectedRow]]:
    """Load and validate a manifest. on_error="raise" (default) fails listing every bad row;
    on_error="skip" returns the good rows and the rejected rows (RejectedRow: unpacks as (line, reason), with
    the row's id where it has one) for counting and logging. Media paths must stay inside the manifest's
    folder unless allow_outside_paths."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    samples, rejected, seen = [], [], set()
    for n, row in _read_rows(path):
        try:
            sample = validate_row(row, path.parent, allow_outside_paths)
            if sample.id in seen:
                raise ValueError(f"duplicate id {sample.id!r}")
        except ValueError as exc:
            rejected.append(RejectedRow(n, str(exc), _row_id(row), str(path)))
            continue
        seen.add(sample.id)
        samples.append(sample)
    if rejected and on_error == "raise":
        raise ManifestError(path, rejected)
    if not samples and not rejected:
        raise ManifestError(path, [RejectedRow(0, "the manifest holds no rows", None, str(path))])
    return samples, rejected


def sample_to_row(sample: PromptSample, root: Path) -> dict:
    """The manifest row of a sample, with media paths relative to `root`."""
    def rel(p: Path | None) -> str | None:
        return None if p is None else str(Path(p).relative_to(root))

    return {
        "id": sample.id, "question": sample.question, "problem_type": sample.problem_type, "answer": sample.answer,
        "video": rel(sample.video), "audio": rel(sample.audio), "options": sample.options, "hint": sample.hint,
        "audio_caption": sample.audio_caption, "stage": sample.stage, "cot": sample.cot,
        "difficulty": sample.difficulty,
    }


def write_manifest(samples: list[PromptSample], path: str | Path) -> Path:
    """Write JSONL (or Parquet when the name ends in .parquet); paths become relative to its folder."""
    path = Path(path)
    rows = [sample_to_row(s, path.parent) for s in samples]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
