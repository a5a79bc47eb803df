"""A tiny driver for protocol tests: an edge on a StringTransport with a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from slimta_tx import Policy, SmtpEdge
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.testing import RecordingBus, connect, parse_replies


class ReplyReader:
    """Feeds bytes to ``self.proto`` and parses what ``self.transport`` received."""

    proto: ESMTPServerProtocol
    transport: StringTransport

    def read(self) -> list[tuple[str, str]]:
        data = self.transport.value()
        self.transport.clear()
        return parse_replies(data)

    def send(self, data: bytes) -> list[tuple[str, str]]:
        self.proto.dataReceived(data)
        return self.read()

    def cmd(self, line: str) -> tuple[str, str]:
        replies = self.send(line.encode("utf-8") + b"\r\n")
        assert len(replies) == 1, replies
        return replies[0]


class Driver(ReplyReader):
    """Feeds bytes to one session and returns the replies each feed produced."""

    def __init__(
        self,
        bus: Any = None,
        policy: Policy | None = None,
        peer: tuple[str, int] = ("192.0.2.1", 40000),
        edge: SmtpEdge | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.bus = bus if bus is not None else RecordingBus()
        self.edge = edge or SmtpEdge(
            self.bus,
            policy or Policy(hostname="mx.test", accepted_domains=("example.com",)),
            reactor=self.clock,
        )
        proto, transport = connect(self.edge, peer)
        assert isinstance(proto, ESMTPServerProtocol)
        self.proto: ESMTPServerProtocol = proto
        self.transport: StringTransport = transport
        self.writes: list[bytes] = []
        self._wrap_writes()
        self.banner = self.read()

    def _wrap_writes(self) -> None:
        original = self.transport.write

        def write(data: bytes) -> None:
            self.writes.append(data)
            original(data)

        self.transport.write = write  # type: ignore[method-assign]

    def codes(self, data: bytes) -> list[str]:
        return [code for code, _ in self.send(data)]

    def greet(self) -> None:
        assert self.cmd("EHLO client.test")[0] == "250"

    def start_data(self, sender: str = "a@sender.test", rcpt: str = "u@example.com") -> None:
        self.greet()
        assert self.codes(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()) == [
            "250",
            "250",
            "354",
        ]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)
