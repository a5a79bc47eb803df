"""The protocol alone: Python cost per message of slimta_tx and of twisted.mail, no sockets.

Both servers are driven in-process through ``StringTransport`` as a lockstep client would
drive them (MAIL, RCPT, DATA, a 2 KiB body, each a separate ``dataReceived``), on one
connection, with a bus (or delivery) that discards. Kernel and reactor costs are the same for
both servers over real sockets, so this isolates what our own Python costs per message.

    .venv/bin/python bench/proto.py                 # both servers, 3 interleaved rounds
    .venv/bin/python bench/proto.py --only slimta --profile   # cProfile of one run
    .venv/bin/python bench/proto.py --per-connection          # a new session per message
    .venv/bin/python bench/proto.py --phases        # per session: banner, EHLO, message, QUIT
    .venv/bin/python bench/proto.py --metrics --cpu # slimta_tx with and without --metrics' sink

With ``--per-connection`` every message is a whole session: a new protocol and transport,
``makeConnection`` (the banner), EHLO, the message, QUIT, ``connectionLost``; what one message
costs an MX whose clients send one message per connection (the socket calls aside).

Prints microseconds per message (best of the rounds, lower is better) and the ratio of
twisted.mail's cost to ours (the msgs/s ratio a CPU-bound server would show).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAIL = b"MAIL FROM:<bench@client.example>\r\n"
RCPT = b"RCPT TO:<sink@server.example>\r\n"
DATA = b"DATA\r\n"
PEER = IPv4Address("TCP", "127.0.0.1", 5555)


def body(size: int = 2048) -> bytes:
    """About ``size`` octets of 78-character lines, one in 50 dot-stuffed, then the end."""
    lines: list[bytes] = []
    total, n = 0, 0
    while total < size - 200:
        text = (f"..dot line {n} " if n % 50 == 7 else f"line {n} ").ljust(76, "x")
        lines.append(text.encode("ascii") + b"\r\n")
        total += 78
        n += 1
    return b"".join(lines) + b".\r\n"


Driver = tuple[Any, StringTransport]
# With --log text|json: the sink's clock, advanced every 50 messages (a reactor pass).
PASSES: list[Clock] = []
# What a run is timed with: the wall clock, or (--cpu) this process's CPU time.
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def slimta(metrics: bool = False) -> Callable[[], Driver]:
    """Sessions of one edge, its events at ``info`` as under ``twistd slimta``; ``metrics``:
    counted as with ``--metrics`` (slimta_tx.metrics.EdgeMetrics, a registry of its own)."""
    from twisted.logger import LogLevel

    from slimta_tx.bus.simple import DiscardBus
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.policy import Policy

    edge = SmtpEdge(DiscardBus(), Policy(max_message_size=256 << 20), reactor=Clock())
    edge.events.set_level(LogLevel.info)
    if metrics:
        from prometheus_client import CollectorRegistry

        from slimta_tx.metrics import EdgeMetrics

        edge.events.metrics = EdgeMetrics("other", CollectorRegistry())
    return lambda: (edge.buildProtocol(PEER), StringTransport(peerAddress=PEER))


def twisted_mail() -> Callable[[], Driver]:
    from twisted_peer import DiscardESMTPFactory

    factory = DiscardESMTPFactory()
    return lambda: (factory.buildProtocol(PEER), StringTransport(peerAddress=PEER))


SERVERS: dict[str, Callable[[], Callable[[], Driver]]] = {
    "slimta": slimta,
    "slimta-metrics": lambda: slimta(metrics=True),
    "twisted": twisted_mail,
}


def run(build: Callable[[], Driver], messages: int, message: bytes) -> float:
    """Microseconds per message for one fresh session."""
    proto, transport = build()
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO client.example\r\n")
    if b"\r\n250 " not in transport.value():
        raise SystemExit(f"unexpected greeting: {transport.value()!r}")
    transport.clear()
    received = proto.dataReceived
    start = CLOCK[0]()
    for i in range(messages):
        received(MAIL)
        received(RCPT)
        received(DATA)
        received(message)
        transport.clear()
        if PASSES and not i % 50:
            PASSES[0].advance(0)
    elapsed = CLOCK[0]() - start
    # One last message, checked: the bench must measure accepted mail, not refusals.
    for chunk in (MAIL, RCPT, DATA, message):
        received(chunk)
    replies = transport.value().split(b"\r\n")[:-1]
    if len(replies) != 4 or not all(r[:1] in (b"2", b"3") for r in replies):
        raise SystemExit(f"a message was not accepted: {replies!r}")
    return elapsed / messages * 1e6


def run_connections(build: Callable[[], Driver], messages: int, message: bytes) -> float:
    """Microseconds per message when each message is a session of its own."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    done = Failure(ConnectionDone())
    ehlo, quit_ = b"EHLO client.example\r\n", b"QUIT\r\n"
    start = CLOCK[0]()
    for i in range(messages):
        if PASSES and not i % 50:
            PASSES[0].advance(0)
        proto, transport = build()
        proto.makeConnection(transport)
        received = proto.dataReceived
        received(ehlo)
        received(MAIL)
        received(RCPT)
        received(DATA)
        received(message)
        received(quit_)
        proto.connectionLost(done)
    elapsed = CLOCK[0]() - start
    replies = transport.value().split(b"\r\n")[:-1]
    codes = [r[:3] for r in replies if r[3:4] != b"-"]
    if codes != [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]:
        raise SystemExit(f"a session went wrong: {replies!r}")
    return elapsed / messages * 1e6


