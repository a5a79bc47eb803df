"""What a milter costs: msgs/s at N connections through ``twistd slimta``, with and without.

Usage::

    python bench/milter.py                      # none, a no-op milter, Rspamd (discard bus)
    python bench/milter.py --cases none,noop --messages 5000 --rounds 3
    python bench/milter.py --postfix            # also Postfix with the same Rspamd (root)
    python bench/milter.py --cases none,noop --compare-tree /tmp/before   # A/B in one run

Cases, all in one run on 127.0.0.1 with free ports, each a fresh ``twistd -n slimta`` (discard
bus: ``--bus slimta_tx.bus.simple:DiscardBus``, so the milter is what is measured; with
``--slimta-bus maildir`` the fsynced Maildir instead, to compare with Postfix's fsynced queue):

- ``none``: no milter;
- ``noop``: one milter that wants every event and answers ``continue`` to each (a small
  Twisted process of its own; the worst case of a milter that does nothing);
- ``rspamd``: Rspamd's proxy in milter mode, self-scanning, configured as in the tests
  (tests/support/milters.py: no network, only the milter_headers module);
- with ``--postfix``: a private Postfix (tests/support/postfix.py; queue files fsynced, then the
  ``discard`` transport) with no milter and with the same Rspamd as ``smtpd_milters``.

With ``--compare-tree DIR`` (a checkout or ``git archive`` of another version, e.g. before a
change) every slimta case also runs with that tree's ``slimta_tx`` (same venv, labelled
``@base``), interleaved with the others: before and after in the same run.

The load is bench/load.py (``--connections`` clients, ``--size`` bytes, lockstep), bounded by
``--messages`` and ``--time-limit``. Server CPU per message comes from /proc (utime+stime of the
server process; the milter's own CPU is shown apart). Rounds interleave the cases. Prints a
table and one JSON line per run; the load average is printed with it (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, banner: bool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if not banner or s.recv(256).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answered on 127.0.0.1:{port}")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def children(pid: int) -> list[int]:
    """``pid`` and its descendants (Rspamd and Postfix run several processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                text = Path(f"/proc/{current}/task/{task}/children").read_text()
                todo += [int(c) for c in text.split()]
        except OSError:
            continue
    return found


# -- the no-op milter (runs as: python bench/milter.py --serve-noop PORT) ---------------------


def serve_noop(port: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    reply_to = set(b"CHMRTLNBEU")

    class Noop(Protocol):
        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            out = []
            while len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if len(self.buffer) < 4 + length:
                    break
                command = self.buffer[4]
                self.buffer = self.buffer[4 + length :]
                if command == ord("O"):
                    out.append(struct.pack(">IcIII", 13, b"O", 6, 0, 0))
                elif command == ord("Q"):
                    self.transport.loseConnection()  # type: ignore[union-attr]
                elif command in reply_to:
                    out.append(b"\0\0\0\1c")
            if out:
                self.transport.write(b"".join(out))  # type: ignore[union-attr]

    reactor.listenTCP(port, Factory.forProtocol(Noop), interface="127.0.0.1", backlog=512)
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)


# -- one run ------------------------------------------------------------------------------------


def load(port: int, args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "load.py"),
            f"--port={port}",
            f"--connections={args.connections}",
            f"--size={args.size}",
            f"--messages={args.messages}",
            f"--time-limit={args.time_limit}",
            f"--hard-limit={args.time_limit * 3 + 30}",
        ],
        capture_output=True,
        text=True,
        timeout=args.time_limit * 3 + 60,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"load.py failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_slimta(
    case: str, milter_spec: str | None, milter_pids: list[int], args: Any, tree: str | None = None
) -> dict:
    port = free_port()
    argv = [
        *(TWISTD, "-n", "--pidfile=", "--logfile=/dev/null", "slimta"),
        *("--listen", f"tcp:{port}:interface=127.0.0.1", "--hostname", "edge.bench"),
        *("--trusted-network", "127.0.0.0/8", "--max-size", str(max(args.size * 2, 1 << 20))),
    ]
    scratch = tempfile.TemporaryDirectory(prefix="bench-maildir-")
    if args.slimta_bus == "maildir":
        argv += ["--maildir", scratch.name]
    else:
        argv += ["--bus", "slimta_tx.bus.simple:DiscardBus"]
    if milter_spec:
        argv += ["--milter", f"{milter_spec},max_connections={args.connections * 2}"]
    env = dict(os.environ)
    if tree is not None:  # that tree's slimta_tx (and twistd plugin) first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    server = subprocess.Popen(argv, cwd=tree or ROOT, stdin=subprocess.DEVNULL, env=env)
    try:
        wait_port(port, banner=True)
        return measure(case, port, [server.pid], milter_pids, args)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        scratch.cleanup()


