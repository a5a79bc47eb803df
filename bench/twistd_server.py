"""``twistd slimta`` as a user runs it, for ``bench/run.py`` (the product, not the library).

Each kind is one ``twistd -n slimta`` command line: the default reactor, the default log
(text, ``--log-level info``) written to a file with ``-l`` (what a daemonized twistd does too),
and only the options a benchmark needs (listener, bus, message size limit):

=================  =======================================================================
twistd-discard     ``--bus slimta_tx.bus.simple:DiscardBus``: the protocol and the log
twistd-maildir     ``--maildir DIR``: the durable default bus (fsync before each 250)
twistd-json        as twistd-discard, ``--log-format json``
twistd-nolog       as twistd-discard, ``--log-level critical``: logging off (nothing written
                   after start-up), the reference for the log's cost
twistd-metrics     as twistd-discard, ``--metrics tcp:0:interface=127.0.0.1``: every event
                   also counted (issue 13); twistd-discard is its reference
=================  =======================================================================

The port is a free one found just before (twistd binds it; a clash fails the run). Ready means
a connection got a 220.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import time

KINDS = {
    "twistd-discard": "twistd slimta discard",
    "twistd-maildir": "twistd slimta maildir",
    "twistd-json": "twistd slimta json log",
    "twistd-nolog": "twistd slimta log off",
    "twistd-metrics": "twistd slimta metrics",
}
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MAX_MESSAGE_SIZE = 256 * 1024 * 1024


class StartFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(
    kind: str,
    port: int,
    logfile: str,
    maildir: str | None,
    profile: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The twistd command line of ``kind`` (see the module docstring)."""
    twistd = [TWISTD, "-n", "--pidfile=", "-l", logfile]
    if profile:
        twistd += ["--profile", profile, "--profiler", "cprofile", "--savestats"]
    slimta = [
        "slimta",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--max-size",
        str(MAX_MESSAGE_SIZE),
    ]
    if kind == "twistd-maildir":
        if not maildir:
            raise StartFailed("twistd-maildir needs a Maildir directory")
        slimta += ["--maildir", maildir]
    else:
        slimta += ["--bus", "slimta_tx.bus.simple:DiscardBus"]
    if kind == "twistd-json":
        slimta += ["--log-format", "json"]
    elif kind == "twistd-nolog":
        slimta += ["--log-level", "critical"]
    elif kind == "twistd-metrics":
        slimta += ["--metrics", "tcp:0:interface=127.0.0.1"]
    return twistd + slimta + list(extra)


def start(
    kind: str,
    scratch: str,
    errlog: str,
    maildir: str | None = None,
    profile: str | None = None,
    timeout: float = 30.0,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[str], int, str]:
    """Start ``kind``; returns the process, its port and its log file once it greets."""
    port = free_port()
    logfile = os.path.join(scratch, f"{kind}-{port}.log")
    with open(errlog, "w") as err:
        proc = subprocess.Popen(
            command(kind, port, logfile, maildir, profile, extra),
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            text=True,
            cwd=scratch,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return proc, port, logfile
        except OSError:
            pass
        if proc.poll() is not None:
            raise StartFailed(f"twistd exited with {proc.returncode} before greeting")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise StartFailed(f"twistd did not greet on port {port} within {timeout:g}s")
        time.sleep(0.05)  # the bounded start-up poll's interval


def log_bytes(logfile: str) -> int:
    """What the run wrote to its log, rotated files included."""
    return sum(os.path.getsize(p) for p in glob.glob(logfile + "*"))
