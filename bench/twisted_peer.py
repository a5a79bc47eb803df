"""The Twisted peer: ``twisted.mail.smtp.ESMTP`` as it ships, delivering to nowhere.

The smallest honest use of Twisted's own server: an ``IMessageDelivery`` that accepts every
sender and recipient and an ``IMessage`` that drops each line. Everything else (line parsing,
dot-unstuffing, timeouts, replies) is ``twisted.mail.smtp`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class DiscardMessage:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Deferred[None]:
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class DiscardDelivery:
    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: from bench by localhost"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Callable[[], DiscardMessage]:
        return DiscardMessage


class DiscardESMTPFactory(ServerFactory):
    """Builds one ``ESMTP`` per connection with the discarding delivery."""

    def buildProtocol(self, addr: IAddress) -> smtp.ESMTP:
        proto = smtp.ESMTP()
        proto.delivery = DiscardDelivery()
        proto.host = b"localhost"
        proto.factory = self
        return proto
