"""One milter within one SMTP session: its state, what it negotiated, and the wait for its
answers.

The session driver (:mod:`~slimta_tx.milter.session`) decides what to send and what an answer
means; a :class:`Link` knows whether its milter wants an event, opens and negotiates the
connection (:meth:`Link.negotiate`) and waits for the milter's decision (:meth:`Link.answer`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from slimta_tx.milter import codec
from slimta_tx.milter.client import MilterConnection
from slimta_tx.milter.codec import Negotiated, ProtocolError, Response
from slimta_tx.milter.config import Milter
from slimta_tx.milter.macros import DEFAULT_MACROS, MacroContext, macro_values
from slimta_tx.reply import Reply

__all__ = ["EVENT_NAMES", "Link", "connect_facts"]

# Events a milter speaking an older protocol version does not know.
_SINCE_VERSION = {codec.SMFIC_UNKNOWN: 3, codec.SMFIC_DATA: 4}


@dataclass
class Link:
    """One milter within one SMTP session."""

    milter: Milter
    connection: MilterConnection | None = None
    negotiated: Negotiated | None = None
    # "new" (not connected yet), "open", "done" (accepted the session), "refused" (rejected
    # the session: ``verdict`` applies), "failed" (default action: ``verdict`` or none).
    state: str = "new"
    verdict: Reply | None = None
    in_transaction: bool = False  # MAIL was sent and the transaction not ended
    message_done: bool = False  # accepted (or discarded) this message: no more events for it
    skip: bytes | None = None  # SMFIR_SKIP: no more events of this type for now
    # The last macro values sent and their encoding (DATA, end of headers and end of
    # message all send the queue id alone: encoded once a message).
    _macro_values: list[tuple[str, str]] = field(default_factory=list, repr=False)
    _macro_data: bytes = field(default=b"", repr=False)

    def flag(self, bit: int) -> bool:
        return self.negotiated is not None and bool(self.negotiated.protocol & bit)

    def wants(self, command: bytes) -> bool:
        if self.state != "open" or self.negotiated is None:
            return False
        return self.negotiated.version >= _SINCE_VERSION.get(command, 2)

    def macros(self, command: bytes) -> tuple[str, ...]:
        assert self.negotiated is not None
        return self.negotiated.macros.get(command, DEFAULT_MACROS.get(command, ()))

    def macro_packet(self, command: bytes, context: MacroContext) -> bytes:
        """The macros of event ``command`` that have a value now, as a packet (or b"")."""
        values = macro_values(self.macros(command), context)
        if not values:
            return b""
        if values != self._macro_values:
            self._macro_values = values
            self._macro_data = codec.macro_data(values)
        return codec.packet(codec.SMFIC_MACRO, command + self._macro_data)

    @property
    def in_message(self) -> bool:
        """In a transaction whose message this milter still wants to hear about."""
        return self.in_transaction and not self.message_done

    async def negotiate(self, connection: MilterConnection) -> None:
        """Take ``connection`` and negotiate on it (MilterFailure or ProtocolError if that
        fails)."""
        self.connection = connection
        connection.send(codec.optneg_packet())
        command, data = await connection.next_packet(self.milter.connect_timeout)
        self.negotiated = codec.parse_optneg(command, data)

    async def answer(self, clock: IReactorTime, command: bytes, timeout: float) -> Response:
        """The milter's decision on ``command``: progress waits on; quarantine or a
        modification here is a ProtocolError (only the end of the message may have them)."""
        connection = self.connection
        assert connection is not None
        deadline = clock.seconds() + timeout
        while True:
            left = max(deadline - clock.seconds(), 0.001)
            response = codec.parse_response(*await connection.next_packet(left))
            if response.kind == "progress":
                deadline = clock.seconds() + timeout
                continue
            if response.kind == "quarantine":
                raise ProtocolError("quarantine outside the end of the message")
            if not response.is_final:
                raise ProtocolError(f"{response.kind} is only allowed at the end of the message")
            return response


def connect_facts(address: tuple[str, int], session: Any) -> tuple[str, bytes, int, str]:
    """Host name (or ``[address]``), family, port and address for the CONNECT event."""
    ip, port = address[0], int(address[1])
    try:
        parsed = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        if ip.startswith("/") or not ip:
            return ("localhost", codec.FAMILY_UNIX, 0, ip or "local")
        return (ip, codec.FAMILY_UNKNOWN, 0, "")
    family = codec.FAMILY_INET6 if parsed.version == 6 else codec.FAMILY_INET
    name = session.reverse_name or f"[{ip}]"
    return (name, family, port, ip)


EVENT_NAMES = {
    codec.SMFIC_OPTNEG: "negotiation",
    codec.SMFIC_CONNECT: "connect",
    codec.SMFIC_HELO: "HELO",
    codec.SMFIC_MAIL: "MAIL",
    codec.SMFIC_RCPT: "RCPT",
    codec.SMFIC_DATA: "DATA",
    codec.SMFIC_HEADER: "header",
    codec.SMFIC_EOH: "end of headers",
    codec.SMFIC_BODY: "body",
    codec.SMFIC_BODYEOB: "end of message",
    codec.SMFIC_UNKNOWN: "unknown command",
}
