"""Throughput of the relay bus: SMTP clients -> twistd slimta --relay -> a next hop.

Usage::

    python bench/relay.py --connections 50 --messages 5000 --size 2048 --next-hop sink
    python bench/relay.py --next-hop postfix          # a private Postfix (needs root)
    python bench/relay.py --next-hop sink --lmtp      # the bus speaks LMTP to the sink

Everything runs on 127.0.0.1 with free ports. The next hop is either ``sink`` (a small Twisted
SMTP/LMTP server in a process of its own that answers 250 to everything and keeps nothing: the
cost of the relay alone) or ``postfix`` (tests/support/postfix.py: a real Postfix that queues
each message with fsync and delivers it to a Maildir, all under a temporary directory).
``twistd -n slimta --relay ... --relay-pool N`` runs in between. ``--connections`` asyncio
clients each send messages over one connection (MAIL, RCPT and DATA pipelined), every reply
code is checked. Bounded by ``--messages`` and ``--time-limit``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_banner(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(256).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answered on 127.0.0.1:{port}")


# -- the sink next hop (runs as: python bench/relay.py --serve-sink PORT [--lmtp]) ----------


def serve_sink(port: int, lmtp: bool) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    class Sink(Protocol):
        def connectionMade(self) -> None:
            self.buffer = b""
            self.in_data = False
            self.rcpts = 0
            self.transport.write(b"220 sink ESMTP\r\n")

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            out: list[bytes] = []
            while True:
                if self.in_data:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        self.buffer = self.buffer[-4:]
                        break
                    self.buffer = self.buffer[end + 5 :]
                    self.in_data = False
                    out += [b"250 2.0.0 sunk\r\n"] * (self.rcpts if lmtp else 1)
                    self.rcpts = 0
                    continue
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    break
                line, self.buffer = self.buffer[:end].upper(), self.buffer[end + 2 :]
                if line.startswith((b"EHLO", b"LHLO")):
                    out.append(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif line.startswith(b"DATA"):
                    out.append(b"354 go\r\n")
                    self.in_data = True
                    self.buffer = b"\r\n" + self.buffer  # the end marker may follow at once
                elif line.startswith(b"QUIT"):
                    out.append(b"221 bye\r\n")
                    self.transport.loseConnection()
                else:
                    if line.startswith(b"RCPT"):
                        self.rcpts += 1
                    out.append(b"250 ok\r\n")
            if out:
                self.transport.write(b"".join(out))

    reactor.listenTCP(port, Factory.forProtocol(Sink), interface="127.0.0.1")
    reactor.run()


# -- the load -------------------------------------------------------------------------------


def body_of(size: int) -> bytes:
    head = b"From: bench@client.example\r\nTo: alice@example.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(0, (size - len(head)) // len(line))


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[:3] != code:
            raise ValueError(f"expected {code.decode()}, got {line.decode(errors='replace')!r}")
        if line[3:4] != b"-":
            return


async def client(port: int, body: bytes, state: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await expect(reader, b"220")
        writer.write(b"EHLO bench.client\r\n")
        await expect(reader, b"250")
        while state["budget"] > 0 and time.monotonic() < state["deadline"]:
            state["budget"] -= 1
            start = time.monotonic()
            writer.write(
                b"MAIL FROM:<bench@client.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
            )
            await expect(reader, b"250")
            await expect(reader, b"250")
            await expect(reader, b"354")
            writer.write(body + b".\r\n")
            await expect(reader, b"250")
            state["latencies"].append(time.monotonic() - start)
        writer.write(b"QUIT\r\n")
        await expect(reader, b"221")
    except (OSError, ValueError) as e:
        state["errors"].append(str(e))
    finally:
        writer.close()


async def load(port: int, connections: int, messages: int, size: int, limit: float) -> Any:
    state: dict[str, Any] = {
        "budget": messages,
        "deadline": time.monotonic() + limit,
        "latencies": [],
        "errors": [],
    }
    body = body_of(size)
    start = time.monotonic()
    await asyncio.gather(*(client(port, body, state) for _ in range(connections)))
    return state, time.monotonic() - start


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--pool", type=int, default=50, help="--relay-pool for the edge")
    parser.add_argument("--next-hop", choices=("sink", "postfix"), default="sink")
    parser.add_argument("--lmtp", action="store_true", help="relay over LMTP (sink only)")
    parser.add_argument("--serve-sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sink:
        serve_sink(args.serve_sink, args.lmtp)
        return
    if args.lmtp and args.next_hop != "sink":
        raise SystemExit("--lmtp works with --next-hop sink only (Postfix does not serve LMTP)")

    processes: list[subprocess.Popen[bytes]] = []
    postfix = None
    try:
        if args.next_hop == "sink":
            hop_port = free_port()
            processes.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--serve-sink", str(hop_port)]
                    + (["--lmtp"] if args.lmtp else [])
                )
            )
            wait_banner(hop_port)
        else:
            sys.path.insert(0, str(ROOT))
            from tests.support.postfix import Postfix

            postfix = Postfix()
            postfix.start()
            hop_port = postfix.port
        edge_port = free_port()
        relay = ["--relay-lmtp" if args.lmtp else "--relay", f"127.0.0.1:{hop_port}"]
        twistd = subprocess.Popen(
            [
                *(TWISTD, "-n", "--pidfile=", "--logfile=/dev/null", "slimta"),
                *("--listen", f"tcp:{edge_port}:interface=127.0.0.1", "--hostname", "edge.bench"),
                *relay,
                *("--relay-tls", "none", "--relay-pool", str(args.pool)),
                *("--max-size", str(max(args.size * 2, 1 << 20))),
            ],
            cwd=ROOT,
        )
        processes.append(twistd)
        wait_banner(edge_port)
        state, wall = asyncio.run(
            load(edge_port, args.connections, args.messages, args.size, args.time_limit)
        )
    finally:
        for proc in reversed(processes):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if postfix is not None:
            postfix.stop()
    done = len(state["latencies"])
    print(
        json.dumps(
            {
                "next_hop": args.next_hop + (" (lmtp)" if args.lmtp else ""),
                "connections": args.connections,
                "pool": args.pool,
                "size": args.size,
                "messages": done,
                "seconds": round(wall, 3),
                "msgs_per_s": round(done / wall, 1) if wall else 0,
                "latency_p50_ms": round(percentile(state["latencies"], 0.5) * 1000, 2),
                "latency_p99_ms": round(percentile(state["latencies"], 0.99) * 1000, 2),
                "errors": state["errors"][:5],
                "error_count": len(state["errors"]),
            }
        )
    )


if __name__ == "__main__":
    main()
