"""The sample-efficiency benchmark's smoke run (--quick): the task, the three core arms through the real CLI (from
the tiny random model: no stage 0), the statistics, the JSON and the PNG."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT, job_env

pytestmark = [pytest.mark.e2e, pytest.mark.long]


def test_sample_efficiency_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.sample_efficiency", "--quick", "--out", str(tmp_path / "se"),
                          "--results", str(tmp_path)], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "sample_efficiency_quick.json").read_text())
    runs = result["runs"]
    assert {a: [r["seed"] for r in rs] for a, rs in runs.items()} == {"grpo": [0], "grpo4": [0], "avatar": [0]}
    # completions as generated: 4 prompts x 8 fresh (GRPO) against 4 x 4 (the 4-fresh control, and AVATAR, whose
    # other half is replayed)
    assert [r["completions"] for r in runs["grpo"]] == [4 * 32]
    assert [r["completions"] for r in runs["grpo4"]] == [4 * 16]
    assert [r["completions"] for r in runs["avatar"]] == [4 * 16]
    # held out before, at step 2 and after: GRPO at 0, 64, 128 completions; the 4-fresh arms at 0, 32, 64
    assert [c for c, _ in runs["grpo"][0]["heldout"]] == [0, 64, 128]
    assert [c for c, _ in runs["avatar"][0]["heldout"]] == [c for c, _ in runs["grpo4"][0]["heldout"]] == [0, 32, 64]
    analysis = result["analysis"]
    assert analysis["heldout_points"] == [0, 64] and analysis["common_completions"] == 64
    assert analysis["window_start"] == 32  # GRPO's first step already fills the 16-completion window
    assert set(analysis["vs_reference"]["grpo"]["to_target"]) == {"0.3", "0.5"}
    assert any("replayed" not in line and line.startswith("| avatar |") for line in result["printed"])
    assert sum(r["replay_fraction"][-1] for r in runs["avatar"]) > 0  # AVATAR replayed once its buffer filled
    assert sum(r["replay_fraction"][-1] for r in runs["grpo4"]) == 0  # the control never replays
    # every fresh group's accuracy lands on the hinted or the unhinted side
    avatar = runs["avatar"][0]
    assert len(avatar["hinted_accuracy"]) + len(avatar["unhinted_accuracy"]) == 4 * 4
    assert result["code_version"] and result["printed"][0].startswith("### Held-out accuracy")
    assert (tmp_path / "sample_efficiency_quick.png").stat().st_size > 20_000
