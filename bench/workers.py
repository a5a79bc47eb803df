"""``twistd slimta --workers N`` in the benchmark: the product as users run it, 1 vs 2 workers.

Used by ``bench/run.py``: the ``twistd-w1-*``/``twistd-w2-*`` servers are real ``twistd -n
slimta`` processes (default logging: one line per message, to a file), with the discarding
bus or a Maildir (fsync on). With workers, the server's CPU and memory are the sums over the
parent and its workers; the parent's own share is reported too (it forwards the workers' log
events). They run only in the scenarios of :data:`SCENARIOS`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
MAX_MESSAGE_SIZE = 256 * 1024 * 1024

SERVERS: dict[str, str] = {
    "twistd-w1-discard": "twistd w1 discard",
    "twistd-w2-discard": "twistd w2 discard",
    "twistd-w1-maildir": "twistd w1 maildir",
    "twistd-w2-maildir": "twistd w2 maildir",
}
SCENARIOS = ("50x2k", "50x2k-pipe")
TARGET_RATIO = 1.6
_PORT = re.compile(rb"SmtpEdge starting on (\d+)")


def applies(kind: str, scenario: str) -> bool:
    return kind not in SERVERS or scenario in SCENARIOS


def command(kind: str, maildir: str | None) -> list[str]:
    workers = kind.split("-")[1].removeprefix("w")
    bus = ["--maildir", maildir or ""] if kind.endswith("maildir") else []
    if not bus:
        bus = ["--bus", "slimta_tx.bus.simple:DiscardBus"]
    return [
        TWISTD,
        "-n",
        "--pidfile=",
        "slimta",
        "--workers",
        workers,
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--hostname",
        "bench.test",
        "--max-size",
        str(MAX_MESSAGE_SIZE),
        *bus,
    ]


def start(
    kind: str, maildir: str | None, log_path: str, timeout: float = 30.0
) -> tuple[subprocess.Popen[str], int]:
    """Start the server; wait (bounded) until every worker said it is ready; its port."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command(kind, maildir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    workers = int(kind.split("-")[1].removeprefix("w"))
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            text = f.read()
        match = _PORT.search(text)
        ready = workers == 1 or all(
            f"worker {n} ready".encode() in text for n in range(1, workers + 1)
        )
        if match and ready:
            return proc, int(match.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = text.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"twistd did not start: {tail}")
        time.sleep(0.05)  # poll interval of a bounded wait for another process


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc/<pid>/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(p) for p in f.read().split())
            except OSError:
                continue
    return out


def parent_share(result: dict[str, Any]) -> str | None:
    """The note for a row: how much of the server's CPU the parent itself used."""
    parent = result.get("parent_cpu")
    if parent is None or not result.get("server_cpu"):
        return None
    return f"parent {parent / result['server_cpu'] * 100:.0f}% of srvCPU"


def ceiling(one_worker: dict[str, Any] | None) -> str | None:
    """The best 2-worker/1-worker ratio this host allows, from the 1-worker row's CPU figures.

    With ``s`` server and ``c`` load-generator CPU seconds per message on ``P`` cores, one
    worker cannot pass ``1/s`` msgs/s and two cannot pass ``2/s``; and server plus client
    together cannot pass ``P/(s+c)``. On 2 cores the bound is ``2s/(s+c)``: below 1.6 as soon
    as the client costs more than a quarter of the server.
    """
    if not one_worker or "error" in one_worker or not one_worker.get("messages"):
        return None
    s = one_worker["server_cpu"] / one_worker["messages"]
    c = (one_worker.get("client_cpu") or 0.0) / one_worker["messages"]
    if s <= 0:
        return None
    cores = os.cpu_count() or 1
    bound = min(2 / s, cores / (s + c)) / min(1 / s, cores / (s + c))
    return (
        f"ceiling on this host {bound:.2f}x: {cores} cores shared with the load generator; "
        f"1 worker {s * 1e6:.0f} us CPU/msg, client {c * 1e6:.0f} us/msg"
    )


def efficiency(by_server: dict[str, dict[str, Any]], bus: str) -> str:
    """Server CPU per message with 2 workers against 1: what contention distorts least.

    A machine shared with other work changes how much CPU each process gets, so msgs/s
    ratios swing from run to run; CPU per message moves much less. With 2 workers costing
    ``k`` times the CPU per message of 1, two free cores give ``2 / k`` times the msgs/s.
    """
    one, two = by_server[f"twistd-w1-{bus}"], by_server[f"twistd-w2-{bus}"]
    s1 = one["server_cpu"] / one["messages"]
    s2 = two["server_cpu"] / two["messages"]
    k = s2 / s1
    return (
        f"CPU per message, 2 workers / 1: {k:.2f}x ({s2 * 1e6:.0f} / {s1 * 1e6:.0f} us); "
        f"if CPU sets the pace, 2 free cores give {2 / k:.2f}x the msgs/s"
    )
