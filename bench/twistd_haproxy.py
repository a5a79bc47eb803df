"""The HAProxy hop on the product as users run it, as a ``bench/run.py`` row.

The ``twistd-haproxy`` server is the ``twistd-w1-discard`` command of ``bench/workers.py``
(``twistd -n slimta --workers 1``, discarding bus, a log line per message to a file) with one
change: it listens on ``haproxy:tcp:0``, and HAProxy runs in front of it
(``bench/haproxy_front.py``: ``send-proxy-v2``, ``option smtpchk`` every 2 s, one thread). It runs
in the scenarios of the workers rows, so a table holds both paths of the same product, measured
in the same run: ``twistd w1 discard`` (direct) and ``twistd w1 +HAProxy``. HAProxy is a child of
the bench, not of the server: its CPU is measured apart (the row's notes) and is not in the
server's. ``bench/haproxy_hop.py`` is the longer A/B of the same two paths against one process.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from typing import Any

import haproxy_front
import workers

SERVERS: dict[str, str] = {"twistd-haproxy": "twistd w1 +HAProxy"}
DIRECT = "twistd-w1-discard"
_PORT = re.compile(rb"SmtpEdge \(PROXY\) starting on (\d+)")


def applies(kind: str, scenario: str) -> bool:
    return kind not in SERVERS or scenario in workers.SCENARIOS


def command() -> list[str]:
    """The direct row's command, on a PROXY listener."""
    argv = workers.command(DIRECT, None)
    argv[argv.index("tcp:0:interface=127.0.0.1")] = "haproxy:tcp:0:interface=127.0.0.1"
    return argv


def start(
    scratch: str, log_path: str, timeout: float = 30.0
) -> tuple[subprocess.Popen[str], int, subprocess.Popen[bytes]]:
    """Start twistd, then HAProxy in front of it (bounded waits); the server, the port to load
    (HAProxy's) and HAProxy's process. On failure, whatever started is stopped."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True
        )
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            match = _PORT.search(f.read())
        if match:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"twistd did not start; see {log_path}")
        time.sleep(0.05)  # poll interval of a bounded wait for another process
    try:
        front, port = haproxy_front.start(int(match.group(1)), tempfile.mkdtemp(dir=scratch))
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise
    return proc, port, front


def hop_lines(by_server: dict[str, dict[str, Any]]) -> list[str]:
    """The hop's cost on twistd slimta: msgs/s through HAProxy over direct, and CPU per
    message of the server on each path and of HAProxy."""
    proxied, direct = by_server.get("twistd-haproxy"), by_server.get(DIRECT)
    runs = (proxied, direct)
    if any(r is None or "error" in r or r["error_count"] or not r["messages"] for r in runs):
        return []
    assert proxied is not None and direct is not None
    ratio = proxied["msgs_per_s"] / direct["msgs_per_s"]
    server = [r["server_cpu"] / r["messages"] * 1e6 for r in runs]
    helper = proxied.get("helper_cpu", 0.0) / proxied["messages"] * 1e6
    return [
        f"  HAProxy hop, twistd slimta: {ratio:.2f}x the direct msgs/s; server CPU/msg "
        f"{server[0]:.0f}us behind it vs {server[1]:.0f}us direct, HAProxy {helper:.0f}us/msg"
    ]


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
