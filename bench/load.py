"""The load generator: SMTP clients on asyncio, in a process of their own.

Run by ``bench/run.py``; usable alone::

    python bench/load.py --port 2525 --connections 50 --size 2048 --messages 5000

Every reply code is checked (220 banner, 250 EHLO, 250 MAIL, 250 RCPT, 354 DATA, 250 after
the final dot, 221 QUIT); a wrong code ends that connection and is counted as an error.
Commands are pipelined only with ``--pipelining`` and only when the server's EHLO reply
advertises PIPELINING. Then each message body, with its final dot, goes out in the same write
as the next MAIL, RCPT and DATA (RFC 2920 3.1 allows content as the first "command" of a group,
and DATA as its last), so a message costs one round trip; a body still waits for its 354.

Latency is per message: from writing MAIL to reading the reply to the final dot. Throughput is
completed messages over the wall time from the first connect to the last close.

The run is bounded by ``--messages`` (shared by all connections) and ``--time-limit`` (no new
transaction starts after it) and ``--hard-limit`` (everything is cancelled). With ``--warmup N``
one connection first sends N small messages, then the process prints ``warm`` and waits for a
line on stdin before the measured run (the caller samples the server's memory in between).
The result is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

LINE = 78  # bytes per body line, CRLF included


def make_block(size: int, salt: str = "") -> bytes:
    """``size`` bytes of CRLF-terminated text lines (as sent: dot-stuffed).

    One line in every ~50 starts with a dot, so dot-stuffing is exercised; the stuffed dot is
    counted in ``size``.
    """
    lines: list[bytes] = []
    total = 0
    n = 0
    while total < size:
        left = size - total
        if left <= LINE + 8:
            width = max(left - 2, 0)
        else:
            width = LINE - 2
        if n % 50 == 7 and width >= 2:
            text = (".." + f"{salt}dot line {n} ".ljust(width - 2, "x"))[:width]
        else:
            text = f"{salt}line {n} ".ljust(width, "abcdefghijklmnopqrstuvwxyz"[n % 26])[:width]
        line = text.encode("ascii") + b"\r\n"
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)


@dataclass
class Message:
    """What one transaction sends after the 354: ``head``, ``block`` x ``repeat``, ``.``."""

    head: bytes
    block: bytes
    repeat: int
    tail: bytes = b""

    @property
    def size(self) -> int:
        return len(self.head) + len(self.block) * self.repeat + len(self.tail)

    @classmethod
    def of_size(cls, size: int) -> Message:
        head = (
            b"From: Bench <bench@client.example>\r\n"
            b"To: Sink <sink@server.example>\r\n"
            b"Subject: slimta_tx benchmark message\r\n"
            b"Message-ID: <bench@client.example>\r\n"
            b"\r\n"
        )
        body = max(size - len(head), 2)
        chunk = 1024 * 1024
        if body > 4 * chunk:
            repeat, rest = divmod(body, chunk)
            return cls(head, make_block(chunk), repeat, make_block(rest) if rest else b"")
        return cls(head, make_block(body), 1)


class ProtocolError(Exception):
    pass


class Client(asyncio.Protocol):
    """One SMTP connection: writes commands, parses (multi-line) replies, honours backpressure."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.partial: list[bytes] = []
        self.replies: deque[tuple[int, list[bytes]]] = deque()
        self.want = 0
        self.waiter: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=1024 * 1024)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 2
            self.partial.append(line)
            if line[3:4] == b"-":
                continue
            code = int(line[:3]) if line[:3].isdigit() else -1
            self.replies.append((code, self.partial))
            self.partial = []
        self.buf = buf[start:]
        if len(self.buf) > 65536:
            raise ProtocolError("reply line too long")
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if len(self.replies) >= self.want or self.closed:
                waiter.set_result(None)

    async def replies_of(self, count: int) -> list[tuple[int, list[bytes]]]:
        while len(self.replies) < count:
            if self.closed:
                raise ProtocolError("connection closed by the server")
            self.want = count
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        return [self.replies.popleft() for _ in range(count)]

    async def expect(self, *codes: int) -> None:
        """Read one reply per code and check each."""
        got = await self.replies_of(len(codes))
        for want, (code, lines) in zip(codes, got, strict=True):
            if code != want:
                text = lines[0].decode("ascii", "replace")
                raise ProtocolError(f"expected {want}, got {text!r}")

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ProtocolError("connection closed by the server")
        self.transport.write(data)
        if self.writable is not None:
            await self.writable


