"""``bench/run.py --product``: issue 18's tables, the product as users run it, in one command.

    .venv/bin/python bench/run.py --product            # 3 interleaved rounds, ~12 minutes

Servers: ``twistd slimta`` with the discard bus and the default log (text, info, to a ``-l``
file), the same with the JSON log and with logging off (``--log-level critical``), ``twistd
slimta`` with the durable Maildir bus, the in-process slimta_tx rows, and twisted.mail.
Scenarios: 50 connections x 2 KiB reused, 50 connections one message per connection, one
connection at a time one message per connection (all lockstep, driven by Postfix's
``smtp-source`` where installed), and 10 x 1 MiB. Figures are **medians** of the interleaved
rounds (the issue's rule), not the fastest round the main table shows.
"""

from __future__ import annotations

import statistics
from typing import Any

SERVERS = (
    "twistd-discard",
    "twistd-json",
    "twistd-nolog",
    "twistd-metrics",
    "twistd-maildir",
    "slimta-discard",
    "slimta-maildir",
    "twisted",
)
SCENARIOS = ("50x2k", "50x2k-1", "1x2k-1", "10x1m")
ROUNDS = 3
# The log's cost is measured on the small-message scenarios only.
_LOG_KINDS = ("twistd-json", "twistd-nolog")
TARGETS = (("50x2k", 1.5), ("50x2k-1", 1.3), ("10x1m", 3.0))
LOG_BUDGET = 0.10
# --metrics against the same server without it (issue 13): 50 connections only.
METRICS_SCENARIOS = ("50x2k", "50x2k-1")
METRICS_BUDGET = 0.05


def skip(kind: str, scenario: str) -> bool:
    """Rows the product tables do not need (the log variants with 1 MiB messages)."""
    if kind == "twistd-metrics":
        return scenario not in METRICS_SCENARIOS
    return kind in _LOG_KINDS and scenario == "10x1m"


def median_rate(result: dict[str, Any] | None) -> float | None:
    """The median msgs/s of one server's clean rounds in one scenario."""
    if not result:
        return None
    rates = [
        r["msgs_per_s"]
        for r in result.get("rounds", [])
        if not r.get("error") and r.get("msgs_per_s")
    ]
    return statistics.median(rates) if rates else None


def report(
    results: dict[str, dict[str, dict[str, Any]]],
) -> tuple[list[str], list[dict[str, Any]]]:
    """The issue's tables (printed lines) and its targets (for the JSON)."""
    lines = ["", "Issue 18: twistd slimta as shipped (medians of the rounds)"]
    judged: list[dict[str, Any]] = []
    header = f"  {'scenario':<10} {'twistd discard':>15} {'twistd maildir':>15} "
    header += f"{'in-process':>11} {'twisted.mail':>13} {'discard/tw':>11} {'maildir/tw':>11}"
    lines.append(header)
    for key in SCENARIOS:
        by = results.get(key, {})
        cells = {k: median_rate(by.get(k)) for k in SERVERS}
        peer = cells["twisted"]

        def text(value: float | None) -> str:
            return "-" if value is None else f"{value:,.0f}"

        def over(value: float | None, peer: float | None = peer) -> str:
            return "-" if value is None or not peer else f"{value / peer:.2f}x"

        lines.append(
            f"  {key:<10} {text(cells['twistd-discard']):>15} {text(cells['twistd-maildir']):>15} "
            f"{text(cells['slimta-discard']):>11} {text(peer):>13} "
            f"{over(cells['twistd-discard']):>11} {over(cells['twistd-maildir']):>11}"
        )
    lines.append("")
    lines.append("  the log's cost (msgs/s against logging off, same run)")
    for key in ("50x2k", "50x2k-1"):
        by = results.get(key, {})
        off = median_rate(by.get("twistd-nolog"))
        for kind, label in (("twistd-discard", "text"), ("twistd-json", "json")):
            on = median_rate(by.get(kind))
            cost = None if not off or on is None else (off - on) / off
            lines.append(
                f"  {key:<10} {label:<5} {'-' if on is None else f'{on:,.0f}':>9} vs off "
                f"{'-' if off is None else f'{off:,.0f}':>9}: "
                f"{'-' if cost is None else f'{cost * 100:+.1f}%'}"
            )
            judged.append(
                {
                    "target": f"{label} log costs < 10% msgs/s vs logging off ({key})",
                    "value": None if cost is None else round(cost, 3),
                    "met": None if cost is None else cost < LOG_BUDGET,
                }
            )
    lines.append("")
    lines.append("  the metrics' cost (--metrics vs without, discard bus, same run)")
    for key in METRICS_SCENARIOS:
        by = results.get(key, {})
        off = median_rate(by.get("twistd-discard"))
        on = median_rate(by.get("twistd-metrics"))
        cost = None if not off or on is None else (off - on) / off
        lines.append(
            f"  {key:<10} {'-' if on is None else f'{on:,.0f}':>9} vs "
            f"{'-' if off is None else f'{off:,.0f}':>9} msgs/s: cost "
            f"{'-' if cost is None else f'{cost * 100:+.1f}%'}"
        )
        judged.append(
            {
                "target": f"--metrics costs < 5% msgs/s ({key})",
                "value": None if cost is None else round(cost, 3),
                "met": None if cost is None else cost < METRICS_BUDGET,
            }
        )
    for key, goal in TARGETS:
        by = results.get(key, {})
        mine, peer = median_rate(by.get("twistd-discard")), median_rate(by.get("twisted"))
        value = None if mine is None or not peer else mine / peer
        judged.append(
            {
                "target": f"twistd slimta (discard, default log) >= {goal}x twisted.mail ({key})",
                "value": None if value is None else round(value, 2),
                "met": None if value is None else value >= goal,
            }
        )
    return lines, judged
