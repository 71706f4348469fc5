"""Hooks for the test suites, off unless their environment variable is set; the product calls them at the two
points the tests watch and nowhere else.

- failpoint(name) (tests/faults): with AVATAR_FAILPOINT=<name> and AVATAR_FAILPOINT_FILE set, the first process
  to reach the point claims the file and exits at once (as a SIGKILL would).
- install_audit_from_env() (tests/e2e, the data plane's test): with AVATAR_AUDIT_RECEIVED=<file>, every object that
  a `ray.get` in the driver process returns is walked (dataclasses, lists, tuples, dicts) and each type found in
  it is written to the file once, with the largest size in bytes seen for `bytes` values: receipts, counts and ids
  may reach the driver; a trajectory (or its Arrow bytes) must not.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

_seen: set[str] = set()
_largest = [-1]  # the largest bytes value seen so far
_lock = threading.Lock()


def _walk(obj, found: dict, depth: int = 0) -> None:
    if depth > 8:
        return
    name = type(obj).__name__
    if isinstance(obj, (bytes, bytearray, memoryview)):
        found["bytes"] = max(found.get("bytes", 0), len(obj))
        return
    found.setdefault(name, 0)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), found, depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(k, found, depth + 1)
            _walk(v, found, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _walk(item, found, depth + 1)


def install_audit_from_env() -> None:
    """Wrap ray.get in this process when AVATAR_AUDIT_RECEIVED names a file (idempotent)."""
    path = os.environ.get("AVATAR_AUDIT_RECEIVED")
    if not path:
        return
    import ray

    if getattr(ray.get, "_avatar_audit", False):
        return
    original, out = ray.get, Path(path)

    def audited_get(*args, **kwargs):
        result = original(*args, **kwargs)
        found: dict = {}
        _walk(result, found)
        with _lock:
            new = [k for k in found if k != "bytes" and k not in _seen]
            _seen.update(new)
            if found.get("bytes", -1) > _largest[0]:
                _largest[0] = found["bytes"]
                new.append(f"bytes {found['bytes']}")
            if new:
                with out.open("a") as f:
                    f.write("".join(line + "\n" for line in new))
        return result

    audited_get._avatar_audit = True
    ray.get = audited_get


def failpoint(name: str) -> None:
    """Exit this process at once if AVATAR_FAILPOINT names this point and no process has fired it yet (the
    AVATAR_FAILPOINT_FILE marker, created exclusively, holds the pid that did); nothing happens otherwise."""
    if os.environ.get("AVATAR_FAILPOINT") != name:
        return
    marker = os.environ.get("AVATAR_FAILPOINT_FILE")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY) if marker else None
    except FileExistsError:
        return  # fired once already
    if fd is not None:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)