PHASES = ("build", "connect", "ehlo", "message", "quit", "lost")


def run_phases(build: Callable[[], Driver], messages: int, message: bytes) -> dict[str, float]:
    """As :func:`run_connections`, timing each step of a session on its own: microseconds
    per session for building the protocol, ``makeConnection`` (the banner), EHLO, the
    message, QUIT and ``connectionLost``."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    done = Failure(ConnectionDone())
    ehlo, quit_ = b"EHLO client.example\r\n", b"QUIT\r\n"
    spent = dict.fromkeys(PHASES, 0.0)
    clock = CLOCK[0]
    for i in range(messages):
        if PASSES and not i % 50:
            PASSES[0].advance(0)
        t0 = clock()
        proto, transport = build()
        t1 = clock()
        proto.makeConnection(transport)
        t2 = clock()
        received = proto.dataReceived
        received(ehlo)
        t3 = clock()
        received(MAIL)
        received(RCPT)
        received(DATA)
        received(message)
        t4 = clock()
        received(quit_)
        t5 = clock()
        proto.connectionLost(done)
        t6 = clock()
        for phase, start, end in zip(
            PHASES, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6), strict=True
        ):
            spent[phase] += end - start
        if not i % 50:
            transport.clear()
    return {phase: total / messages * 1e6 for phase, total in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=sorted(SERVERS))
    parser.add_argument("--profile", action="store_true", help="cProfile one run, top 40")
    parser.add_argument(
        "--per-connection", action="store_true", help="one message per session (see above)"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="one message per session, each step of it timed apart (the best of the rounds)",
    )
    parser.add_argument(
        "--log",
        choices=("warn", "text", "json"),
        default="warn",
        help="warn: warnings only (the default); text, json: twistd slimta's default log "
        "(info, slimta_tx.logsink.LogSink) to /dev/null, flushed every 50 messages",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time the runs with this process's CPU time instead of the wall clock (on a "
        "loaded machine the wall clock also counts the time other processes had the CPU)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="compare slimta_tx with and without the metrics sink (issue 13) instead",
    )
    args = parser.parse_args()
    if args.cpu:
        CLOCK[0] = time.process_time
    if args.log == "warn":
        observer: Any = FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
        )
    else:
        from slimta_tx.logsink import LogSink

        clock = Clock()
        clock.running = True  # type: ignore[attr-defined]
        observer = LogSink(open(os.devnull, "w"), LogLevel.info, args.log, clock)
        PASSES.append(clock)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    message = body()
    measure = run_connections if args.per_connection else run
    names = [args.only] if args.only else ["slimta", "twisted"]
    if args.metrics:
        names = ["slimta", "slimta-metrics"]
    if args.phases:
        fastest: dict[str, dict[str, float]] = {}
        for round_ in range(args.rounds):
            for name in names:
                split = run_phases(SERVERS[name](), args.messages, message)
                known = fastest.setdefault(name, split)
                for phase in PHASES:
                    known[phase] = min(known[phase], split[phase])
                print(f"round {round_ + 1} {name:8} {sum(split.values()):7.1f} us/session")
        print(f"{'us/session':10} " + " ".join(f"{phase:>8}" for phase in PHASES) + "    total")
        for name in names:
            row = fastest[name]
            cells = " ".join(f"{row[phase]:8.1f}" for phase in PHASES)
            print(f"{name:10} {cells} {sum(row.values()):8.1f}")
        return
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(measure, SERVERS[names[0]](), args.messages, message)
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        return
    best: dict[str, float] = {}
    for round_ in range(args.rounds):
        for name in names:  # interleaved, so drift in machine load hits both alike
            cost = measure(SERVERS[name](), args.messages, message)
            best[name] = min(cost, best.get(name, cost))
            print(f"round {round_ + 1} {name:8} {cost:7.1f} us/msg", flush=True)
    for name in names:
        print(f"{name:8} best {best[name]:7.1f} us/msg")
    if "twisted" in best and "slimta" in best:
        print(f"ratio twisted/slimta {best['twisted'] / best['slimta']:.2f}x msgs/s")
    if "slimta-metrics" in best:
        extra = best["slimta-metrics"] - best["slimta"]
        print(
            f"metrics sink: +{extra:.1f} us/msg, {extra / best['slimta'] * 100:+.1f}% of the "
            "protocol's cost"
        )


if __name__ == "__main__":
    main()
