"""STARTTLS throughput with the epoll load generator: ``twistd slimta`` vs twisted.mail.

``bench/tls.py``'s client is asyncio in one process; at 10 connections it spent about as much
CPU as the servers it measured, so it, not the server, could set the pace. This drives the same
servers with ``bench/load.py --starttls`` (one epoll loop, ``ssl`` sockets, the certificate
verified against a trustme CA), which reports its own CPU::

    .venv/bin/python bench/tls_load.py                  # both scenarios, 3 interleaved rounds
    .venv/bin/python bench/tls_load.py --scenarios reused --rounds 5 --messages 10000

Servers (``--servers``): ``twistd-slimta`` (``twistd slimta --tls-cert/--tls-key`` with the
discard bus and the default log to a file: the product, with its default TLS layer, Python's
``ssl``), ``twistd-pyopenssl`` (the same with ``--tls-layer twisted``: Twisted's pyOpenSSL
layer, the layer's own gain in the same run), ``slimta_tx`` in-process and twisted.mail's ESMTP
with its ``contextFactory`` (both from ``bench/tls.py --serve``).

Scenarios (``--scenarios``):

``reused``  10 connections at once, each EHLO, STARTTLS, EHLO, then ``--per-session`` (50)
            messages of ``--size`` bytes and QUIT, and a new connection in its place, until
            ``--messages`` are sent: issue 18's "10 connections x 50 messages after STARTTLS".
``churn``   the same with one message per TLS connection (connect, STARTTLS, one message,
            QUIT): connections/s, where the handshake is most of the cost.

Each round starts each server afresh, warms it up, then runs one load; the order rotates each
round. Figures: msgs/s (and connections/s), the server's CPU per message (``/proc``), the
client's CPU in % of one core (well under 100 % means the client did not set the pace), the
median over rounds, and the ratio of medians against twisted.mail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import twistd_server
from run import proc_cpu


def proc_sys(pid: int) -> float:
    """System (kernel) CPU seconds of ``pid``: the sockets' share of its CPU."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


HERE = Path(__file__).resolve().parent
KINDS = ("twistd-slimta", "twistd-pyopenssl", "slimta_tx", "twisted.mail")
SCENARIOS = ("reused", "churn")


def start(kind: str, scratch: str, cert: str, key: str) -> tuple[subprocess.Popen[str], int]:
    if kind in ("twistd-slimta", "twistd-pyopenssl"):
        layer = "stdlib" if kind == "twistd-slimta" else "twisted"
        proc, port, _ = twistd_server.start(
            "twistd-discard",
            scratch,
            os.path.join(scratch, "twistd.stderr"),
            extra=(
                *("--tls-cert", cert, "--tls-key", key, "--hostname", "localhost"),
                *("--tls-layer", layer),
            ),
        )
        return proc, port
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "tls.py"), "--serve", kind, "--cert", cert, "--key", key],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"{kind} did not start: {line!r}")
    return proc, int(line.split()[1])


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_run(
    kind: str, scenario: str, args: argparse.Namespace, scratch: str, certs: tuple[str, str, str]
) -> dict[str, Any]:
    cert, key, ca = certs
    proc, port = start(kind, scratch, cert, key)
    try:
        load = [
            sys.executable,
            str(HERE / "load.py"),
            f"--port={port}",
            f"--starttls={ca}",
            f"--size={args.size}",
            f"--time-limit={args.time_limit}",
            f"--hard-limit={args.time_limit + 30}",
        ]
        warm = subprocess.run(
            [*load, "--connections=2", "--messages=20"], capture_output=True, text=True, timeout=60
        )
        if warm.returncode != 0:
            raise SystemExit(f"{kind}: warm-up failed: {warm.stderr.strip()[-300:]}")
        cpu0, sys0 = proc_cpu(proc.pid), proc_sys(proc.pid)
        churn = scenario == "churn"
        out = subprocess.run(
            [
                *load,
                f"--connections={args.connections}",
                f"--messages={args.churn_messages if churn else args.messages}",
                f"--per-connection={1 if churn else args.per_session}",
            ],
            capture_output=True,
            text=True,
            timeout=args.time_limit + 60,
        )
        server_cpu = proc_cpu(proc.pid) - cpu0
        server_sys = proc_sys(proc.pid) - sys0
        if out.returncode != 0:
            raise SystemExit(f"{kind}: load failed: {out.stderr.strip()[-300:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        stop(proc)
    result["server"] = kind
    result["scenario"] = scenario
    result["server_cpu"] = server_cpu
    result["server_sys"] = server_sys
    result["server_cpu_per_msg"] = server_cpu / result["messages"] if result["messages"] else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="twistd-slimta,twistd-pyopenssl,twisted.mail")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--messages", type=int, default=5000, help="reused: messages in all")
    parser.add_argument("--per-session", type=int, default=50, help="reused: per connection")
    parser.add_argument("--churn-messages", type=int, default=1000, help="churn: connections")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from tls import make_certificates

    kinds = [k for k in args.servers.split(",") if k]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown server {kind!r}; choose from {', '.join(KINDS)}")
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            parser.error(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {k: [] for k in kinds} for s in scenarios
    }
    print(
        f"STARTTLS, {args.connections} connections x {args.size} B, "
        f"load average {os.getloadavg()[0]:.2f} (2-core machine shared with other work)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tls-load-") as scratch:
        certs = make_certificates(Path(scratch))
        for round_ in range(args.rounds):
            shift = round_ % len(kinds)
            for scenario in scenarios:
                for kind in kinds[shift:] + kinds[:shift]:
                    r = one_run(kind, scenario, args, scratch, certs)
                    runs[scenario][kind].append(r)
                    cli = r["client_cpu"] / r["elapsed"] * 100 if r["elapsed"] else 0
                    srv = r["server_cpu"] / r["elapsed"] * 100 if r["elapsed"] else 0
                    print(
                        f"  round {round_ + 1} {scenario:6} {kind:16} {r['msgs_per_s']:7.0f} "
                        f"msgs/s  server {srv:4.0f}% {r['server_cpu_per_msg'] * 1e6:5.0f} "
                        f"us/msg (sys {r['server_sys'] / max(r['server_cpu'], 1e-9):3.0%})  "
                        f"client {cli:4.0f}% {r['client_cpu_per_msg'] * 1e6:5.0f} "
                        f"us/msg  errors {r['error_count']}  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
    summary: dict[str, Any] = {}
    for scenario in scenarios:
        by = runs[scenario]
        medians = {k: statistics.median(r["msgs_per_s"] for r in by[k]) for k in kinds}
        unit = "conns/s" if scenario == "churn" else "msgs/s "
        what = (
            "one message per TLS connection"
            if scenario == "churn"
            else f"{args.per_session} messages per TLS connection"
        )
        print(f"\n{scenario}: {what}, medians of {args.rounds} rounds")
        for kind in kinds:
            cpu = statistics.median(r["server_cpu_per_msg"] for r in by[kind])
            client = statistics.median(r["client_cpu"] / r["elapsed"] * 100 for r in by[kind])
            line = (
                f"  {kind:16} {medians[kind]:8.0f} {unit}  server {cpu * 1e6:5.0f} us CPU/msg"
                f"  client {client:3.0f}% CPU"
            )
            if "twisted.mail" in medians and kind != "twisted.mail":
                line += f"  {medians[kind] / medians['twisted.mail']:.2f}x twisted.mail"
            print(line)
        summary[scenario] = medians
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "medians": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
