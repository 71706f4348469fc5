"""Prometheus for a job: the driver's own series, and the file that lists every component's endpoint.

Each component serves its series from its own process on its own node (common/metrics.py); the driver serves
only what the driver alone knows. Prometheus finds them all through a file_sd target file the driver writes into
the run folder (prometheus.yml beside it points there) and rewrites when a restarted component comes back on a
new port, so no fixed port is needed and several jobs can run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.metrics import ComponentEndpoint, Sample

TARGETS_FILE = "prometheus_targets.json"


class DriverMetrics:
    """The driver's series, read from the last history row at each scrape."""

    def __init__(self, port: int = 0) -> None:
        self.row: dict = {}
        self.endpoint = ComponentEndpoint("driver", self.samples, port)

    def samples(self) -> list[Sample]:
        row = self.row
        out: list[Sample] = [
            ("avatar_prompts_in_flight", row.get("prompts_in_flight", 0), {}),
            ("avatar_skipped_prompts_total", row.get("buffer_events", {}).get("skipped_prompt", 0), {}),
        ]
        if row.get("weight_sync_seconds") is not None:
            out.append(("avatar_weight_sync_seconds", row["weight_sync_seconds"], {}))
        return out


class MetricsTargets:
    """run_dir/prometheus_targets.json (file_sd): one target per component endpoint, labelled with its role,
    its name (rollout-0, reward-1, ...) and the id of the Ray node it runs on."""

    def __init__(self, run_dir: Path, job: str):
        self.path = run_dir / TARGETS_FILE
        self.job = job
        self.targets: dict[str, dict] = {}  # name -> {"address", "role", "node"}

    def update(self, name: str, role: str, endpoint: dict) -> None:
        self.targets[name] = {"role": role, **endpoint}

    def write(self) -> None:
        entries = [{"targets": [t["address"]], "labels": {"job_name": self.job, "role": t["role"], "component": name,
                                                         "node": t["node"]}}
                   for name, t in sorted(self.targets.items())]
        tmp = self.path.with_suffix(".tmp")  # Prometheus may read it at any moment: replace, never rewrite
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.path)


def write_scrape_config(run_dir: Path) -> Path:
    """prometheus.yml in run_dir, reading the target file: `prometheus --config.file=run_dir/prometheus.yml`."""
    targets = run_dir / TARGETS_FILE
    config = run_dir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 2s\n"
        "scrape_configs:\n  - job_name: avatar\n    file_sd_configs:\n"
        f"      - files: ['{targets.resolve()}']\n        refresh_interval: 2s\n"
    )
    return config
