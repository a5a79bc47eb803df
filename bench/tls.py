"""STARTTLS benchmark: slimta_tx vs twisted.mail vs aiosmtpd, in one run, on 127.0.0.1 only.

Run it alone::

    python bench/tls.py                      # both scenarios, all three servers
    python bench/tls.py --json out.json      # also write the figures as JSON

Each server runs in its own process (``python bench/tls.py --serve KIND ...``), with the same
trustme certificate, TLS 1.2 minimum and message size limit, and discards what it receives.
The client is asyncio in this process (TCP_NODELAY is asyncio's default), verifying the
server certificate against the trustme CA.

Scenarios:

``session``  10 connections at once, each: EHLO, STARTTLS, EHLO, 50 messages of 2 KiB, QUIT.
             Throughput (messages/s) and per-message latency.
``churn``    one connection at a time: connect, EHLO, STARTTLS, EHLO, one message, QUIT.
             Handshake latency (220 to TLS up, the TLS handshake alone; and STARTTLS written
             to TLS up) and connections/s. Sequential, so queueing does not blur latency;
             every handshake should take well under 10 ms on loopback (a Nagle or delayed-ACK
             stall shows up as ~40 ms).

All servers run at once and the scenarios go round-robin over them for ``--rounds`` rounds
(the order rotates each round), so load from elsewhere on the machine falls on all three alike;
the figures are over all rounds.

Bounded: ``--messages``, ``--connections``, ``--churn`` and ``--rounds`` fix the counts,
``--time-limit`` stops starting new work in a scenario after that many seconds, and every read
has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("slimta_tx", "twisted.mail", "aiosmtpd")
MAX_MESSAGE_SIZE = 32 * 1024 * 1024
READ_TIMEOUT = 10.0


# -- servers (each in its own process) ---------------------------------------------------------


def ready(port: int) -> None:
    print(f"READY {port}", flush=True)


def quiet_twisted() -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def serve_slimta(cert: str, key: str) -> None:
    from twisted.internet import reactor

    from slimta_tx import DiscardBus, Policy, ServerTLS, SmtpEdge

    quiet_twisted()
    edge = SmtpEdge(
        DiscardBus(),
        Policy(hostname="localhost", max_message_size=MAX_MESSAGE_SIZE),
        reactor=reactor,
    )
    edge.enable_tls(ServerTLS(cert, key))
    port = reactor.listenTCP(0, edge, interface="127.0.0.1")  # type: ignore[attr-defined]
    ready(port.getHost().port)
    reactor.run()  # type: ignore[attr-defined]


def serve_twisted_mail(cert: str, key: str) -> None:
    from twisted.internet import defer, reactor
    from twisted.internet.protocol import ServerFactory
    from twisted.mail import smtp
    from zope.interface import implementer

    from slimta_tx import ServerTLS

    quiet_twisted()
    context = ServerTLS(cert, key)

    @implementer(smtp.IMessage)
    class Discard:
        def lineReceived(self, line: bytes) -> None:
            pass

        def eomReceived(self) -> Any:
            return defer.succeed(None)

        def connectionLost(self) -> None:
            pass

    @implementer(smtp.IMessageDelivery)
    class Delivery:
        def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
            return b"Received: from bench by localhost"

        def validateFrom(self, helo: Any, origin: Any) -> Any:
            return origin

        def validateTo(self, user: Any) -> Any:
            return Discard

    class Factory(ServerFactory):
        def buildProtocol(self, addr: Any) -> Any:
            proto = smtp.ESMTP(contextFactory=context)
            proto.delivery = Delivery()
            proto.host = b"localhost"
            proto.factory = self
            return proto

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
    ready(port.getHost().port)
    reactor.run()  # type: ignore[attr-defined]


def serve_aiosmtpd(cert: str, key: str) -> None:
    import logging

    from aiosmtpd.smtp import SMTP

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK discarded"

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def factory() -> Any:
        return SMTP(
            Handler(),
            hostname="localhost",
            data_size_limit=MAX_MESSAGE_SIZE,
            tls_context=context,
            require_starttls=False,
        )

    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    ready(server.sockets[0].getsockname()[1])
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


SERVERS = {
    "slimta_tx": serve_slimta,
    "twisted.mail": serve_twisted_mail,
    "aiosmtpd": serve_aiosmtpd,
}


class ServerProcess:
    def __init__(self, kind: str, cert: str, key: str) -> None:
        self.kind = kind
        here = Path(__file__).resolve()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(here.parent.parent), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(here), "--serve", kind, "--cert", cert, "--key", key],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise SystemExit(f"{kind} server did not start (got {line!r})")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the client ---------------------------------------------------------------------------------


class ProtocolError(Exception):
    pass


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        if not line:
            raise ProtocolError(f"connection closed, expected {code.decode()}")
        if line[:3] != code:
            raise ProtocolError(f"expected {code.decode()}, got {line!r}")
        if line[3:4] == b" ":
            return


def make_body(size: int) -> bytes:
    head = b"From: bench@client.test\r\nTo: sink@server.test\r\nSubject: tls bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = head + line * max(0, (size - len(head)) // len(line))
    return body + b".\r\n"


@dataclass
class Stats:
    messages: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    message_latency: list[float] = field(default_factory=list)
    tls_handshake: list[float] = field(default_factory=list)
    starttls_to_tls: list[float] = field(default_factory=list)
    wall: float = 0.0


async def session(
    port: int, ctx: ssl.SSLContext, messages: int, body: bytes, stats: Stats, deadline: float
) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), READ_TIMEOUT
    )
    try:
        await expect(reader, b"220")
        writer.write(b"EHLO bench.client.test\r\n")
        await expect(reader, b"250")
        started = time.perf_counter()
        writer.write(b"STARTTLS\r\n")
        await expect(reader, b"220")
        ready_at = time.perf_counter()
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname="localhost"), READ_TIMEOUT)
        done = time.perf_counter()
        stats.tls_handshake.append(done - ready_at)
        stats.starttls_to_tls.append(done - started)
        writer.write(b"EHLO bench.client.test\r\n")
        await expect(reader, b"250")
        for _ in range(messages):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            writer.write(b"MAIL FROM:<bench@client.test>\r\n")
            await expect(reader, b"250")
            writer.write(b"RCPT TO:<sink@server.test>\r\n")
            await expect(reader, b"250")
            writer.write(b"DATA\r\n")
            await expect(reader, b"354")
            writer.write(body)
            await expect(reader, b"250")
            stats.message_latency.append(time.perf_counter() - t0)
            stats.messages += 1
        writer.write(b"QUIT\r\n")
        await expect(reader, b"221")
        stats.connections += 1
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), READ_TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            pass


async def run_session_scenario(
    port: int, ctx: ssl.SSLContext, connections: int, messages: int, body: bytes, limit: float
) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + limit
    start = time.perf_counter()
    results = await asyncio.gather(
        *(session(port, ctx, messages, body, stats, deadline) for _ in range(connections)),
        return_exceptions=True,
    )
    stats.wall = time.perf_counter() - start
    stats.errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return stats


async def run_churn_scenario(
    port: int, ctx: ssl.SSLContext, connections: int, body: bytes, limit: float
) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + limit
    start = time.perf_counter()
    for _ in range(connections):
        if time.monotonic() > deadline:
            break
        try:
            await session(port, ctx, 1, body, stats, deadline + READ_TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ProtocolError) as e:
            stats.errors.append(repr(e))
    stats.wall = time.perf_counter() - start
    return stats


# -- reporting -----------------------------------------------------------------------------------


def merge(parts: list[Stats]) -> Stats:
    total = Stats()
    for part in parts:
        total.messages += part.messages
        total.connections += part.connections
        total.errors += part.errors
        total.message_latency += part.message_latency
        total.tls_handshake += part.tls_handshake
        total.starttls_to_tls += part.starttls_to_tls
        total.wall += part.wall
    return total


def ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index] * 1000


def summary(stats: Stats) -> dict[str, Any]:
    return {
        "messages": stats.messages,
        "connections": stats.connections,
        "errors": len(stats.errors),
        "first_error": stats.errors[0] if stats.errors else None,
        "wall_s": round(stats.wall, 3),
        "messages_per_s": round(stats.messages / stats.wall, 1) if stats.wall else 0.0,
        "connections_per_s": round(stats.connections / stats.wall, 1) if stats.wall else 0.0,
        "message_ms_p50": round(ms(stats.message_latency, 0.5), 3),
        "message_ms_p99": round(ms(stats.message_latency, 0.99), 3),
        "tls_handshake_ms_p50": round(ms(stats.tls_handshake, 0.5), 3),
        "tls_handshake_ms_p99": round(ms(stats.tls_handshake, 0.99), 3),
        "tls_handshake_ms_max": round(ms(stats.tls_handshake, 1.0), 3),
        "starttls_to_tls_ms_p50": round(ms(stats.starttls_to_tls, 0.5), 3),
        "starttls_to_tls_ms_max": round(ms(stats.starttls_to_tls, 1.0), 3),
        "handshakes_over_10ms": sum(1 for v in stats.tls_handshake if v > 0.010),
        "mean_handshake_ms": round(statistics.fmean(stats.tls_handshake) * 1000, 3)
        if stats.tls_handshake
        else None,
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def print_report(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    print("\nscenario 'session' (N conns x M msgs after STARTTLS)")
    print(f"{'server':<14}{'msg/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'tls p50':>10}{'errors':>8}")
    for kind, r in results.items():
        s = r["session"]
        print(
            f"{kind:<14}{s['messages_per_s']:>10}{s['message_ms_p50']:>10}"
            f"{s['message_ms_p99']:>10}{s['tls_handshake_ms_p50']:>10}{s['errors']:>8}"
        )
    print("\nscenario 'churn' (connect, STARTTLS, 1 msg, QUIT; one at a time)")
    print(
        f"{'server':<14}{'conn/s':>10}{'tls p50':>10}{'tls p99':>10}{'tls max':>10}"
        f"{'>10ms':>7}{'STARTTLS->TLS p50':>19}{'errors':>8}"
    )
    for kind, r in results.items():
        c = r["churn"]
        print(
            f"{kind:<14}{c['connections_per_s']:>10}{c['tls_handshake_ms_p50']:>10}"
            f"{c['tls_handshake_ms_p99']:>10}{c['tls_handshake_ms_max']:>10}"
            f"{c['handshakes_over_10ms']:>7}{c['starttls_to_tls_ms_p50']:>19}{c['errors']:>8}"
        )
    if "slimta_tx" in results:
        mine = results["slimta_tx"]
        print("\nratios (slimta_tx / other; >1 means slimta_tx is faster)")
        for kind, r in results.items():
            if kind == "slimta_tx":
                continue
            print(
                f"  vs {kind:<13} session msg/s {ratio(mine['session']['messages_per_s'], r['session']['messages_per_s'])}"  # noqa: E501
                f", churn conn/s {ratio(mine['churn']['connections_per_s'], r['churn']['connections_per_s'])}"  # noqa: E501
            )


def make_certificates(directory: Path) -> tuple[str, str, str]:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = (directory / n for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return str(cert), str(key), str(ca_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--servers", default=",".join(KINDS), help="comma-separated subset")
    parser.add_argument("--connections", type=int, default=10, help="session: concurrent")
    parser.add_argument("--messages", type=int, default=50, help="session: per connection")
    parser.add_argument("--churn", type=int, default=100, help="churn: connections per round")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per scenario")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](args.cert, args.key)
        return
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown server {kind!r}; choose from {', '.join(KINDS)}")
    body = make_body(args.size)
    sessions: dict[str, list[Stats]] = {kind: [] for kind in kinds}
    churns: dict[str, list[Stats]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        cert, key, ca_file = make_certificates(Path(tmp))
        ctx = ssl.create_default_context(cafile=ca_file)
        servers: dict[str, ServerProcess] = {}
        try:
            for kind in kinds:
                servers[kind] = ServerProcess(kind, cert, key)
                port = servers[kind].port
                print(f"{kind}: port {port}", file=sys.stderr)
                # One warm-up connection (imports, first handshake) outside the figures.
                asyncio.run(run_churn_scenario(port, ctx, 1, body, args.time_limit))
            for round_number in range(args.rounds):
                shift = round_number % len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    port = servers[kind].port
                    sessions[kind].append(
                        asyncio.run(
                            run_session_scenario(
                                port, ctx, args.connections, args.messages, body, args.time_limit
                            )
                        )
                    )
                    churns[kind].append(
                        asyncio.run(
                            run_churn_scenario(port, ctx, args.churn, body, args.time_limit)
                        )
                    )
        finally:
            for server in servers.values():
                server.stop()
    results = {
        kind: {"session": summary(merge(sessions[kind])), "churn": summary(merge(churns[kind]))}
        for kind in kinds
    }
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
