"""common/affinity.py: a pinned process runs all its threads on the configured cores only."""

import json
import os
import subprocess
import sys

import pytest

from cluster.config import ConfigError, load_config

PROBE = """
import json, os, threading
done = threading.Event()
started = threading.Thread(target=done.wait); started.start()  # a thread from before the pin, alive until the end
from common.affinity import pin_process
pin_process([0], "learner.cpu_affinity")
import torch
tasks = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
done.set()
print(json.dumps({"tasks": tasks, "torch_threads": torch.get_num_threads(),
                  "bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}))
"""


def test_pin_moves_every_thread_and_tells_torch_and_vllm():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(seen["tasks"]) >= 2  # the main thread and the one started before the pin
    assert all(cpus == [0] for cpus in seen["tasks"].values())
    assert seen["torch_threads"] == 1 and seen["bind"] == "0"


def test_a_core_this_machine_lacks_is_named():
    from common.affinity import pin_process

    absent = max(os.sched_getaffinity(0)) + 1000
    with pytest.raises(ValueError, match=rf"rollout.cpu_affinity: CPU ids \[{absent}\] are not available"):
        pin_process([absent], "rollout.cpu_affinity")


def test_core_lists_are_checked_at_load():
    cfg = load_config("configs/demo.yaml", ["rollout.cpu_affinity=[1, 0]", "learner.cpu_affinity=[2]"])
    assert cfg.rollout.cpu_affinity == [0, 1] and cfg.learner.cpu_affinity == [2]
    for bad in ("[0, 0]", "[-1]", "[]"):
        with pytest.raises(ConfigError, match="learner.cpu_affinity"):
            load_config("configs/demo.yaml", [f"learner.cpu_affinity={bad}"])
