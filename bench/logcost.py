"""The log's cost in ``twistd slimta`` (issues 18 and 13): logging off, text and JSON, one run.

    .venv/bin/python bench/logcost.py                      # throughput, 5 interleaved rounds
    .venv/bin/python bench/logcost.py --callgrind          # and instructions per message
    .venv/bin/python bench/logcost.py --rounds 0 --callgrind  # instructions only

Servers (``bench/twistd_server.py``): ``twistd -n slimta`` with the discard bus and

- ``off``: ``--log-level critical`` (nothing is written after start-up: the reference);
- ``text``: the default log (text, ``info``, to a ``-l`` file);
- ``json``: ``--log-format json``.

Throughput: 50 lockstep sessions (Postfix's ``smtp-source``), connections reused (``50x2k``)
and one message per connection (``50x2k-1``); the three servers run in rotated order in every
round, each on a fresh process; the figures are the **medians** of the rounds, and the log's
cost is ``(off - on) / off`` of those medians (target: under 10%), with the server's CPU
seconds per message (``/proc``) beside it: on a shared machine the steadier of the two.

Instructions (``--callgrind``): each server runs under ``valgrind --tool=callgrind`` with
instrumentation off; after a warm-up (``--warmup`` messages) it is switched on with
``callgrind_control -i on``, ``--messages`` messages are sent, and the counters are dumped. The
figure is the server process's user-space instructions divided by the messages (the kernel's
work is not in it): steady on a machine shared with other work, where msgs/s is not.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import twistd_server

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMTP_SOURCE = "/usr/sbin/smtp-source"
KINDS = {"off": "twistd-nolog", "text": "twistd-discard", "json": "twistd-json"}
MODES = {"50x2k": False, "50x2k-1": True}  # key -> one message per connection
BUDGET = 0.10
PAYLOAD = 2048 - 160  # smtp-source's headers are about 160 bytes (as bench/run.py)


def smtp_source(port: int, messages: int, once: bool, sessions: int, limit: float) -> float:
    """Send ``messages`` with ``sessions`` lockstep sessions; the seconds it took."""
    command = [
        SMTP_SOURCE,
        *([] if once else ["-d"]),
        f"-s{sessions}",
        f"-m{messages}",
        f"-l{PAYLOAD}",
        "-Mclient.example",
        "-fbench@client.example",
        "-tsink@server.example",
        f"127.0.0.1:{port}",
    ]
    started = time.perf_counter()
    subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=limit
    )
    return time.perf_counter() - started


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    kind: str, once: bool, messages: int, sessions: int, scratch: str
) -> dict[str, Any]:
    """One fresh server, a warm-up, one measured run."""
    errlog = os.path.join(scratch, f"{kind}.err")
    proc, port, logfile = twistd_server.start(kind, scratch, errlog)
    try:
        smtp_source(port, 200, once, sessions, 60)
        cpu = cpu_seconds(proc.pid)
        seconds = smtp_source(port, messages, once, sessions, 120)
        cpu = cpu_seconds(proc.pid) - cpu
    finally:
        stop(proc)
    written = twistd_server.log_bytes(logfile)
    for path in glob.glob(logfile + "*"):
        os.remove(path)
    return {
        "msgs_per_s": messages / seconds,
        "cpu_us_per_msg": cpu / messages * 1e6,
        "log_bytes": written,
    }


def instructions(kind: str, once: bool, messages: int, warmup: int, scratch: str) -> float:
    """User-space instructions per message of the ``twistd slimta`` process (callgrind)."""
    out = os.path.join(scratch, f"callgrind-{kind}-{int(once)}.out")
    port = twistd_server.free_port()
    logfile = os.path.join(scratch, f"cg-{kind}-{port}.log")
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *twistd_server.command(kind, port, logfile, None),
    ]
    with open(os.path.join(scratch, f"cg-{kind}.err"), "w") as err:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=err, stderr=err, text=True, cwd=scratch
        )
    try:
        deadline = time.monotonic() + 300
        while True:  # greeting: smtp-source of one message, as a probe
            try:
                smtp_source(port, 1, True, 1, 60)
                break
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} under valgrind did not start") from None
                time.sleep(1)  # the bounded start-up poll's interval
        smtp_source(port, warmup, once, 50, 600)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        smtp_source(port, messages, once, 50, 1200)
        subprocess.run(
            ["callgrind_control", "-d", str(proc.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        stop(proc)
    total = 0
    for path in glob.glob(out + "*"):
        with open(path) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = max(total, int(line.split()[1]))
        os.remove(path)
    for path in glob.glob(logfile + "*"):
        os.remove(path)
    return total / messages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (0: none)")
    parser.add_argument("--messages", type=int, default=10000, help="per throughput run")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--modes", default=",".join(MODES), help="50x2k,50x2k-1")
    parser.add_argument("--callgrind", action="store_true", help="also instructions/message")
    parser.add_argument("--cg-messages", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300, help="callgrind warm-up messages")
    args = parser.parse_args()
    if not os.access(SMTP_SOURCE, os.X_OK):
        parser.error(f"{SMTP_SOURCE} not found (Postfix's test tools)")
    if args.callgrind and not shutil.which("valgrind"):
        parser.error("--callgrind needs valgrind")
    modes = [m for m in args.modes.split(",") if m]
    # The servers run in a scratch directory: without this they would import the installed
    # slimta_tx (an editable install points at one tree), not this one.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p
    )
    print(
        f"log cost: twistd slimta, discard bus, {args.sessions} sessions, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, tree {ROOT}",
        flush=True,
    )
    names = list(KINDS)
    with tempfile.TemporaryDirectory(prefix="slimta-logcost-") as scratch:
        for mode in modes:
            once = MODES[mode]
            if args.rounds:
                runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
                for round_ in range(args.rounds):
                    shift = round_ % len(names)
                    for name in names[shift:] + names[:shift]:
                        r = throughput(KINDS[name], once, args.messages, args.sessions, scratch)
                        runs[name].append(r)
                        print(
                            f"  {mode} round {round_ + 1} {name:<5} "
                            f"{r['msgs_per_s']:8,.0f} msgs/s "
                            f"{r['cpu_us_per_msg']:6.0f} us/msg  log {r['log_bytes']:,} B",
                            flush=True,
                        )
                med = {n: statistics.median(r["msgs_per_s"] for r in runs[n]) for n in names}
                cpu = {n: statistics.median(r["cpu_us_per_msg"] for r in runs[n]) for n in names}
                print(f"{mode}: medians of {args.rounds} rounds (msgs/s, server CPU us/msg)")
                for n in names:
                    cost = (med["off"] - med[n]) / med["off"]
                    extra = (cpu[n] - cpu["off"]) / cpu["off"]
                    verdict = (
                        ""
                        if n == "off"
                        else f"  msgs/s {-cost * 100:+.1f}% vs off "
                        f"({'met' if cost < BUDGET else 'NOT met'}), CPU/msg {extra * 100:+.1f}%"
                    )
                    print(f"  {n:<5} {med[n]:8,.0f} msgs/s {cpu[n]:6.0f} us/msg{verdict}")
                print(
                    "  load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
                    flush=True,
                )
            if args.callgrind:
                counts = {
                    n: instructions(KINDS[n], once, args.cg_messages, args.warmup, scratch)
                    for n in names
                }
                print(f"{mode}: instructions per message (callgrind, {args.cg_messages} msgs)")
                for n in names:
                    extra = (counts[n] - counts["off"]) / counts["off"]
                    print(
                        f"  {n:<5} {counts[n] / 1000:8,.1f}k"
                        + ("" if n == "off" else f"  {extra * 100:+.1f}% vs off"),
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
