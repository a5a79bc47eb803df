"""The load generator: SMTP clients on one epoll loop, in a process of their own.

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

With ``--per-connection N`` each connection sends at most N messages, then QUIT; it waits for
the server to close (so the server, which closes first, holds the TIME_WAIT state, not the
client's ephemeral ports) and a new connection takes its place while messages remain: with
``--per-connection 1`` every message pays for a connection, banner, EHLO and QUIT, as most MX
traffic does. ``connections_opened`` in the result counts them.

With ``--starttls CAFILE`` each connection sends STARTTLS after its first EHLO, does the TLS
handshake on the same epoll loop (a non-blocking ``ssl`` socket: ``SSLWantReadError`` and
``SSLWantWriteError`` only mean "wait for the socket"; after each read the bytes the TLS layer
still holds are drained too, since epoll cannot see them), verifies the server certificate
against CAFILE, and sends EHLO again before its first message.

The run is bounded by ``--messages`` (shared by all connections) and ``--time-limit`` (no new
transaction starts after it) and ``--hard-limit`` (everything is closed). With ``--warmup N``
one connection first sends N small messages, then the process prints ``warm`` and waits for a
line on stdin before the measured run (the caller samples the server's memory in between).
The result is one JSON object on stdout.

How it is built, and why: the load generator must cost much less CPU than the fastest server,
or it, not the server, sets the pace (the asyncio version spent ~117 us of CPU a message in
lockstep). So there are no coroutines, futures or transports: each connection is a small state
machine (:class:`Conn`) driven by one level-triggered ``select.epoll`` loop over non-blocking
sockets. A reply is recognised by its first three bytes and the fourth (``-`` continues a
multi-line reply); the bytes a message sends are built once, not per message. A body the
kernel does not take at once stays queued as a ``memoryview`` and the socket waits for EPOLLOUT
(backpressure); a body larger than 4 MiB is one 1 MiB block sent ``repeat`` times, the next
block queued only when the last one is in the kernel, so no buffer beyond that block is built.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import resource
import select
import socket
import ssl
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


@dataclass
class Shared:
    """What all connections of one run share."""

    messages: int
    deadline: float
    message: Message
    pipelining: bool
    per_connection: int = 0  # messages per connection at most; 0: no limit
    connections_opened: int = 0
    tls: ssl.SSLContext | None = None  # STARTTLS with this client context
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
GROUP = MAIL + RCPT + DATA
EHLO = b"EHLO client.example\r\n"
QUIT = b"QUIT\r\n"
DOT = b".\r\n"
MAX_LINE = 65536

# Connection states: the reply each one waits for is EXPECT[state].
CONNECTING, BANNER, EHLO_SENT, MAIL_SENT, RCPT_SENT = 0, 1, 2, 3, 4
DATA_SENT, BODY, DOT_SENT, QUIT_SENT, CLOSING = 5, 6, 7, 8, 9
STARTTLS_SENT, HANDSHAKE = 10, 11
EXPECT = (
    b"",
    b"220",
    b"250",
    b"250",
    b"250",
    b"354",
    b"250",
    b"250",
    b"221",
    b"",
    b"220",
    b"",
)
STARTTLS = b"STARTTLS\r\n"

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP


def connect_error(err: int) -> OSError:
    # OSError(errno, ...) is the matching subclass: ConnectionRefusedError for ECONNREFUSED.
    return OSError(err, f"connect: {os.strerror(err)}")


class Conn:
    """One SMTP session: a state machine fed by :meth:`readable` and :meth:`writable`.

    Each complete reply is checked against ``EXPECT[state]`` and moves the session one step.
    Writes go straight to the socket; what the kernel does not take waits in ``out`` (and the
    socket then waits for EPOLLOUT), so a body never overtakes the flow control of TCP.
    """

    __slots__ = (
        "blocks_left",
        "buf",
        "closed",
        "fd",
        "group_next",
        "lines",
        "loop",
        "more",
        "next_started",
        "out",
        "pipelining",
        "secure",
        "sent",
        "shared",
        "sock",
        "started",
        "state",
    )

    def __init__(self, loop: Loop, shared: Shared, address: tuple[Any, ...], family: int) -> None:
        self.loop = loop
        self.shared = shared
        self.state = CONNECTING
        self.buf = b""
        self.lines: list[bytes] = []
        self.out: deque[memoryview] = deque()
        self.blocks_left = 0
        self.pipelining = False
        self.group_next = False
        self.more = False
        self.started = 0.0
        self.next_started = 0.0
        self.closed = False
        self.sent = 0
        self.secure = False
        shared.connections_opened += 1
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        # As asyncio does for every TCP transport: a command must not wait for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        err = sock.connect_ex(address)
        loop.add(self)
        if err not in (0, errno.EINPROGRESS):
            self.fail(connect_error(err))

    # -- events ----------------------------------------------------------------------------------

    def writable(self) -> None:
        if self.state == HANDSHAKE:
            self.handshake()
            return
        if self.state == CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(connect_error(err))
                return
            self.state = BANNER
            self.loop.watch(self, False)
            return
        self.flush()

    def readable(self) -> None:
        if self.state == HANDSHAKE:
            self.handshake()
            return
        try:
            data = self.sock.recv(16384)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as e:
            self.fail(e)
            return
        if self.secure and data:
            # What the TLS layer decrypted beyond this read: epoll will not report it.
            sock: Any = self.sock
            while sock.pending():
                data += sock.recv(16384)
        if not data:
            if self.state == CLOSING:
                self.close()
                self.loop.replace()
            else:
                self.fail(ProtocolError("connection closed by the server"))
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        start = 0
        while True:
            end = data.find(b"\r\n", start)
            if end < 0:
                break
            if data[start + 3 : start + 4] == b"-":
                self.lines.append(data[start:end])
            else:
                code = data[start : start + 3]
                if code != EXPECT[self.state]:
                    text = data[start:end].decode("ascii", "replace")
                    want = EXPECT[self.state].decode()
                    self.fail(ProtocolError(f"expected {want}, got {text!r}"))
                    return
                self.reply(data, start, end)
                if self.closed:
                    return
                if self.lines:
                    self.lines = []
            start = end + 2
        if start < len(data):
            self.buf = data[start:]
            if len(self.buf) > MAX_LINE:
                self.fail(ProtocolError("reply line too long"))

    # -- the session -----------------------------------------------------------------------------

    def reply(self, data: bytes, start: int, end: int) -> None:
        """A reply with the expected code arrived: take the next step."""
        state = self.state
        shared = self.shared
        if state == MAIL_SENT:
            self.state = RCPT_SENT
            if not self.pipelining:
                self.send(RCPT)
        elif state == RCPT_SENT:
            self.state = DATA_SENT
            if not self.pipelining:
                self.send(DATA)
        elif state == DATA_SENT:
            self.sent += 1
            per = shared.per_connection
            self.more = more = (not per or self.sent < per) and shared.take()
            self.state = BODY
            loop = self.loop
            if loop.small is not None:
                # The body goes out with the next MAIL, RCPT and DATA when pipelining.
                if more and self.group_next:
                    self.send(loop.small_group)
                else:
                    self.send(loop.small)
                self.body_sent()
            else:
                message = shared.message
                self.blocks_left = message.repeat
                self.send(message.head)
                self.flush()
        elif state == DOT_SENT:
            shared.latencies.append(time.perf_counter() - self.started)
            shared.bytes_sent += self.loop.size
            if self.more:
                self.state = MAIL_SENT
                if not self.pipelining:
                    self.started = time.perf_counter()
                    self.send(MAIL)
                elif self.group_next:
                    self.started = self.next_started
                else:
                    self.started = time.perf_counter()
                    self.send(GROUP)
            else:
                self.state = QUIT_SENT
                self.send(QUIT)
        elif state == BODY:
            # Only a server that answers before the dot gets here; the code was right (250),
            # but the message is not complete: count it as a protocol error.
            self.fail(ProtocolError("250 before the end of the message"))
        elif state == BANNER:
            self.state = EHLO_SENT
            self.send(EHLO)
        elif state == EHLO_SENT:
            # The first line greets; each further one (the last included) names an extension.
            lines = [*self.lines, data[start:end]][1:]
            keywords = {line[4:].split(b" ")[0].upper() for line in lines}
            if shared.tls is not None and not self.secure:
                if b"STARTTLS" not in keywords:
                    self.fail(ProtocolError("no STARTTLS in the EHLO reply"))
                    return
                self.state = STARTTLS_SENT
                self.send(STARTTLS)
                return
            self.pipelining = shared.pipelining and b"PIPELINING" in keywords
            if self.pipelining:
                shared.pipelined_connections += 1
            self.group_next = self.pipelining and shared.message.repeat == 1
            if shared.take():
                self.state = MAIL_SENT
                self.started = time.perf_counter()
                self.send(GROUP if self.pipelining else MAIL)
            else:
                self.state = QUIT_SENT
                self.send(QUIT)
        elif state == STARTTLS_SENT:
            if start + (end - start) + 2 < len(data):
                self.fail(ProtocolError("data after the 220 to STARTTLS"))
                return
            assert shared.tls is not None
            self.state = HANDSHAKE
            self.sock = shared.tls.wrap_socket(
                self.sock, server_hostname="localhost", do_handshake_on_connect=False
            )
            self.handshake()
        elif state == QUIT_SENT:
            if shared.per_connection:
                self.state = CLOSING  # the server closes first; then a new connection
            else:
                self.close()

    def handshake(self) -> None:
        """Advance the TLS handshake; when done, EHLO again (RFC 3207: forget the first)."""
        sock: Any = self.sock
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.watch(self, False)
            return
        except ssl.SSLWantWriteError:
            self.loop.watch(self, True)
            return
        except OSError as e:
            self.fail(e)
            return
        self.secure = True
        self.loop.watch(self, False)
        self.state = EHLO_SENT
        self.send(EHLO)

    def body_sent(self) -> None:
        """The whole body and its dot are written (or queued for the kernel)."""
        self.state = DOT_SENT
        self.next_started = time.perf_counter()

    # -- writing ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        out = self.out
        if out:
            out.append(memoryview(data))
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as e:
            self.fail(e)
            return
        if sent < len(data):
            out.append(memoryview(data)[sent:])
            self.loop.watch(self, True)

    def flush(self) -> None:
        """Write what is queued; then, for a streamed body, the next block (backpressure: only
        when the previous one is all in the kernel)."""
        out = self.out
        sock = self.sock
        while True:
            while out:
                view = out[0]
                try:
                    sent = sock.send(view)
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    self.loop.watch(self, True)
                    return
                except OSError as e:
                    self.fail(e)
                    return
                if sent < len(view):
                    out[0] = view[sent:]
                    self.loop.watch(self, True)
                    return
                out.popleft()
            if self.state != BODY or self.loop.small is not None:
                break
            message = self.shared.message
            if self.blocks_left > 0:
                self.blocks_left -= 1
                out.append(memoryview(message.block))
            else:
                out.append(memoryview(message.tail + DOT))
                self.body_sent()
                # Without grouping (streamed bodies), the next MAIL, RCPT and DATA wait for
                # the reply to the dot.
        self.loop.watch(self, False)

    # -- the end ---------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        if self.closed:
            return
        self.shared.errors.append(f"{type(error).__name__}: {error}")
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove(self)
        self.sock.close()
        self.out.clear()


class Loop:
    """One level-triggered epoll over all connections of a run."""

    def __init__(self, shared: Shared, address: tuple[Any, ...] = (), family: int = 0) -> None:
        self.shared = shared
        self.address = address
        self.family = family
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.writing: set[int] = set()
        self.finished = False
        self.polls = 0  # epoll_wait calls
        self.events = 0  # (fd, events) pairs they returned
        message = shared.message
        self.size = message.size
        # A body up to 4 MiB is one bytes object built once, with its dot (and once more with
        # the next MAIL, RCPT and DATA behind it); larger ones are streamed block by block.
        self.small: bytes | None = None
        self.small_group = b""
        if message.repeat == 1:
            self.small = message.head + message.block + message.tail + DOT
            self.small_group = self.small + GROUP

    def add(self, conn: Conn) -> None:
        self.conns[conn.fd] = conn
        self.writing.add(conn.fd)
        self.epoll.register(conn.fd, EPOLLIN | EPOLLOUT)

    def watch(self, conn: Conn, write: bool) -> None:
        fd = conn.fd
        if write:
            if fd not in self.writing:
                self.writing.add(fd)
                self.epoll.modify(fd, EPOLLIN | EPOLLOUT)
        elif fd in self.writing:
            self.writing.discard(fd)
            self.epoll.modify(fd, EPOLLIN)

    def replace(self) -> None:
        """A connection ended after its share (``--per-connection``): open the next one while
        messages and time remain."""
        shared = self.shared
        if shared.messages > 0 and time.monotonic() < shared.deadline:
            Conn(self, shared, self.address, self.family)

    def remove(self, conn: Conn) -> None:
        fd = conn.fd
        if self.conns.pop(fd, None) is not None:
            self.writing.discard(fd)
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def run(self, hard_deadline: float) -> bool:
        """Until every connection is closed (True) or the hard deadline passes (False)."""
        conns = self.conns
        poll = self.epoll.poll
        monotonic = time.monotonic
        while conns:
            timeout = hard_deadline - monotonic()
            if timeout <= 0:
                for conn in list(conns.values()):
                    conn.close()
                self.epoll.close()
                return False
            ready = poll(min(timeout, 1.0))
            self.polls += 1
            self.events += len(ready)
            for fd, events in ready:
                conn = conns.get(fd)
                if conn is None:
                    continue
                if events & EPOLLOUT:
                    conn.writable()
                    if conn.closed:
                        continue
                if events & (EPOLLIN | EPOLLERR):
                    conn.readable()
        self.epoll.close()
        return True


def address_of(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, address


def session_run(
    host: str, port: int, shared: Shared, connections: int, hard_deadline: float
) -> Loop:
    """Open ``connections`` sessions and run them to the end; ``loop.finished`` is False when
    the hard deadline stopped them."""
    family, address = address_of(host, port)
    loop = Loop(shared, address, family)
    for _ in range(connections):
        Conn(loop, shared, address, family)
    loop.finished = loop.run(hard_deadline)
    return loop


def run(args: argparse.Namespace) -> dict[str, Any]:
    message = Message.of_size(args.size)
    if args.warmup:
        warm = Shared(args.warmup, time.monotonic() + 30, Message.of_size(2048), False)
        warm_loop = session_run(args.host, args.port, warm, 1, time.monotonic() + 60)
        if warm.errors or not warm_loop.finished:
            raise ProtocolError(f"warm-up failed: {warm.errors or 'timed out'}")
        print("warm", flush=True)
        sys.stdin.readline()

    shared = Shared(
        args.messages,
        time.monotonic() + args.time_limit,
        message,
        args.pipelining,
        per_connection=args.per_connection,
        tls=tls_context(args.starttls),
    )
    # Nothing here makes reference cycles; the collector would only add pauses.
    gc.collect()
    gc.disable()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    hard_deadline = time.monotonic() + args.hard_limit
    timed_out = False
    polls = events = 0
    try:
        loop = session_run(args.host, args.port, shared, args.connections, hard_deadline)
        timed_out = not loop.finished
        polls, events = loop.polls, loop.events
    except OSError as e:
        shared.errors.append(f"{type(e).__name__}: {e}")
    if timed_out:
        shared.errors.append(f"hard time limit of {args.hard_limit}s reached")
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    gc.enable()
    lat = sorted(shared.latencies)
    done = len(lat)

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return lat[min(done - 1, max(0, round(p / 100 * done + 0.5) - 1))]

    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
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
        "client_cpu": client_cpu,
        "client_cpu_per_msg": client_cpu / done if done else None,
        "client_user": cpu1.ru_utime - cpu0.ru_utime,
        "client_sys": cpu1.ru_stime - cpu0.ru_stime,
        # How much each epoll_wait returned: few events a call means the client mostly waits.
        "client_polls": polls,
        "client_events": events,
        "per_connection": args.per_connection,
        "connections_opened": shared.connections_opened,
    }


def tls_context(cafile: str | None) -> ssl.SSLContext | None:
    """A client context that verifies the server against ``cafile`` (None: no STARTTLS)."""
    if not cafile:
        return None
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--pipelining", action="store_true")
    parser.add_argument(
        "--per-connection",
        type=int,
        default=0,
        help="messages per connection at most, then QUIT and a new connection (0: no limit)",
    )
    parser.add_argument(
        "--starttls", metavar="CAFILE", help="STARTTLS after EHLO, verifying against CAFILE"
    )
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--hard-limit", type=float, default=60.0)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args()
    try:
        result = run(args)
    except ProtocolError as e:
        sys.exit(f"load.py: {e}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
