"""Prometheus metrics of the job. Components (rollout workers, reward pool, replay service, learner) report
their counters through `stats()` calls; the driver turns them into these series and serves them on
127.0.0.1:<port>. Prometheus finds the port through a file_sd target file the driver writes into the run
folder (prometheus.yml beside it points there), so no fixed port is needed and several jobs can run."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

# name -> (type, help, labels). The Grafana dashboard (cluster/grafana_dashboard.json) is generated from this
# table, so every panel queries a series that the job really exports.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "avatar_policy_version": ("gauge", "Version of the policy the learner holds", ()),
    "avatar_learner_steps_total": ("counter", "Optimizer steps taken", ()),
    "avatar_learner_step_seconds": ("gauge", "Wall time of the last learner step", ()),
    "avatar_loss": ("gauge", "Loss terms of the last step", ("term",)),
    "avatar_clip_fraction": ("gauge", "Fraction of tokens whose ratio was clipped", ()),
    "avatar_kl": ("gauge", "Mean k3 KL to the reference", ()),
    "avatar_advantage_abs_mean": ("gauge", "Mean |advantage| by source", ("source",)),
    "avatar_zero_advantage_fraction": ("gauge", "Fraction of completion tokens with zero advantage", ()),
    "avatar_reward_mean": ("gauge", "Mean reward of the last batch of fresh groups, by term", ("term",)),
    "avatar_accuracy": ("gauge", "Accuracy term mean of the last batch of fresh groups", ()),
    "avatar_rollout_tokens_per_second": ("gauge", "Completion tokens generated per second", ()),
    "avatar_completions_total": ("counter", "Completions generated", ()),
    "avatar_prompts_in_flight": ("gauge", "Prompts handed to rollout workers and not yet scored", ()),
    "avatar_queue_depth": ("gauge", "Items waiting, by queue", ("queue",)),
    "avatar_staleness_versions": ("gauge", "Max policy versions between generation and training in the last batch", ()),
    "avatar_buffer_tier_size": ("gauge", "Entries in each replay tier", ("tier",)),
    "avatar_buffer_events_total": ("counter", "Replay service events", ("event",)),
    "avatar_hint_rate": ("gauge", "Fraction of the last batch's prompts that were hinted", ()),
    "avatar_hints_active": ("gauge", "Prompts whose hint is on in the replay service", ()),
    "avatar_replay_fraction": ("gauge", "Replayed samples over all samples of the last training batch", ()),
    "avatar_stale_dropped_total": ("counter", "Fresh groups dropped at training for exceeding max_staleness", ()),
    "avatar_judge_requests_total": ("counter", "Requests sent to the LLM judge", ()),
    "avatar_judge_latency_seconds": ("gauge", "Mean latency of judge requests", ()),
    "avatar_judge_failures_total": ("counter", "Judge requests that fell back", ()),
    "avatar_weight_sync_seconds": ("gauge", "Time to publish and load the last weights", ()),
}


class JobMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.series = {}
        for name, (kind, doc, labels) in METRICS.items():
            cls = Counter if kind == "counter" else Gauge
            # prometheus_client appends _total to counters itself
            metric_name = name[: -len("_total")] if kind == "counter" else name
            self.series[name] = cls(metric_name, doc, labels, registry=self.registry)
        self._counter_values: dict[tuple, float] = {}
        self.port: int | None = None

    def serve(self, port: int = 0) -> int:
        server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.port = server.server_port
        return self.port

    def set(self, name: str, value: float, **labels: str) -> None:
        metric = self.series[name]
        (metric.labels(**labels) if labels else metric).set(float(value))

    def count_to(self, name: str, total: float, **labels: str) -> None:
        """Counters mirror a component's running total: add only what is new."""
        key = (name, tuple(sorted(labels.items())))
        delta = float(total) - self._counter_values.get(key, 0.0)
        if delta > 0:
            metric = self.series[name]
            (metric.labels(**labels) if labels else metric).inc(delta)
            self._counter_values[key] = float(total)


def write_scrape_config(run_dir: Path, port: int, job: str) -> Path:
    """targets.json (file_sd) and prometheus.yml in run_dir: `prometheus --config.file=run_dir/prometheus.yml`."""
    targets = run_dir / "prometheus_targets.json"
    targets.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"job_name": job}}]))
    config = run_dir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 2s\n"
        "scrape_configs:\n  - job_name: avatar\n    file_sd_configs:\n"
        f"      - files: ['{targets.resolve()}']\n        refresh_interval: 2s\n"
    )
    return config
