"""What bench/abuse.py and bench/soak.py share: a ``twistd slimta`` in a subprocess on
127.0.0.1, its memory, and a client that sends hostile input.

Loopback only, bounded: every client stops at its deadline and every read has a timeout.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
_PORT_LINE = re.compile(r"SmtpEdge starting on (\d+)")
READ_TIMEOUT = 5.0


class Server:
    """``twistd -n slimta ARGS`` listening on a free 127.0.0.1 port; output kept in memory."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: str,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        command: Sequence[str] | None = None,
        listen: str = "tcp:0:interface=127.0.0.1",
    ) -> None:
        argv = [*(command or [TWISTD]), "-n", "slimta", "--listen", listen]
        argv += list(args)
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.port = self._wait_port()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def _wait_port(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.lines:
                    match = _PORT_LINE.search(line)
                    if match:
                        return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)  # bounded poll of the log while twistd starts
        self.stop()
        raise SystemExit("twistd did not start:\n" + self.output)

    @property
    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def rss(self) -> float:
        """Resident memory in MiB (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def memory_map(self) -> dict[str, float]:
        """Resident MiB by kind of mapping: the main heap (brk), other anonymous memory
        (malloc's mmapped arenas and big blocks, thread stacks), and files (code, libraries)."""
        kinds = {"heap": 0.0, "anonymous": 0.0, "files": 0.0}
        kind = "files"
        for line in Path(f"/proc/{self.pid}/smaps").read_text().splitlines():
            fields = line.split()
            if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
                path = fields[5] if len(fields) > 5 else ""
                kind = "heap" if path == "[heap]" else "anonymous" if not path else "files"
                if path in ("[stack]", "[vvar]", "[vdso]", "[vsyscall]"):
                    kind = "anonymous"
            elif fields and fields[0] == "Rss:":
                kinds[kind] += int(fields[1]) / 1024
        return kinds

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


# -- hostile input ------------------------------------------------------------------------------

VERBS = [
    "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
    "HELP", "STARTTLS", "AUTH", "TURN", "ETRN", "XCLIENT", "GET", "POST",
]  # fmt: skip
# A TLS 1.2 ClientHello's record header and the start of its handshake, then random bytes:
# what a client that expects implicit TLS sends to a plain port.
TLS_HELLO = bytes.fromhex("16030100c8010000c40303")


def random_line(rng: random.Random) -> bytes:
    verb = rng.choice(VERBS)
    kind = rng.random()
    if kind < 0.3:
        argument = ""
    elif kind < 0.6:
        argument = rng.choice(["FROM:<a@b.test>", "TO:<u@example.com>", "x", "FROM:<>"])
        argument += " " + rng.choice(["", "SIZE=99999999999", "BODY=8BITMIME", "X=Y" * 50])
    elif kind < 0.8:
        argument = "".join(rng.choice("abc<>@.:= \t\x7f") for _ in range(rng.randint(1, 900)))
    else:
        return verb.encode() + b" " + rng.randbytes(rng.randint(1, 200)) + b"\r\n"
    return f"{verb} {argument}".encode("utf-8", "replace") + b"\r\n"


class Hostile:
    """Scenarios of hostile input, each one connection; ``stats`` counts what happened."""

    def __init__(self, port: int, rng: random.Random, tls: ssl.SSLContext | None) -> None:
        self.port = port
        self.rng = rng
        self.tls = tls
        self.stats: Counter[str] = Counter()
        self.scenarios: list[tuple[float, Callable[[], Any]]] = [
            (3, self.commands),
            (2, self.junk),
            (1, self.nuls),
            (1, self.huge_line),
            (1, self.bare_newlines),
            (1, self.tls_hello),
            (2, self.transaction),
            (1, self.bdat),
            (1, self.abrupt),
            (1 if tls else 0, self.starttls),
        ]

    async def one(self) -> None:
        weights = [w for w, _ in self.scenarios]
        _, scenario = self.rng.choices(self.scenarios, weights=weights)[0]
        name = scenario.__name__
        try:
            await asyncio.wait_for(scenario(), 30)
            self.stats[name] += 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            self.stats[f"{name} (cut)"] += 1

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        return reader, writer

    async def _drain_replies(self, reader: asyncio.StreamReader, seconds: float = 0.2) -> None:
        try:
            while await asyncio.wait_for(reader.read(65536), seconds):
                pass
        except asyncio.TimeoutError:
            pass

    async def _close(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
        if self.rng.random() < 0.5:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # abrupt: RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        else:
            writer.write(b"QUIT\r\n")
            await self._drain_replies(reader, 0.1)
        writer.close()

    async def commands(self) -> None:
        reader, writer = await self._open()
        for _ in range(self.rng.randint(1, 30)):
            writer.write(random_line(self.rng))
        await writer.drain()
        await self._drain_replies(reader)
        await self._close(writer, reader)

    async def junk(self) -> None:
        reader, writer = await self._open()
        writer.write(self.rng.randbytes(self.rng.randint(1, 65536)))
        await writer.drain()
        await self._drain_replies(reader)
        await self._close(writer, reader)

    async def nuls(self) -> None:
        reader, writer = await self._open()
        writer.write(b"EHLO \0\0\0\r\n" + b"\0" * self.rng.randint(1, 20000) + b"\r\nNOOP\r\n")
        await writer.drain()
        await self._drain_replies(reader)
        await self._close(writer, reader)

    async def huge_line(self) -> None:
        reader, writer = await self._open()
        writer.write(b"MAIL FROM:<" + b"a" * 300_000)
        await writer.drain()
        await self._drain_replies(reader, 0.1)
        await self._close(writer, reader)

    async def bare_newlines(self) -> None:
        reader, writer = await self._open()
        pieces = [b"\r", b"\n", b"\n.\n", b"\r.\r", b"NOOP", b"EHLO x", b" "]
        writer.write(b"".join(self.rng.choice(pieces) for _ in range(self.rng.randint(1, 500))))
        await writer.drain()
        await self._drain_replies(reader)
        await self._close(writer, reader)

    async def tls_hello(self) -> None:
        reader, writer = await self._open()
        writer.write(TLS_HELLO + self.rng.randbytes(200))
        await writer.drain()
        await self._drain_replies(reader)
        await self._close(writer, reader)

    async def abrupt(self) -> None:
        reader, writer = await self._open()
        if self.rng.random() < 0.5:
            await reader.readline()
        await self._close(writer, reader)

    def _body(self) -> bytes:
        size = self.rng.choice([200, 2000, 20_000, 300_000]) if self.rng.random() < 0.1 else 1500
        line = b"x" * 76 + b"\r\n"
        return b"Subject: soak\r\n\r\n" + line * (size // len(line))

    async def transaction(self) -> None:
        reader, writer = await self._open()
        await reader.readline()
        envelope = b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
        writer.write(envelope)
        body = self._body()
        if self.rng.random() < 0.3:  # gone in the middle of the body
            writer.write(body[: self.rng.randint(0, len(body))])
            await writer.drain()
            writer.close()
            return
        writer.write(body + b".\r\n")
        await writer.drain()
        await self._drain_replies(reader)
        await self._close(writer, reader)

    async def bdat(self) -> None:
        reader, writer = await self._open()
        await reader.readline()
        writer.write(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<u@example.com>\r\n")
        for _ in range(self.rng.randint(1, 5)):
            size = self.rng.randint(0, 5000)
            claimed = size if self.rng.random() < 0.8 else self.rng.randint(0, 10_000)
            writer.write(f"BDAT {claimed}\r\n".encode() + self.rng.randbytes(size))
        if self.rng.random() < 0.5:
            writer.write(b"BDAT 10 LAST\r\n0123456789")
        await writer.drain()
        await self._drain_replies(reader)
        await self._close(writer, reader)

    async def starttls(self) -> None:
        assert self.tls is not None
        reader, writer = await self._open()
        await reader.readline()
        writer.write(b"EHLO c.test\r\n")
        await self._drain_replies(reader, 0.1)
        writer.write(b"STARTTLS\r\n")
        if not (await reader.readline()).startswith(b"220"):
            writer.close()
            return
        await writer.start_tls(self.tls, server_hostname="localhost")
        writer.write(random_line(self.rng) + b"EHLO c.test\r\n" + random_line(self.rng))
        await writer.drain()
        await self._drain_replies(reader, 0.1)
        await self._close(writer, reader)


async def hostile_load(
    port: int,
    workers: int,
    seconds: float,
    seed: int,
    tls: ssl.SSLContext | None = None,
    only: str | None = None,
) -> Counter[str]:
    """``workers`` concurrent clients, each running scenarios back to back for ``seconds``
    (``only``: that scenario alone)."""
    deadline = time.monotonic() + seconds
    stats: Counter[str] = Counter()

    async def worker(n: int) -> None:
        hostile = Hostile(port, random.Random(seed * 1000 + n), tls)
        if only:
            hostile.scenarios = [(1, f) for _, f in hostile.scenarios if f.__name__ == only]
            if not hostile.scenarios:
                raise SystemExit(f"no scenario {only!r}")
        while time.monotonic() < deadline:
            await hostile.one()
        stats.update(hostile.stats)

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return stats


def client_tls_context(ca_pem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem)
    return context


def make_certificates(directory: Path) -> tuple[Path, Path, str]:
    """A trustme CA and a leaf for ``localhost``: (cert path, key path, CA PEM)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key, ca.cert_pem.bytes().decode()
