"""docs/metrics.md lists every metric the sink defines, and the Grafana dashboard in docs/ is
JSON that Grafana can import and queries only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from slimta_tx.metrics.sink import metric_names

DOCS = Path(__file__).resolve().parent.parent / "docs"
# prometheus_client's default collectors (what process_registry() adds).
DEFAULT_COLLECTED = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
}


def exposed_names() -> set[str]:
    """Every sample name the sink exposes (a histogram's _bucket, _sum and _count)."""
    names = set()
    for name, (kind, _) in metric_names().items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def test_metrics_md_lists_every_metric() -> None:
    text = (DOCS / "metrics.md").read_text()
    for name, (kind, labels) in metric_names().items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"{name} is not in docs/metrics.md's table"
        assert f"| {kind} |" in row, row
        for label in labels:
            assert f"`{label}`" in row, (name, label)


def test_the_dashboard_parses_and_queries_existing_metrics() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"]
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b((?:slimta_tx|process|python)_[a-z_]+)", target["expr"]))
    assert queried
    unknown = queried - exposed_names() - DEFAULT_COLLECTED
    assert not unknown, unknown
    # Every contracted metric is on the dashboard.
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in queried}
    assert {n for n in metric_names() if n != "slimta_tx_time_limits_total"} <= shown
