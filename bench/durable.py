"""Durable accept in the benchmark: Postfix and the disk itself as peers (issue 16).

``bench/run.py --durable`` runs exactly the issue's table: ``slimta-maildir`` (``twistd
slimta``'s default bus: a 250 means fsynced), ``postfix`` (a private Postfix with a durable
queue, bench/postfix_server.py) and the disk probe (``disk-1``, ``disk-10``: create, write,
fsync in 1 and 10 threads, bench/disk.py) in the scenarios ``1x2k``, ``50x2k`` and ``10x1m``,
3 interleaved rounds. The targets are judged on the medians of the rounds.

Everything durable runs in one scratch directory on a disk file system (``--dir``, never
tmpfs). The scratch directory gets ext4's "top of directory hierarchy" flag (``chattr +T``)
when it can, so that every run's directory lands in a block group of its own: on ext4
without a journal, creating a file in a group where many files were deleted in the last
minutes scans past every one of them (``recently_deleted()`` in the kernel), and one run's
deletions would slow the next run's creations.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PROBES = {"disk-1": 1, "disk-10": 10}
DURABLE_SERVERS = ("slimta-maildir", "postfix", *PROBES)
DURABLE_SCENARIOS = ("1x2k", "50x2k", "10x1m")
NOT_DISK = ("tmpfs", "ramfs", "devtmpfs", "overlay", "squashfs")


def filesystem_of(path: str) -> str | None:
    """The file system type holding ``path`` (from /proc/self/mountinfo), or None."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == device and "-" in fields:
                    return fields[fields.index("-") + 1]
    except OSError:
        pass
    return None


def prepare_scratch(scratch: str) -> list[str]:
    """Make ``scratch`` fit for durable runs; returns notes for the header. Exits when it is
    not on a disk file system."""
    fstype = filesystem_of(scratch)
    if fstype in NOT_DISK:
        raise SystemExit(f"durable rows need a disk file system; {scratch} is on {fstype}")
    os.chmod(scratch, 0o755)  # Postfix's daemons (user postfix) go through it
    topdir = (
        subprocess.run(["chattr", "+T", scratch], capture_output=True, check=False).returncode == 0
    )
    return [
        f"durable rows in {scratch} ({fstype}"
        + (", chattr +T: each run in a block group of its own)" if topdir else ")")
    ]


def tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and of its children, live and reaped (Postfix's master
    and its daemons: smtpd, cleanup, trivial-rewrite, qmgr, ...)."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(p: int | str) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    own = fields(pid)
    total = sum(int(x) for x in own[11:15])  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            child = fields(entry)
        except OSError:
            continue  # gone meanwhile
        if int(child[1]) == pid:
            total += int(child[11]) + int(child[12])
    return total / tick


def run_probe(kind: str, scenario: Any, scratch: str) -> dict[str, Any]:
    """One disk probe run, shaped like a server's result in run.py."""
    result: dict[str, Any] = {"server": kind, "scenario": scenario.key}
    command = [
        sys.executable,
        os.path.join(HERE, "disk.py"),
        f"--dir={scratch}",
        f"--threads={PROBES[kind]}",
        f"--size={scenario.size}",
        f"--seconds={scenario.time_limit}",
        f"--files={scenario.messages}",
        "--keep",  # removed with the scenario's other files, outside the measured runs
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=scenario.hard_limit, check=True
        )
    except (subprocess.SubprocessError, OSError) as e:
        result["error"] = f"disk probe failed: {e}"
        return result
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(figures)
    cpu = figures.pop("probe_cpu")
    result["maildir"] = figures.pop("dir")
    result.update(
        {
            "pipelining_requested": False,
            "pipelined_connections": 0,
            "hit_time_limit": False,
            "peak_reset": None,
            "server_cpu": cpu,
            "server_cpu_per_msg": cpu / figures["messages"] if figures["messages"] else None,
            "client_cpu": 0.0,
        }
    )
    return result


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None and not r.get("error")]
    return statistics.median(values) if values else None


def medians(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per scenario and durable server: the medians of its rounds."""
    out: dict[str, dict[str, Any]] = {}
    for key in DURABLE_SCENARIOS:
        for kind in DURABLE_SERVERS:
            chosen = results.get(key, {}).get(kind)
            if not chosen:
                continue
            rounds = chosen.get("rounds", [])
            out.setdefault(key, {})[kind] = {
                name: _median(rounds, name)
                for name in ("msgs_per_s", "p50", "p99", "server_cpu_per_msg")
            } | {"rounds": len(rounds)}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def targets(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's targets, on the medians of the rounds (never on a missing run)."""
    med = medians(results)

    def rate(key: str, kind: str) -> float | None:
        value = med.get(key, {}).get(kind, {}).get("msgs_per_s")
        return float(value) if value is not None else None

    out = []
    for key, label, factor in (
        ("50x2k", "50 x 2 KiB", 1.3),
        ("1x2k", "1 x 2 KiB", 1.0),
        ("10x1m", "10 x 1 MiB", 1.5),
    ):
        r = _ratio(rate(key, "slimta-maildir"), rate(key, "postfix"))
        out.append(
            {
                "target": f"maildir >= {factor}x Postfix msgs/s, {label} (medians)",
                "value": None if r is None else round(r, 2),
                "met": None if r is None else r >= factor,
            }
        )
    r = _ratio(rate("50x2k", "slimta-maildir"), rate("50x2k", "disk-10"))
    out.append(
        {
            "target": "maildir >= 85% of the 10-thread disk probe, 50 x 2 KiB (medians)",
            "value": None if r is None else round(r, 2),
            "met": None if r is None else r >= 0.85,
        }
    )
    mine = med.get("50x2k", {}).get("slimta-maildir", {})
    peer = med.get("50x2k", {}).get("postfix", {})
    p99, peer_p99 = mine.get("p99"), peer.get("p99")
    out.append(
        {
            "target": "maildir p99 latency <= Postfix's, 50 x 2 KiB (medians, ms)",
            "value": None if p99 is None or peer_p99 is None else round(p99 * 1e3, 1),
            "met": None if p99 is None or peer_p99 is None else p99 <= peer_p99,
            **({"note": f"Postfix {peer_p99 * 1e3:.1f}"} if peer_p99 is not None else {}),
        }
    )
    cpu = mine.get("server_cpu_per_msg")
    out.append(
        {
            "target": "maildir server CPU <= 400 us per message, 50 x 2 KiB (median)",
            "value": None if cpu is None else round(cpu * 1e6),
            "met": None if cpu is None else cpu <= 400e-6,
        }
    )
    return out


def median_lines(
    results: dict[str, dict[str, dict[str, Any]]], names: dict[str, str]
) -> list[str]:
    """The medians the durable targets are judged on, one line per scenario and server."""
    lines = []
    for key, by_kind in medians(results).items():
        for kind, m in by_kind.items():
            rate, p99, cpu = m["msgs_per_s"], m["p99"], m["server_cpu_per_msg"]
            lines.append(
                f"  {key:<6} {names[kind]:<18} median of {m['rounds']}: "
                f"{'-' if rate is None else f'{rate:,.0f}'} msgs/s  p99 "
                f"{'-' if p99 is None else f'{p99 * 1e3:.1f}'} ms  CPU/msg "
                f"{'-' if cpu is None else f'{cpu * 1e6:.0f} us'}"
            )
    return lines


def scratch_dir(parent: str | None) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="slimta-bench-", dir=parent)
