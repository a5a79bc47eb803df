"""Issue 11, reproduced: each way one client or one bad day could take the server down.

    .venv/bin/python bench/abuse.py                 # every case (about 8 minutes)
    .venv/bin/python bench/abuse.py drip burst      # some of them

Each case starts ``twistd -n slimta`` on 127.0.0.1 (a free port), drives it from this process
(asyncio, loopback only, bounded in count and time) and prints what the clients saw; where a
new limit matters, once with it turned off ("before") and once as shipped ("after").

========== ====================================================================================
drip       connections dripping one byte every 2 s in DATA (the idle timer never fires)
session    a client sending NOOP every few seconds, forever
oversize   a message over --max-size without SIZE=, sent slowly: drained until the deadline
burst      1,000 connects at once: how many get a banner (listen backlog 50 vs 4096)
fds        a low descriptor limit (nofile 256): connections past it, then a transaction on each
fullspool  --spool-dir on a full filesystem (a 1 MiB tmpfs; needs root)
partition  RabbitMQ behind a silent partition: how long a new client waits (needs RabbitMQ)
memory     a short soak of hostile input (bench/soak.py does the full 10 minutes)
========== ====================================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hostile import Server, load

ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
HERE = Path(__file__).resolve().parent


def say(text: str = "") -> None:
    print(text, flush=True)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """One whole reply (the last line of a multi-line one); b"" when the server closed."""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line or line[3:4] != b"-":
            return line


class Case:
    def __init__(self, work: Path) -> None:
        self.work = work

    def server(self, *args: str, **kwargs: object) -> Server:
        maildir = self.work / f"md-{time.monotonic_ns()}"
        base = ["--maildir", str(maildir), "--accept-domain", "example.com"]
        return Server([*base, *args], cwd=str(self.work), **kwargs)  # type: ignore[arg-type]


# -- drip ---------------------------------------------------------------------------------------


async def drip_clients(port: int, count: int, seconds: float) -> list[tuple[float, bytes]]:
    """``count`` clients in DATA sending one byte every 2 s; (when each was cut, the reply)."""
    start = time.monotonic()
    results: list[tuple[float, bytes]] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(ENVELOPE)
        for _ in range(4):
            await read_reply(reader)
        ended = asyncio.ensure_future(reader.read(4096))
        while time.monotonic() - start < seconds and not ended.done():
            writer.write(b"x")
            await asyncio.wait([ended], timeout=2)
        reply = ended.result() if ended.done() else b""
        results.append((time.monotonic() - start if ended.done() else -1, reply.strip()))
        ended.cancel()
        writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return results


def drip(case: Case, quick: bool) -> None:
    count, seconds = (50, 40) if quick else (300, 45)
    say(f"drip: {count} clients in DATA, one byte every 2 s, --timeout 10 --data-timeout 10")
    for label, extra in (
        ("before (no rate, no deadline)", ["--min-data-rate", "0", "--data-deadline", "0"]),
        ("after (defaults: 500 B/s after 30 s, 600 s deadline)", []),
    ):
        server = case.server("--timeout", "10", "--data-timeout", "10", *extra)
        try:
            results = asyncio.run(drip_clients(server.port, count, seconds))
        finally:
            server.stop()
        open_ = sum(1 for t, _ in results if t < 0)
        cut = sorted(t for t, _ in results if t >= 0)
        replies = Counter(r.split(b"\r\n")[0].decode() for t, r in results if t >= 0)
        when = f", cut at {cut[0]:.0f}-{cut[-1]:.0f} s" if cut else ""
        say(f"  {label}: still open after {seconds} s: {open_}/{count}{when}")
        for reply, n in replies.items():
            say(f"    {n} x {reply}")


# -- session deadline ----------------------------------------------------------------------------


def session(case: Case, quick: bool) -> None:
    limit = 15
    say(f"session: a client sends NOOP every 5 s (--timeout 10); --session-deadline {limit}")

    async def keeper(port: int) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        start = time.monotonic()
        while time.monotonic() - start < 40:
            writer.write(b"NOOP\r\n")
            reply = await read_reply(reader)
            if not reply.startswith(b"250"):
                writer.close()
                return time.monotonic() - start, reply.strip()
            await asyncio.sleep(5)
        writer.close()
        return -1, b""

    for label, value in (("before (no session deadline)", "0"), ("after", str(limit))):
        server = case.server("--timeout", "10", "--session-deadline", value)
        try:
            seconds, reply = asyncio.run(keeper(server.port))
        finally:
            server.stop()
        outcome = (
            f"closed at {seconds:.0f} s: {reply.decode()}" if seconds >= 0 else "open at 40 s"
        )
        say(f"  {label}: {outcome}")


# -- oversize drained until the deadline --------------------------------------------------------


def oversize(case: Case, quick: bool) -> None:
    say("oversize: 10 MB at 2 KB/s without SIZE=, --max-size 100000 (--data-deadline 20 here)")

    async def slow_big(port: int) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(ENVELOPE)
        for _ in range(4):
            await read_reply(reader)
        start = time.monotonic()
        ended = asyncio.ensure_future(reader.read(4096))
        line = b"y" * 998 + b"\r\n"
        while time.monotonic() - start < 60 and not ended.done():
            writer.write(line * 2)
            await asyncio.wait([ended], timeout=1)
        reply = ended.result() if ended.done() else b""
        ended.cancel()
        writer.close()
        return (time.monotonic() - start if reply else -1), reply.strip()

    server = case.server("--max-size", "100000", "--data-deadline", "20")
    try:
        seconds, reply = asyncio.run(slow_big(server.port))
    finally:
        server.stop()
    say(f"  cut at {seconds:.0f} s: {reply.decode()}")


# -- burst ----------------------------------------------------------------------------------------


def burst_clients(
    server: Server, count: int, patience: float, stall: float
) -> tuple[int, int, float, float]:
    """``count`` non-blocking connects issued back to back (a few milliseconds in all) while
    the server is stopped for ``stall`` seconds (SIGSTOP: a busy moment, a GC pause, CPU
    contention), then up to ``patience`` seconds for banners; (banners, refusals, median and
    slowest seconds to a banner)."""
    import selectors
    import signal
    import statistics

    selector = selectors.DefaultSelector()
    server.signal(signal.SIGSTOP)
    start = time.monotonic()
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
            selector.register(sock, selectors.EVENT_READ)
            sockets.append(sock)
        time.sleep(max(0.0, stall - (time.monotonic() - start)))  # the server's busy moment
    finally:
        server.signal(signal.SIGCONT)
    banners = refused = 0
    waits: list[float] = []
    pending = count
    while pending and time.monotonic() - start < patience:
        for key, _ in selector.select(timeout=0.1):
            sock = key.fileobj
            try:
                data = sock.recv(512)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if data.startswith(b"220"):
                banners += 1
                waits.append(time.monotonic() - start)
            refused += data.startswith(b"421")
            selector.unregister(sock)
            pending -= 1
    for sock in sockets:
        sock.close()
    median = statistics.median(waits) if waits else 0.0
    return banners, refused, median, max(waits, default=0.0)


def burst(case: Case, quick: bool) -> None:
    count, patience, stall = 1000, 5.0, 1.5
    say(f"burst: {count} connects at once while the server is busy for {stall:g} s (SIGSTOP); "
        f"clients wait up to {patience:g} s for the banner")  # fmt: skip
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * count), hard))
    for label, backlog in (("before (backlog=50, Twisted's default)", "50"), ("after", None)):
        listen = "tcp:0:interface=127.0.0.1" + (f":backlog={backlog}" if backlog else "")
        server = case.server(listen=listen)
        try:
            time.sleep(0.5)  # bounded: let the start-up settle before stopping the process
            rss = server.rss()
            banners, refused, median, slowest = burst_clients(server, count, patience, stall)
            held = server.rss()
        finally:
            server.stop()
        say(f"  {label}: {banners}/{count} got a banner within {patience:g} s, {refused} got "
            f"421; to the banner: median {median:.1f} s, slowest {slowest:.1f} s; RSS "
            f"{rss:.0f} -> {held:.0f} MiB")  # fmt: skip


# -- descriptors ---------------------------------------------------------------------------------


async def fd_clients(port: int, count: int) -> tuple[Counter[str], Counter[str]]:
    greetings: Counter[str] = Counter()
    results: Counter[str] = Counter()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            line = await asyncio.wait_for(reader.readline(), 5)
        except (OSError, asyncio.TimeoutError):
            greetings["no banner (hung or dropped)"] += 1
            continue
        if line.startswith(b"220"):
            greetings["220"] += 1
            held.append((reader, writer))
        elif line:
            greetings[line[:9].decode()] += 1
            writer.close()
        else:
            greetings["closed without a reply"] += 1
            writer.close()

    async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(ENVELOPE + b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
            reply = b""
            for _ in range(5):  # EHLO, MAIL, RCPT, 354, the reply after the dot
                reply = await read_reply(reader, 20)
            results[reply[:9].decode() or "closed"] += 1
        except (OSError, asyncio.TimeoutError):
            results["no reply"] += 1
        writer.close()

    await asyncio.gather(*(transaction(r, w) for r, w in held))
    return greetings, results


def fds(case: Case, quick: bool) -> None:
    count = 400
    say(f"fds: nofile 256 (soft = hard); {count} connections at once, then one message on each")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    for label, reserve in (("before (no reserve)", "0"), ("after (default reserve)", None)):
        extra = ["--descriptor-reserve", reserve] if reserve is not None else []
        server = case.server(*extra, preexec_fn=limit)
        try:
            greetings, results = asyncio.run(fd_clients(server.port, count))
            emfile = server.output.count("Too many open files") + server.output.count("EMFILE")
        finally:
            server.stop()
        say(f"  {label}: greetings {dict(greetings)}; transactions {dict(results)}; "
            f"EMFILE in the log: {emfile}")  # fmt: skip


# -- full spool ----------------------------------------------------------------------------------


def fullspool(case: Case, quick: bool) -> None:
    say("fullspool: --spool-dir on a full 1 MiB tmpfs; 3 messages of 2 MiB then one of 1 KiB")
    if os.geteuid() != 0:
        say("  skipped: mounting a tmpfs needs root")
        return
    spool = case.work / "spool"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "slimta-bench", str(spool)], check=False
    )
    if mounted.returncode != 0:
        say("  skipped: cannot mount a tmpfs here")
        return

    async def client(port: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(b"EHLO c.test\r\n")
        await read_reply(reader)
        replies = []
        for size in (2 << 20, 2 << 20, 2 << 20, 1024):
            writer.write(ENVELOPE[13:])
            for _ in range(3):
                await read_reply(reader)
            writer.write((b"z" * 998 + b"\r\n") * (size // 1000) + b".\r\n")
            replies.append((await read_reply(reader, 30)).strip())
        writer.write(b"QUIT\r\n")
        writer.close()
        return replies

    try:
        server = case.server("--spool-dir", str(spool))
        try:
            replies = asyncio.run(client(server.port))
            log = [line for line in server.output.splitlines() if "not stored" in line]
            crashes = server.output.count("Unhandled") + server.output.count("Traceback")
        finally:
            server.stop()
        for size, reply in zip(("2 MiB", "2 MiB", "2 MiB", "1 KiB"), replies, strict=True):
            say(f"  {size}: {reply.decode()}")
        say(f"  log lines 'message not stored': {len(log)}; tracebacks: {crashes}")
        if log:
            say(f"  e.g. {log[0].split('] ', 1)[-1]}")
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


# -- partition ------------------------------------------------------------------------------------


def partition(case: Case, quick: bool) -> None:
    say("partition: RabbitMQ behind a relay that goes silent; --amqp-timeout 9 (stall: 3 s)")
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        say("  skipped: no RabbitMQ on 127.0.0.1:5672")
        return
    import abuse_partition

    for label, stall in (("before (no stall detection)", 1e9), ("after", None)):
        waits = abuse_partition.run(case.work, stall)
        say(f"  {label}: " + ", ".join(f"{what} {seconds:.1f} s" for what, seconds in waits))


# -- memory ---------------------------------------------------------------------------------------


def memory(case: Case, quick: bool) -> None:
    import soak

    minutes = 1.0 if quick else 2.0
    say(f"memory: {minutes:g} minutes of hostile input (the 10-minute run: bench/soak.py)")
    report = soak.soak(minutes, 16, 10.0, 11)
    soak.verdict(report, 2.0, False)


CASES: dict[str, Callable[[Case, bool], None]] = {
    "drip": drip,
    "session": session,
    "oversize": oversize,
    "burst": burst,
    "fds": fds,
    "fullspool": fullspool,
    "partition": partition,
    "memory": memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", choices=[*CASES, []], default=[])
    parser.add_argument("--quick", action="store_true", help="fewer clients, shorter runs")
    args = parser.parse_args()
    names = args.cases or list(CASES)
    say(f"bench/abuse.py: {', '.join(names)}; {load()}")
    work = Path(tempfile.mkdtemp(prefix="slimta-abuse-"))
    try:
        for name in names:
            started = time.monotonic()
            CASES[name](Case(work), args.quick)
            say(f"  ({time.monotonic() - started:.0f} s; {load()})\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
