"""Throughput of the AMQP bus: SMTP clients -> twistd slimta --amqp -> RabbitMQ (confirms).

Usage (RabbitMQ on 127.0.0.1:5672, guest/guest)::

    python bench/amqp.py --connections 50 --messages 5000 --size 2048 [--also-maildir]

Starts ``twistd -n slimta --amqp ... --amqp-queue <fresh queue>`` on a free 127.0.0.1 port,
runs ``--connections`` SMTP clients (asyncio, in this process) that each send messages over
one connection (MAIL, RCPT and DATA pipelined when PIPELINING is offered), checks every reply
code, then counts the messages in the queue and deletes it. Bounded by ``--messages`` and
``--time-limit``. Prints one JSON object: msgs/s, latency percentiles, errors, queue count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
TWISTD = str(Path(sys.executable).parent / "twistd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def body_of(size: int) -> bytes:
    head = b"From: bench@client.example\r\nTo: sink@example.com\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    lines = max(0, (size - len(head)) // len(line))
    return head + line * lines


class Stats:
    def __init__(self) -> None:
        self.ok = 0
        self.refused = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []


async def expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    """Read one (possibly multi-line) reply; raise unless it has ``code``."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            break
    if not line.startswith(code):
        raise RuntimeError(b"".join(lines).decode(errors="replace").strip())
    return b"".join(lines)


async def client(port: int, body: bytes, budget: list[int], deadline: float, stats: Stats) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await expect(reader, b"220")
        writer.write(b"EHLO bench.client\r\n")
        pipelining = b"PIPELINING" in await expect(reader, b"250")
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            start = time.monotonic()
            commands = [b"MAIL FROM:<bench@client.example>\r\n", b"RCPT TO:<sink@example.com>\r\n"]
            if pipelining:
                writer.write(b"".join(commands) + b"DATA\r\n")
                await expect(reader, b"250")
                await expect(reader, b"250")
            else:
                for command in commands:
                    writer.write(command)
                    await expect(reader, b"250")
                writer.write(b"DATA\r\n")
            await expect(reader, b"354")
            writer.write(body + b".\r\n")
            try:
                await expect(reader, b"250")
                stats.ok += 1
                stats.latencies.append(time.monotonic() - start)
            except RuntimeError as e:
                stats.refused += 1
                if len(stats.errors) < 5:
                    stats.errors.append(str(e))
        writer.write(b"QUIT\r\n")
        await expect(reader, b"221")
    finally:
        writer.close()


async def load(port: int, connections: int, messages: int, size: int, limit: float) -> Stats:
    stats = Stats()
    budget = [messages]
    deadline = time.monotonic() + limit
    body = body_of(size)
    results = await asyncio.wait_for(
        asyncio.gather(
            *(client(port, body, budget, deadline, stats) for _ in range(connections)),
            return_exceptions=True,
        ),
        timeout=limit + 60,
    )
    for result in results:
        if isinstance(result, BaseException) and len(stats.errors) < 5:
            stats.errors.append(repr(result))
    return stats


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"twistd exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("twistd did not start listening")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--also-maildir", action="store_true", help="ChainBus: Maildir copy first")
    args = parser.parse_args()

    import pika

    try:  # the broker is there (the admin connection is opened again after the run)
        pika.BlockingConnection(pika.URLParameters(URL)).close()
    except pika.exceptions.AMQPConnectionError:
        raise SystemExit(
            "RabbitMQ is not running on 127.0.0.1:5672 (rabbitmq-server -detached)"
        ) from None
    queue = f"slimta-bench-{uuid.uuid4().hex[:10]}"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="slimta-bench-") as tmp:
        argv = [
            TWISTD, "-n", "--pidfile=", "--logfile", os.path.join(tmp, "twistd.log"),
            "slimta", "--listen", f"tcp:{port}:interface=127.0.0.1", "--hostname", "bench.test",
            "--accept-domain", "example.com", "--amqp", URL, "--amqp-queue", queue,
        ]  # fmt: skip
        if args.also_maildir:
            argv += ["--also-maildir", os.path.join(tmp, "copy")]
        server = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            wait_listening(port, server)
            started = time.monotonic()
            stats = asyncio.run(
                load(port, args.connections, args.messages, args.size, args.time_limit)
            )
            elapsed = time.monotonic() - started
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        admin = pika.BlockingConnection(pika.URLParameters(URL))
        channel = admin.channel()
        in_queue = channel.queue_declare(queue, passive=True).method.message_count
        channel.queue_delete(queue)
        admin.close()
    latencies = sorted(stats.latencies) or [0.0]
    print(
        json.dumps(
            {
                "bus": "amqp+maildir" if args.also_maildir else "amqp",
                "connections": args.connections,
                "size": args.size,
                "accepted": stats.ok,
                "refused": stats.refused,
                "seconds": round(elapsed, 2),
                "msgs_per_s": round(stats.ok / elapsed, 1) if elapsed else 0,
                "latency_ms_p50": round(latencies[len(latencies) // 2] * 1000, 1),
                "latency_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
                "in_queue": in_queue,
                "errors": stats.errors,
            }
        )
    )


if __name__ == "__main__":
    main()
