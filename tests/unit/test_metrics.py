"""The per-component /metrics endpoints (common/metrics.py), the target file the driver writes and the
dashboard generated from the series table."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client import generate_latest

from actors.worker import rollout_samples
from buffer_service.service import ReplayService, replay_samples
from cluster.dashboard import DASHBOARD, build_dashboard, panel_query
from cluster.metrics import DriverMetrics, MetricsTargets
from common.metrics import METRICS, ROLES, ComponentEndpoint, role_series
from learner.actor import learner_samples
from reward_workers.pool import reward_samples


def scrape(endpoint: ComponentEndpoint) -> str:
    return urllib.request.urlopen(f"http://{endpoint.address()}/metrics", timeout=5).read().decode()


def test_an_endpoint_reads_its_component_at_each_scrape():
    counts = {"completions": 3}
    endpoint = ComponentEndpoint("rollout", lambda: [("avatar_completions_total", counts["completions"], {}),
                                                     ("avatar_groups_scoring", 2, {})])
    assert endpoint.address().startswith("127.0.0.1:")  # outside Ray: loopback
    body = scrape(endpoint)
    assert "avatar_completions_total 3.0" in body and "avatar_groups_scoring 2.0" in body
    assert "# TYPE avatar_completions_total counter" in body
    counts["completions"] = 11  # nothing pushed: the next scrape reads the new value
    assert "avatar_completions_total 11.0" in scrape(endpoint)
    assert endpoint.address() == endpoint.address()  # one server, started once


def test_labels_and_a_series_of_another_role_are_refused():
    endpoint = ComponentEndpoint("replay", lambda: [("avatar_buffer_tier_size", 4, {"tier": "hard"})])
    assert 'avatar_buffer_tier_size{tier="hard"} 4.0' in generate_latest(endpoint.registry).decode()
    wrong = ComponentEndpoint("replay", lambda: [("avatar_loss", 1.0, {"term": "total"})])
    with pytest.raises(ValueError, match="avatar_loss belongs to learner, not replay"):
        generate_latest(wrong.registry)
    with pytest.raises(ValueError, match="unknown metrics role"):
        ComponentEndpoint("trainer", list)


def test_a_failing_read_leaves_a_gap_not_a_dead_component():
    def broken():
        raise ConnectionError("redis gone")

    assert generate_latest(ComponentEndpoint("replay", broken).registry).decode().strip() == ""


def _names(samples) -> set[str]:
    return {name for name, _, _ in samples}


def test_each_component_exports_exactly_its_roles_series():
    """The sample functions, run on a component's state, cover every series of the role and no other."""
    counts = {"completions": 8, "tokens": 90, "generate_seconds": 1.5, "groups_scoring": 1}
    judge_stats = {"judge_requests": 4, "judge_failures": 1, "judge_calls": 2, "judge_latency_s_sum": 3.0}
    replay_stats = {"fresh_length": 1, "hints_active": 2, "tier_easy": 1, "tier_medium": 2, "tier_hard": 3,
                    **{c: 0 for c in ReplayService.COUNTERS}}
    summary = {"seconds": 0.5, "loss": 0.1, "clip_fraction": 0.0, "kl": 0.01, "zero_adv_token_fraction": 0.25,
               "accuracy": 0.5, "reward_mean": 0.75, "staleness_max": 1, "hint_rate": 0.5, "replay_fraction": 0.5,
               "reward_terms": {"accuracy": 0.5, "format": 1.0}, "advantages_fresh": [1.0, -1.0],
               "advantages_replay": [-0.5]}
    driver = DriverMetrics()
    driver.row = {"prompts_in_flight": 4, "buffer_events": {"skipped_prompt": 1}, "weight_sync_seconds": 0.2}
    produced = {
        "rollout": rollout_samples(counts, 2), "reward": reward_samples({"groups_scored": 2, **judge_stats}),
        "replay": replay_samples(replay_stats), "learner": learner_samples(3, 3, 1, summary),
        "driver": driver.samples(),
    }
    assert sorted(produced) == sorted(ROLES)
    for role, samples in produced.items():
        assert _names(samples) == set(role_series(role)), role
    learner_values = {(n, tuple(sorted(lab.items()))): v for n, v, lab in produced["learner"]}
    assert learner_values[("avatar_advantage_abs_mean", (("source", "fresh"),))] == 1.0
    assert learner_values[("avatar_reward_mean", (("term", "format"),))] == 1.0
    assert dict((n, v) for n, v, _ in produced["reward"])["avatar_judge_latency_seconds"] == 1.5  # 3.0 s / 2 calls
    # before the first RL step the learner shows only what it holds, not zeros for a step that never was
    assert _names(learner_samples(3, 3, 1, {})) == {"avatar_policy_version", "avatar_learner_steps_total",
                                                              "avatar_stale_dropped_total"}


def test_the_target_file_lists_each_component_once_with_its_node(tmp_path):
    targets = MetricsTargets(tmp_path, "job1")
    targets.update("rollout-0", "rollout", {"address": "127.0.0.1:9001", "node": "n1"})
    targets.update("learner", "learner", {"address": "127.0.0.1:9002", "node": "n0"})
    targets.update("rollout-0", "rollout", {"address": "127.0.0.1:9005", "node": "n2"})  # restarted elsewhere
    targets.write()
    entries = json.loads(targets.path.read_text())
    assert entries == [
        {"targets": ["127.0.0.1:9002"], "labels": {"job_name": "job1", "role": "learner", "component": "learner",
                                                   "node": "n0"}},
        {"targets": ["127.0.0.1:9005"], "labels": {"job_name": "job1", "role": "rollout", "component": "rollout-0",
                                                   "node": "n2"}},
    ]


def test_the_dashboard_is_generated_from_the_table_and_folds_each_role():
    assert json.loads(DASHBOARD.read_text()) == build_dashboard()  # regenerate: python -m cluster.dashboard
    queries = [t["expr"] for p in build_dashboard()["panels"] for t in p["targets"]]
    assert len(queries) == len(METRICS)
    assert panel_query("avatar_completions_total") == "sum (rate(avatar_completions_total[1m]))"
    assert panel_query("avatar_buffer_events_total") == "sum by (event) (rate(avatar_buffer_events_total[1m]))"
    assert panel_query("avatar_judge_latency_seconds") == "avg (avatar_judge_latency_seconds)"
    assert panel_query("avatar_buffer_tier_size") == "sum by (tier) (avatar_buffer_tier_size)"


def test_the_metrics_doc_lists_every_series_with_its_exporter():
    doc = (DASHBOARD.parents[1] / "docs" / "metrics.md").read_text()
    for name, series in METRICS.items():
        assert f"| `{name}` | {', '.join(series.labels) or '-'} | {series.role} | {series.doc} |" in doc, name
