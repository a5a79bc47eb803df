"""STARTTLS throughput with the epoll load generator: ``twistd slimta`` vs twisted.mail.

``bench/tls.py``'s client is asyncio in one process; at 10 connections it spent about as much
CPU as the servers it measured, so it, not the server, could set the pace. This drives the same
servers with ``bench/load.py --starttls`` (one epoll loop, ``ssl`` sockets, the certificate
verified against a trustme CA), which reports its own CPU::

    .venv/bin/python bench/tls_load.py                  # 3 interleaved rounds
    .venv/bin/python bench/tls_load.py --connections 50 --messages 10000 --rounds 5

Each round starts each server afresh (``twistd slimta --tls-cert/--tls-key`` with the discard
bus and the default log to a file; slimta_tx in-process; twisted.mail's ESMTP with its
``contextFactory``, both from ``bench/tls.py --serve``), warms it up, then runs one load: every
connection does EHLO, STARTTLS, EHLO and messages of ``--size`` bytes until ``--messages`` are
sent (``--per-connection 1``: one message per TLS connection). Figures: msgs/s, the server's CPU
per message (``/proc``), the client's CPU (cliCPU near 100 % means the client set the pace), the
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

HERE = Path(__file__).resolve().parent
KINDS = ("twistd-slimta", "slimta_tx", "twisted.mail")


def start(kind: str, scratch: str, cert: str, key: str) -> tuple[subprocess.Popen[str], int]:
    if kind == "twistd-slimta":
        proc, port, _ = twistd_server.start(
            "twistd-discard",
            scratch,
            os.path.join(scratch, "twistd.stderr"),
            extra=("--tls-cert", cert, "--tls-key", key, "--hostname", "localhost"),
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
    kind: str, args: argparse.Namespace, scratch: str, certs: tuple[str, str, str]
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
        cpu0 = proc_cpu(proc.pid)
        out = subprocess.run(
            [
                *load,
                f"--connections={args.connections}",
                f"--messages={args.messages}",
                f"--per-connection={args.per_connection}",
            ],
            capture_output=True,
            text=True,
            timeout=args.time_limit + 60,
        )
        server_cpu = proc_cpu(proc.pid) - cpu0
        if out.returncode != 0:
            raise SystemExit(f"{kind}: load failed: {out.stderr.strip()[-300:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        stop(proc)
    result["server"] = kind
    result["server_cpu"] = server_cpu
    result["server_cpu_per_msg"] = server_cpu / result["messages"] if result["messages"] else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=",".join(KINDS))
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--per-connection", type=int, default=0)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from tls import make_certificates

    kinds = [k for k in args.servers.split(",") if k]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    print(
        f"STARTTLS, {args.connections} connections x {args.size} B, "
        f"{'one message per connection' if args.per_connection == 1 else 'connections reused'}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tls-load-") as scratch:
        certs = make_certificates(Path(scratch))
        for round_ in range(args.rounds):
            shift = round_ % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                r = one_run(kind, args, scratch, certs)
                runs[kind].append(r)
                cli = r["client_cpu"] / r["elapsed"] * 100 if r["elapsed"] else 0
                srv = r["server_cpu"] / r["elapsed"] * 100 if r["elapsed"] else 0
                print(
                    f"  round {round_ + 1} {kind:14} {r['msgs_per_s']:8.0f} msgs/s  "
                    f"server {srv:4.0f}% {r['server_cpu_per_msg'] * 1e6:5.0f} us/msg  "
                    f"client {cli:4.0f}% {r['client_cpu_per_msg'] * 1e6:5.0f} us/msg  "
                    f"errors {r['error_count']}  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    medians = {k: statistics.median(r["msgs_per_s"] for r in runs[k]) for k in kinds}
    for kind in kinds:
        cpu = statistics.median(r["server_cpu_per_msg"] for r in runs[kind])
        line = f"{kind:14} median {medians[kind]:8.0f} msgs/s  {cpu * 1e6:5.0f} us CPU/msg"
        if "twisted.mail" in medians and kind != "twisted.mail":
            line += f"  {medians[kind] / medians['twisted.mail']:.2f}x twisted.mail"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "medians": medians}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
