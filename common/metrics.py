"""The job's Prometheus series, and the endpoint each component serves them from.

Every series belongs to one role: the component that knows its value exports it from its own process, on its
own node (a rollout worker its completions, the learner its loss, the replay service its tiers, the driver what
only the driver knows). A component serves an endpoint of its own (`ComponentEndpoint`, bound on its node's
address): at each scrape it reads its counters through a function and turns them into the role's series, so
nothing is pushed anywhere between scrapes. The driver lists every endpoint in a file_sd target file
(cluster/metrics.py), which Prometheus reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

ROLES = ("driver", "learner", "replay", "rollout", "reward")


@dataclass(frozen=True)
class Series:
    kind: str  # "gauge" or "counter"
    doc: str
    role: str  # the component that exports it
    labels: tuple[str, ...] = ()
    # how the dashboard folds the series of several endpoints of one role (several rollout workers): a counter is
    # always summed; a gauge by this (a mean latency is averaged, a queue length summed)
    fold: str = "sum"


# The Grafana dashboard (cluster/grafana_dashboard.json) is generated from this table, so every panel queries a
# series the job really exports.
METRICS: dict[str, Series] = {
    "avatar_policy_version": Series("gauge", "Version of the policy the learner holds", "learner"),
    "avatar_learner_steps_total": Series("counter", "Optimizer steps taken", "learner"),
    "avatar_learner_step_seconds": Series("gauge", "Wall time of the last learner step", "learner"),
    "avatar_loss": Series("gauge", "Loss terms of the last step", "learner", ("term",)),
    "avatar_clip_fraction": Series("gauge", "Fraction of tokens whose ratio was clipped", "learner"),
    "avatar_kl": Series("gauge", "Mean k3 KL to the reference", "learner"),
    "avatar_advantage_abs_mean": Series("gauge", "Mean absolute advantage by source", "learner", ("source",)),
    "avatar_zero_advantage_fraction": Series("gauge", "Fraction of completion tokens with zero advantage", "learner"),
    "avatar_reward_mean": Series("gauge", "Mean reward of the last batch of fresh groups, by term", "learner",
                                 ("term",)),
    "avatar_accuracy": Series("gauge", "Accuracy term mean of the last batch of fresh groups", "learner"),
    "avatar_staleness_versions": Series("gauge", "Max policy versions between generation and training in the "
                                                 "last batch", "learner"),
    "avatar_hint_rate": Series("gauge", "Fraction of the last batch's prompts that were hinted", "learner"),
    "avatar_replay_fraction": Series("gauge", "Replayed samples over all samples of the last training batch",
                                     "learner"),
    "avatar_stale_dropped_total": Series("counter", "Fresh groups dropped at training for exceeding max_staleness",
                                         "learner"),
    "avatar_completions_total": Series("counter", "Completions generated", "rollout"),
    "avatar_rollout_tokens_total": Series("counter", "Completion tokens generated", "rollout"),
    "avatar_rollout_generate_seconds_total": Series("counter", "Seconds the rollout engines spent generating",
                                                    "rollout"),
    "avatar_groups_scoring": Series("gauge", "Groups handed to reward workers, reply not yet back", "rollout"),
    "avatar_rollout_policy_version": Series("gauge", "Policy version each rollout worker holds", "rollout",
                                            fold="min"),
    "avatar_groups_scored_total": Series("counter", "Groups scored and pushed by the reward workers", "reward"),
    "avatar_judge_requests_total": Series("counter", "Requests sent to the LLM judge", "reward"),
    "avatar_judge_latency_seconds": Series("gauge", "Mean latency of a judge call (one batch of requests)", "reward",
                                           fold="avg"),
    "avatar_judge_failures_total": Series("counter", "Judge requests that fell back", "reward"),
    "avatar_fresh_stream_length": Series("gauge", "Scored groups in the fresh stream, not yet trained", "replay"),
    "avatar_buffer_tier_size": Series("gauge", "Entries in each replay tier", "replay", ("tier",)),
    "avatar_buffer_events_total": Series("counter", "Replay service events", "replay", ("event",)),
    "avatar_hints_active": Series("gauge", "Prompts whose hint is on in the replay service", "replay"),
    "avatar_prompts_in_flight": Series("gauge", "Prompts handed to rollout workers and not yet scored", "driver"),
    "avatar_skipped_prompts_total": Series("counter", "Prompts skipped for unreadable media", "driver"),
    "avatar_weight_sync_seconds": Series("gauge", "Time to publish and load the last weights", "driver"),
}

Sample = tuple[str, float, dict[str, str]]  # (series name, value, labels)


def role_series(role: str) -> list[str]:
    return [name for name, s in METRICS.items() if s.role == role]


class _StatsCollector:
    """Reads the component's samples at scrape time; a series of another role is a bug in the caller."""

    def __init__(self, role: str, read: Callable[[], Iterable[Sample]]):
        self.role, self.read = role, read

    def collect(self):
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        try:
            samples = list(self.read())
        except Exception as exc:  # a scrape must not kill the component; Prometheus sees the gap
            log.warning("metrics of %s: %s: %s", self.role, type(exc).__name__, exc)
            return
        for name, value, labels in samples:
            series = METRICS[name]
            if series.role != self.role:
                raise ValueError(f"{name} belongs to {series.role}, not {self.role}")
            if name not in families:
                # prometheus_client appends _total to a counter family's name itself
                cls, base = ((CounterMetricFamily, name[: -len("_total")]) if series.kind == "counter"
                             else (GaugeMetricFamily, name))
                families[name] = cls(base, series.doc, labels=list(series.labels))
            families[name].add_metric([labels[k] for k in series.labels], float(value))
        yield from families.values()


class ComponentEndpoint:
    """One component's /metrics, served from its own process on its node's address (`port` 0: a free one).
    Started on first use: a component built outside a job (a test) opens no port."""

    def __init__(self, role: str, read: Callable[[], Iterable[Sample]], port: int = 0):
        if role not in ROLES:
            raise ValueError(f"unknown metrics role {role!r}; one of {ROLES}")
        self.role, self.port = role, port
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(role, read))
        self._address: str | None = None
        self._lock = threading.Lock()

    def address(self, host: str | None = None) -> str:
        """host:port of the endpoint, started now if it is not yet."""
        with self._lock:
            if self._address is None:
                host = host or node_address()
                server, _ = start_http_server(self.port, addr=host, registry=self.registry)
                self._address = f"{host}:{server.server_port}"
                log.info("%s metrics on http://%s/metrics", self.role, self._address)
            return self._address

    def where(self) -> dict:
        """What a component answers when the driver asks for its endpoint: address and Ray node id."""
        import ray

        address = self.address()
        return {"address": address, "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""}


def node_address() -> str:
    """The address this process's Ray node registered with (127.0.0.1 on one machine), where the cluster's
    Prometheus reaches it; 127.0.0.1 outside Ray."""
    import ray

    if not ray.is_initialized():
        return "127.0.0.1"
    here = ray.get_runtime_context().get_node_id()
    return next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here), "127.0.0.1")
