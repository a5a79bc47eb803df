"""bench/abuse.py's partition case: RabbitMQ behind a relay that goes silent (no RST, no answers).

``make_bus`` is the ``--bus`` factory the twistd under test loads (this directory is put on its
``PYTHONPATH``): an AmqpBus to the relay, with stall detection as the case asks.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

from hostile import Server

MESSAGE = (
    b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
    b"Subject: partition\r\n\r\nhello\r\n.\r\n"
)


def make_bus(config: Any, reactor: Any) -> Any:
    from slimta_tx.bus.amqp import AmqpBus

    stall = os.environ.get("ABUSE_STALL")
    return AmqpBus(
        os.environ["ABUSE_AMQP_URL"],
        queue=os.environ["ABUSE_QUEUE"],
        reactor=reactor,
        timeout=9.0,
        connect_timeout=3.0,
        stall_timeout=float(stall) if stall else None,
    )


class Relay:
    """127.0.0.1:<port> -> 127.0.0.1:5672, until ``partitioned``: then bytes go nowhere."""

    def __init__(self) -> None:
        self.partitioned = False
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.partitioned:
                    writer.write(data)
        except OSError:
            pass

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self.writers += [writer, up_writer]
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the case is over

    async def stop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()


async def _send(port: int) -> tuple[float, bytes]:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(MESSAGE)
    reply = b""
    for _ in range(6):  # banner, EHLO, MAIL, RCPT, 354, the reply after the dot
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line or line[3:4] != b"-":
                break
        reply = line
    writer.close()
    return time.monotonic() - start, reply[:9]


def run(work: Path, stall: float | None) -> list[tuple[str, float]]:
    """Seconds a client waited: before the partition, the first client after it, and a new
    client once the partition is 4 s old."""

    async def scenario() -> list[tuple[str, float]]:
        relay = Relay()
        relay_port = await relay.start()
        queue = f"slimta-bench-{uuid.uuid4().hex[:10]}"
        env = {
            "ABUSE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{relay_port}/%2F",
            "ABUSE_QUEUE": queue,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
            ),
        }
        if stall is not None:
            env["ABUSE_STALL"] = str(stall)
        server = await asyncio.to_thread(
            Server, ["--bus", "abuse_partition:make_bus"], str(work), env
        )
        try:
            before, reply = await _send(server.port)
            assert reply.startswith(b"250"), reply
            relay.partitioned = True
            first = asyncio.ensure_future(_send(server.port))
            await asyncio.sleep(4)
            late, late_reply = await _send(server.port)
            first_wait, first_reply = await first
            return [
                ("healthy", before),
                (f"first after the partition ({first_reply[:3].decode()})", first_wait),
                (f"a new client 4 s in ({late_reply[:3].decode()})", late),
            ]
        finally:
            server.stop()
            await relay.stop()
            _delete(queue)

    return asyncio.run(scenario())


def _delete(queue: str) -> None:
    import pika

    connection = pika.BlockingConnection(
        pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()