def measure(
    case: str, port: int, server_pids: list[int], milter_pids: list[int], args: Any
) -> dict[str, Any]:
    pids = [p for pid in server_pids for p in children(pid)]
    mpids = [p for pid in milter_pids for p in children(pid)]
    cpu0, mcpu0 = cpu_seconds(pids), cpu_seconds(mpids)
    result = load(port, args)
    cpu1, mcpu1 = cpu_seconds(pids), cpu_seconds(mpids)
    done = result["messages"] or 1
    return {
        "case": case,
        "messages": result["messages"],
        "msgs_per_s": round(result["msgs_per_s"], 1),
        "p50_ms": round((result["p50"] or 0) * 1000, 2),
        "p99_ms": round((result["p99"] or 0) * 1000, 2),
        "server_cpu_us_per_msg": round((cpu1 - cpu0) / done * 1e6),
        "milter_cpu_us_per_msg": round((mcpu1 - mcpu0) / done * 1e6) if mpids else None,
        "errors": result["error_count"],
        "first_errors": result["errors"][:3],
        "load": os.getloadavg()[0],
    }


def run_postfix(case: str, milter_spec: str | None, milter_pids: list[int], args: Any) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.support.postfix import Postfix

    postfix = Postfix()
    extra = (
        "relay_domains = server.example\n"
        "transport_maps = inline:{ server.example=discard: }\n"
        "smtpd_client_connection_count_limit = 0\n"
        "default_process_limit = 200\n"
    )
    if milter_spec:
        extra += f"smtpd_milters = {milter_spec}\nmilter_default_action = tempfail\n"
    with (postfix.conf / "main.cf").open("a") as out:
        out.write(extra)
    postfix.start()
    try:
        pid = int((postfix.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        return measure(case, postfix.port, [pid], milter_pids, args)
    finally:
        postfix.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", default="none,noop,rspamd")
    parser.add_argument("--postfix", action="store_true", help="also Postfix (needs root)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--slimta-bus",
        choices=("discard", "maildir"),
        default="discard",
        help="maildir: fsynced, as Postfix's queue (compare with --postfix)",
    )
    parser.add_argument(
        "--compare-tree",
        help="also run each slimta case with this source tree's slimta_tx (labelled @base)",
    )
    parser.add_argument("--serve-noop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return
    cases = args.cases.split(",")
    results = []
    with ExitStack() as stack:
        milters: dict[str, tuple[str, list[int]]] = {}
        if "noop" in cases:
            noop_port = free_port()
            noop = subprocess.Popen([sys.executable, __file__, "--serve-noop", str(noop_port)])
            stack.callback(lambda: (noop.terminate(), noop.wait(10)))
            wait_port(noop_port, banner=False)
            milters["noop"] = (f"inet:127.0.0.1:{noop_port}", [noop.pid])
        if "rspamd" in cases or args.postfix:
            sys.path.insert(0, str(ROOT))
            from tests.support.milters import rspamd

            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rspamd-")))
            spam = stack.enter_context(rspamd(root))
            milters["rspamd"] = (spam.spec, [spam.proc.pid])
        for round_ in range(args.rounds):
            plan = [("slimta", c) for c in cases]
            if args.compare_tree:
                plan = [p for c in cases for p in (("slimta", c), ("slimta@base", c))]
            if args.postfix:
                plan += [("postfix", "none"), ("postfix", "rspamd")]
            shift = round_ % len(plan)
            for server, case in plan[shift:] + plan[:shift]:
                spec, pids = milters.get(case, (None, []))
                label = f"{server.split('@')[0]}+{case}" + ("@base" if "@" in server else "")
                if server == "postfix":
                    result = run_postfix(label, spec, pids, args)
                else:
                    tree = args.compare_tree if "@" in server else None
                    result = run_slimta(label, spec, pids, args, tree)
                result["round"] = round_
                results.append(result)
                print(json.dumps(result), flush=True)
    print()
    print(
        f"{args.connections} connections x {args.size} B, lockstep, slimta bus: {args.slimta_bus}"
    )
    print(
        f"{'case':<20}{'msgs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'srv us/msg':>12}"
        f"{'milter us/msg':>15}{'load':>6}"
    )
    for r in results:
        milter_cpu = "-" if r["milter_cpu_us_per_msg"] is None else r["milter_cpu_us_per_msg"]
        print(
            f"{r['case']:<20}{r['msgs_per_s']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}"
            f"{r['server_cpu_us_per_msg']:>12}{milter_cpu:>15}{r['load']:>6.2f}"
        )


if __name__ == "__main__":
    main()
