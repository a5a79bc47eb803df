"""The HAProxy hop on the product as users run it: one ``twistd slimta`` process, reached
directly and through HAProxy (``send-proxy-v2``) in alternation.

Usage::

    .venv/bin/python bench/haproxy_hop.py                        # 50x2k lockstep, 3 rounds
    .venv/bin/python bench/haproxy_hop.py --pipelining --rounds 5

``twistd -n slimta`` listens on ``tcp:0`` and on ``haproxy:tcp:0`` with the discarding bus
(``--bus slimta_tx.bus.simple:DiscardBus``; its log, the transaction line per message included,
goes to a file as in production). HAProxy (``bench/haproxy_front.py``: one thread, smtpchk every
2 s) forwards to the second. Each round runs ``bench/load.py`` once against each path, in
alternating order, against the same server process. Per run: msgs/s, the server's CPU per
message (user + system from ``/proc``), HAProxy's CPU per message. The summary is the ratio of
the medians. Bounded by the message count and load.py's time limits; everything started is
stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import haproxy_front
from run import proc_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
_PORTS = re.compile(r"SmtpEdge( \(PROXY\))? starting on (\d+)")


def start_twistd(scratch: str) -> tuple[subprocess.Popen[bytes], int, int]:
    log = os.path.join(scratch, "twistd.log")
    proc = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile",
            log,
            "slimta",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--listen",
            "haproxy:tcp:0:interface=127.0.0.1",
            "--bus",
            "slimta_tx.bus.simple:DiscardBus",
            "--hostname",
            "bench.test",
            "--max-recipients",
            "1000",
        ],
        stdin=subprocess.DEVNULL,
        cwd=scratch,
    )
    deadline = time.monotonic() + 30
    ports: dict[bool, int] = {}
    while len(ports) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"twistd did not start; see {log}")
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        for proxied, port in _PORTS.findall(text):
            ports[bool(proxied)] = int(port)
        time.sleep(0.05)  # polls the log for the listening ports (bounded)
    return proc, ports[False], ports[True]


def run_load(port: int, args: argparse.Namespace, pids: list[int]) -> dict[str, float]:
    load = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "load.py"),
            f"--port={port}",
            f"--connections={args.connections}",
            f"--size={args.size}",
            f"--messages={args.messages}",
            "--time-limit=20",
            "--hard-limit=60",
            "--warmup=20",
            *(["--pipelining"] if args.pipelining else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert load.stdin is not None and load.stdout is not None
    if load.stdout.readline().strip() != "warm":
        raise SystemExit("load.py did not warm up")
    before = [proc_cpu(pid) for pid in pids]
    out, _ = load.communicate("go\n", timeout=90)
    after = [proc_cpu(pid) for pid in pids]
    figures = json.loads(out.strip().splitlines()[-1])
    messages = figures["messages"]
    if figures["error_count"] or not messages:
        raise SystemExit(f"load errors: {figures['errors'][:3]}")
    cpu = [(b - a) / messages * 1e6 for a, b in zip(before, after, strict=True)]
    return {"msgs_per_s": figures["msgs_per_s"], "server_us": cpu[0], "haproxy_us": sum(cpu[1:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipelining", action="store_true")
    args = parser.parse_args()
    if haproxy_front.binary() is None:
        raise SystemExit("haproxy is not installed (.ci/services installs it)")
    print(
        f"HAProxy hop, twistd slimta (discard bus): {args.connections} connections x "
        f"{args.size} B, {'pipelined' if args.pipelining else 'lockstep'}, {args.messages} msgs, "
        f"{args.rounds} rounds; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    results: dict[str, list[dict[str, float]]] = {"direct": [], "haproxy": []}
    with tempfile.TemporaryDirectory(prefix="slimta-hop-") as scratch:
        twistd, direct_port, proxied_port = start_twistd(scratch)
        front = None
        try:
            front, front_port = haproxy_front.start(proxied_port, scratch)
            paths = {
                "direct": (direct_port, [twistd.pid]),
                "haproxy": (front_port, [twistd.pid, front.pid]),
            }
            for round_ in range(args.rounds):
                order = ["direct", "haproxy"] if round_ % 2 == 0 else ["haproxy", "direct"]
                for name in order:
                    port, pids = paths[name]
                    figures = run_load(port, args, pids)
                    results[name].append(figures)
                    print(
                        f"  round {round_ + 1} {name:<8} {figures['msgs_per_s']:>9.0f} msgs/s  "
                        f"server {figures['server_us']:>5.0f} us/msg  "
                        f"haproxy {figures['haproxy_us']:>5.0f} us/msg",
                        flush=True,
                    )
        finally:
            for proc in (front, twistd):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(15)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    ratio = median("haproxy", "msgs_per_s") / median("direct", "msgs_per_s")
    print(
        f"median: direct {median('direct', 'msgs_per_s'):.0f} msgs/s, server "
        f"{median('direct', 'server_us'):.0f} us/msg; through HAProxy "
        f"{median('haproxy', 'msgs_per_s'):.0f} msgs/s ({ratio:.2f}x), server "
        f"{median('haproxy', 'server_us'):.0f} us/msg, HAProxy "
        f"{median('haproxy', 'haproxy_us'):.0f} us/msg; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
