"""A TCP relay on 127.0.0.1 that can turn into a black hole: a silent network partition.

While ``partitioned`` is set, bytes in both directions are swallowed and nothing is closed (no
FIN, no RST), as when a link between two hosts goes dark. New connections are accepted and then
hear nothing either. ``heal()`` forwards again (bytes swallowed meanwhile stay lost, as on a
real partition that outlasted TCP's patience: those connections are dead for their peers).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class _Side(Protocol):
    def __init__(self, relay: BlackholeRelay) -> None:
        self.relay = relay
        self.peer: _Side | None = None
        self.pending: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.relay.partitioned:
            return
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
        self.relay.sides.discard(self)


class BlackholeRelay:
    """Relay ``127.0.0.1:<port>`` to ``target_port``; ``partition()`` and ``heal()``."""

    def __init__(self, reactor: Any, target_port: int) -> None:
        self.reactor = reactor
        self.target_port = target_port
        self.partitioned = False
        self.sides: set[_Side] = set()
        self.port: Any = None

    async def start(self) -> int:
        self.port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: self._accept())
        )
        return int(self.port.getHost().port)

    def _accept(self) -> _Side:
        inside = _Side(self)
        outside = _Side(self)
        inside.peer, outside.peer = outside, inside
        self.sides.update((inside, outside))
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.target_port)

        def connected(_: object) -> None:
            for data in inside.pending:
                outside.transport.write(data)  # type: ignore[union-attr]
            inside.pending.clear()

        def failed(_: Failure) -> None:
            if inside.transport is not None:
                inside.transport.loseConnection()

        connectProtocol(endpoint, outside).addCallbacks(connected, failed)
        return inside

    def partition(self) -> None:
        self.partitioned = True

    def heal(self) -> None:
        self.partitioned = False

    async def stop(self) -> None:
        for side in list(self.sides):
            if side.transport is not None:
                side.transport.abortConnection()  # type: ignore[attr-defined]
        if self.port is not None:
            await self.port.stopListening()
