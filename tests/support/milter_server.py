"""A scripted milter (the filter side of the Sendmail 8 protocol) for the tests.

It frames packets with its own code (not the client's codec), records every packet the MTA
sends, negotiates what the test says, and answers each event with what the test's script
returns: a list of raw response packets (:func:`resp`), ``CLOSE`` (drop the connection),
``HANG`` (never answer) or None (the usual ``continue`` where a reply is due).

:class:`MemoryConnector` connects the client to one of these in memory: what one side writes
reaches the other on the next turn of the test's :class:`~twisted.internet.task.Clock`
(``settle(clock)`` runs those turns), so whole sessions, timeouts included, run without
sockets or real time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from slimta_tx.milter.client import MilterConnection
from slimta_tx.milter.config import Milter

CLOSE = "close"
HANG = "hang"

# Event -> the protocol flag that says "no reply" for it.
NO_REPLY = {
    b"C": 0x1000,
    b"H": 0x2000,
    b"M": 0x4000,
    b"R": 0x8000,
    b"T": 0x10000,
    b"U": 0x20000,
    b"L": 0x80,
    b"N": 0x40000,
    b"B": 0x80000,
}


def resp(command: bytes, data: bytes = b"") -> bytes:
    """One response packet, framed."""
    return struct.pack(">I", len(data) + 1) + command + data


def z(*parts: bytes | str) -> bytes:
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


CONTINUE = resp(b"c")
ACCEPT = resp(b"a")
REJECT = resp(b"r")
TEMPFAIL = resp(b"t")
DISCARD = resp(b"d")
PROGRESS = resp(b"p")
SKIP = resp(b"s")


def replycode(text: str) -> bytes:
    return resp(b"y", z(text))


def add_header(name: str, value: str) -> bytes:
    return resp(b"h", z(name, value))


def insert_header(index: int, name: str, value: str) -> bytes:
    return resp(b"i", struct.pack(">I", index) + z(name, value))


def change_header(index: int, name: str, value: str) -> bytes:
    return resp(b"m", struct.pack(">I", index) + z(name, value))


def split_strings(data: bytes) -> list[bytes]:
    parts = data.split(b"\0")
    return parts[:-1] if parts and parts[-1] == b"" else parts


Script = Callable[["ScriptedMilter", bytes, bytes], Any]


@dataclass
class MilterScript:
    """What the scripted milter negotiates and how it answers."""

    version: int = 6
    actions: int = 0x1FF
    protocol: int = 0
    macro_lists: dict[int, str] = field(default_factory=dict)
    on_event: Script | None = None
    optneg_reply: bytes | None = None  # raw packet(s) instead of the usual answer


class ScriptedMilter(Protocol):
    def __init__(self, script: MilterScript) -> None:
        self.script = script
        self.buffer = b""
        self.received: list[tuple[bytes, bytes]] = []
        self.macros: dict[bytes, dict[str, str]] = {}
        self.closed = False
        self.hanging = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack(">I", self.buffer[:4])
            if len(self.buffer) < 4 + length:
                return
            command = self.buffer[4:5]
            payload = self.buffer[5 : 4 + length]
            self.buffer = self.buffer[4 + length :]
            self.handle(command, payload)
            if self.closed:
                return

    def handle(self, command: bytes, data: bytes) -> None:
        self.received.append((command, data))
        if command == b"O":
            self.negotiate()
            return
        if command == b"D":
            strings = [s.decode() for s in split_strings(data[1:])]
            self.macros[data[:1]] = dict(zip(strings[::2], strings[1::2], strict=False))
            return
        if command in (b"A", b"Q", b"K") or self.hanging:
            return
        answer = self.script.on_event(self, command, data) if self.script.on_event else None
        if answer == CLOSE:
            self.closed = True
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if answer == HANG:
            self.hanging = True
            return
        if answer is None:
            if self.script.protocol & NO_REPLY.get(command, 0):
                return
            answer = [CONTINUE]
        if isinstance(answer, bytes):
            answer = [answer]
        assert self.transport is not None
        self.transport.write(b"".join(answer))

    def negotiate(self) -> None:
        assert self.transport is not None
        if self.script.optneg_reply is not None:
            self.transport.write(self.script.optneg_reply)
            return
        lists = b"".join(
            struct.pack(">I", stage) + z(names) for stage, names in self.script.macro_lists.items()
        )
        data = struct.pack(">III", self.script.version, self.script.actions, self.script.protocol)
        self.transport.write(resp(b"O", data + lists))

    def events(self) -> list[bytes]:
        """The commands received, macros and negotiation left out."""
        return [c for c, _ in self.received if c not in (b"D", b"O")]

    def data_of(self, command: bytes) -> list[bytes]:
        return [d for c, d in self.received if c == command]


class _MemoryTransport:
    """One direction of an in-memory connection: writes arrive at the peer on the next turn
    of the clock; a registered producer is paused while more than ``high_water`` bytes wait."""

    disconnecting = False

    def __init__(self, clock: Clock, high_water: int) -> None:
        self.clock = clock
        self.peer: Protocol | None = None
        self.owner: Protocol | None = None
        self.other: _MemoryTransport | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.high_water = high_water
        self.producer: Any = None
        self.paused = False
        self.connected = True
        self.written = 0
        self.reading_paused = False

    def write(self, data: bytes) -> None:
        if not self.connected or self.disconnecting:
            return
        self.pending.append(data)
        self.pending_size += len(data)
        self.written += len(data)
        if self.producer is not None and self.pending_size > self.high_water and not self.paused:
            self.paused = True
            self.producer.pauseProducing()
        if len(self.pending) == 1:
            self.clock.callLater(0, self._deliver)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def _deliver(self) -> None:
        if self.other is not None and self.other.reading_paused:
            self.clock.callLater(1, self._deliver)  # a reader that stopped: try each second
            return
        data, self.pending, self.pending_size = b"".join(self.pending), [], 0
        if data and self.peer is not None and self.connected:
            self.peer.dataReceived(data)
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        if self.disconnecting:
            self._close()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def loseConnection(self) -> None:
        if not self.connected:
            return
        self.disconnecting = True
        if not self.pending:
            self.clock.callLater(0, self._close)

    def abortConnection(self) -> None:
        self.pending = []
        self._close()

    def _close(self) -> None:
        if not self.connected:
            return
        self.connected = False
        other = self.other
        assert other is not None
        other.connected = False
        from twisted.internet.error import ConnectionDone

        for protocol in (self.owner, self.peer):
            if protocol is not None:
                protocol.connectionLost(Failure(ConnectionDone()))

    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def stopProducing(self) -> None:
        self.abortConnection()

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


class MemoryConnector:
    """``open_connection`` for :class:`~slimta_tx.milter.client.Connector`: each call builds a
    :class:`ScriptedMilter` from ``scripts[milter.name]`` and connects it in memory.

    ``down`` names milters that refuse connections; ``high_water`` is the client-side socket
    buffer (bytes) past which the client is told to pause writing.
    """

    def __init__(
        self,
        clock: Clock,
        scripts: dict[str, MilterScript],
        down: set[str] | None = None,
        high_water: int = 1 << 20,
    ) -> None:
        self.clock = clock
        self.scripts = scripts
        self.down = down or set()
        self.high_water = high_water
        self.servers: dict[str, list[ScriptedMilter]] = {}
        self.connects = 0

    def __call__(self, milter: Milter) -> Deferred[MilterConnection]:
        self.connects += 1
        if milter.name in self.down:
            return fail(ConnectionRefusedError("Connection refused"))
        client = MilterConnection(self.clock)
        server = ScriptedMilter(self.scripts[milter.name])
        to_server = _MemoryTransport(self.clock, self.high_water)
        to_client = _MemoryTransport(self.clock, 1 << 30)
        to_server.peer, to_server.owner, to_server.other = server, client, to_client
        to_client.peer, to_client.owner, to_client.other = client, server, to_server
        client.makeConnection(to_server)  # type: ignore[arg-type]
        server.makeConnection(to_client)  # type: ignore[arg-type]
        self.servers.setdefault(milter.name, []).append(server)
        return succeed(client)

    def server(self, name: str, index: int = -1) -> ScriptedMilter:
        return self.servers[name][index]


def settle(clock: Clock, rounds: int = 10_000) -> None:
    """Run every call due now (deliveries, callbacks), until none is left (bounded)."""
    for _ in range(rounds):
        due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        if not due:
            return
        clock.advance(0)
    raise AssertionError("the in-memory connection never settled")