@dataclass
class Shared:
    """What all connections of one run share."""

    messages: int
    deadline: float
    message: Message
    pipelining: bool
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pipelined_connections: int = 0
    bytes_sent: int = 0

    def take(self) -> bool:
        if self.messages <= 0 or time.monotonic() >= self.deadline:
            return False
        self.messages -= 1
        return True


MAIL = b"MAIL FROM:<bench@client.example>\r\n"
RCPT = b"RCPT TO:<sink@server.example>\r\n"
DATA = b"DATA\r\n"


async def session(host: str, port: int, shared: Shared) -> None:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Client, host, port)
    perf = time.perf_counter
    message = shared.message
    try:
        await client.expect(220)
        await client.write(b"EHLO client.example\r\n")
        ((code, lines),) = await client.replies_of(1)
        if code != 250:
            raise ProtocolError(f"EHLO answered {code}")
        keywords = {line[4:].split(b" ")[0].upper() for line in lines[1:]}
        pipelining = shared.pipelining and b"PIPELINING" in keywords
        if pipelining:
            shared.pipelined_connections += 1
        # With PIPELINING a group may start with message content (RFC 2920 3.1), so each
        # body goes out together with the next MAIL, RCPT and DATA: one round trip a message.
        group_next = pipelining and message.repeat == 1
        more = shared.take()
        if more and pipelining:
            started = perf()
            await client.write(MAIL + RCPT + DATA)
            await client.expect(250, 250, 354)
        while more:
            if not pipelining:
                started = perf()
                await client.write(MAIL)
                await client.expect(250)
                await client.write(RCPT)
                await client.expect(250)
                await client.write(DATA)
                await client.expect(354)
            more = shared.take()
            if message.repeat == 1:
                tail = message.head + message.block + b".\r\n"
                if more and group_next:
                    await client.write(tail + MAIL + RCPT + DATA)
                else:
                    await client.write(tail)
            else:
                await client.write(message.head)
                for _ in range(message.repeat):
                    await client.write(message.block)
                await client.write(message.tail + b".\r\n")
            next_started = perf()
            await client.expect(250)
            shared.latencies.append(perf() - started)
            shared.bytes_sent += message.size
            if more and pipelining:
                if not group_next:
                    next_started = perf()
                    await client.write(MAIL + RCPT + DATA)
                await client.expect(250, 250, 354)
                started = next_started
        await client.write(b"QUIT\r\n")
        await client.expect(221)
    finally:
        if client.transport is not None:
            client.transport.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    message = Message.of_size(args.size)
    if args.warmup:
        warm = Shared(args.warmup, time.monotonic() + 30, Message.of_size(2048), False)
        await asyncio.wait_for(session(args.host, args.port, warm), 60)
        if warm.errors:
            raise ProtocolError(f"warm-up failed: {warm.errors}")
        print("warm", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    shared = Shared(args.messages, time.monotonic() + args.time_limit, message, args.pipelining)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()

    async def one() -> None:
        try:
            await session(args.host, args.port, shared)
        except (ProtocolError, OSError) as e:
            shared.errors.append(f"{type(e).__name__}: {e}")

    tasks = [asyncio.ensure_future(one()) for _ in range(args.connections)]
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.hard_limit)
    except asyncio.TimeoutError:
        timed_out = True
        shared.errors.append(f"hard time limit of {args.hard_limit}s reached")
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    lat = sorted(shared.latencies)
    done = len(lat)

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return lat[min(done - 1, max(0, round(p / 100 * done + 0.5) - 1))]

    return {
        "connections": args.connections,
        "size": message.size,
        "pipelining_requested": args.pipelining,
        "pipelined_connections": shared.pipelined_connections,
        "messages_requested": args.messages,
        "messages": done,
        "elapsed": elapsed,
        "msgs_per_s": done / elapsed if elapsed > 0 else 0.0,
        "mib_per_s": shared.bytes_sent / elapsed / 1048576 if elapsed > 0 else 0.0,
        "p50": pct(50),
        "p99": pct(99),
        "max": lat[-1] if lat else None,
        "errors": shared.errors[:20],
        "error_count": len(shared.errors),
        "timed_out": timed_out,
        "hit_time_limit": done < args.messages and not timed_out,
        "client_cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--pipelining", action="store_true")
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--hard-limit", type=float, default=60.0)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
