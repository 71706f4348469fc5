"""The fault tests run real jobs like the e2e tests: shared-memory segments that appeared during a test and
are left after it (vLLM, DeepSpeed) are removed. The fault tables end the pytest output, passed or not
(pytest keeps a passing test's prints to itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

_PREFIXES = ("deepspeed_", "psm_", "vllm")


@pytest.fixture(autouse=True)
def _no_leftovers():
    before = {p.name for p in Path("/dev/shm").glob("*")}
    yield
    for p in Path("/dev/shm").glob("*"):
        if p.name.startswith(_PREFIXES) and p.name not in before:
            p.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    from . import harness

    if harness.TABLES:
        terminalreporter.section("fault ledger")
        for table in harness.TABLES:
            terminalreporter.write_line(table + "\n")
