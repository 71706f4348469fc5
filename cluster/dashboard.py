"""Generates cluster/grafana_dashboard.json from the metric table in common/metrics.py, so that every panel
queries a series the job exports. Run `python -m cluster.dashboard` after changing METRICS."""

from __future__ import annotations

import json
from pathlib import Path

from common.metrics import METRICS

DASHBOARD = Path(__file__).with_name("grafana_dashboard.json")


def panel_query(name: str) -> str:
    """A counter's rate summed over the role's endpoints (rollout workers, reward workers); a gauge folded by its
    `fold` (sum, avg, min), by its labels."""
    series = METRICS[name]
    by = f" by ({', '.join(series.labels)})" if series.labels else ""
    if series.kind == "counter":
        return f"sum{by} (rate({name}[1m]))"
    return f"{series.fold}{by} ({name})"


def build_dashboard() -> dict:
    panels = []
    for i, (name, series) in enumerate(METRICS.items()):
        doc, labels = series.doc, series.labels
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": doc,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 7, "w": 8, "x": (i % 3) * 8, "y": (i // 3) * 7},
            "targets": [{"refId": "A", "expr": panel_query(name),
                         "legendFormat": "{{" + labels[0] + "}}" if labels else name}],
        })
    return {
        "title": "AVATAR actor-learner",
        "uid": "avatar-rl",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


def main() -> None:
    DASHBOARD.write_text(json.dumps(build_dashboard(), indent=2) + "\n")
    print(f"wrote {DASHBOARD}")


if __name__ == "__main__":
    main()
