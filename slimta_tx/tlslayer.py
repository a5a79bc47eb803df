"""The server's TLS layer after STARTTLS: Python's ``ssl`` (``SSLObject`` over memory BIOs).

Twisted's ``startTLS`` puts its ``TLSMemoryBIOProtocol`` (pyOpenSSL through cffi) between the
connection and the session. Per lockstep command that layer costs, in Python: a ``bio_write``,
two ``SSL_read`` calls into fresh 32 KiB buffers (the second ending in a ``WantReadError``
raised through pyOpenSSL's error handling), a ``bio_read`` into another 32 KiB buffer; per reply
an ``SSL_write``, a ``bio_read`` and then the connection's write buffer and ``doWrite``. The
same steps with the standard library's ``ssl`` module are C calls on buffers sized to the data.

:func:`start_tls` is what STARTTLS calls. It installs :class:`StdlibTLS` the way Twisted
installs its own layer (the connection's ``protocol``, ``TLS``, ``getHandle``,
``ISSLTransport``), so everything above sees the same transport: ``write`` encrypts, the
session gets ``handshakeCompleted``, ``loseConnection`` sends a close_notify first. It is used
when the context is a :class:`~slimta_tx.tls.ServerTLS` that has a standard-library form (see
:meth:`ServerTLS.stdlib_context <slimta_tx.tls.ServerTLS.stdlib_context>`: not with client
certificates, whose "keep the connection even when the certificate does not verify" needs
pyOpenSSL's verify callback) and the transport is a TCP connection (directly or under the PROXY
layer); anything else goes to ``transport.startTLS`` as before.

Encrypted output goes straight to the socket when the connection has nothing queued (what
:mod:`slimta_tx.fastwrite` does for plain TCP); what the socket does not take, and every other
case, goes through the connection's write buffer.
"""

from __future__ import annotations

import ssl
from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from slimta_tx import fastwrite

__all__ = ["StdlibTLS", "start_tls"]

_READ_SIZE = 65536


def _connection_beneath(transport: Any) -> Any:
    """The TCP connection under ``transport`` (seen through the PROXY layer), or None."""
    if isinstance(transport, tcp.Connection):
        return transport
    if getattr(type(transport), "passes_writes_through", False):
        below = getattr(transport, "transport", None)
        if isinstance(below, tcp.Connection):
            return below
    return None


def start_tls(transport: Any, context: Any) -> None:
    """Start server-side TLS on ``transport`` with ``context`` (a STARTTLS or implicit TLS).

    The standard-library layer when it can serve (see the module docstring), else
    ``transport.startTLS(context)``.
    """
    make = getattr(context, "stdlib_context", None)
    connection = _connection_beneath(transport)
    ssl_context = make() if make is not None and connection is not None else None
    if ssl_context is None or connection.TLS or not connection.connected:
        transport.startTLS(context)
        return
    StdlibTLS(connection, ssl_context).install()


class StdlibTLS:
    """The TLS layer of one server connection (installed by :func:`start_tls`)."""

    #: Replies may wait for the end of the reactor pass (:func:`slimta_tx.fastwrite.flush_later`).
    coalesces_writes = True

    def __init__(self, connection: tcp.Connection, context: ssl.SSLContext) -> None:
        self.connection = connection
        self.wrapped: Any = connection.protocol
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = context.wrap_bio(
            self.incoming, self.outgoing, server_side=True
        )
        self.handshake_done = False
        self._before_handshake: list[bytes] = []
        self._closing = False  # loseConnection asked for
        self._reason: Failure | None = None  # why TLS failed, for the session's connectionLost
        # Twisted's TLS layer is a protocol and the session's transport; users of either side
        # (the PROXY layer, the log) look at these.
        self.transport = connection
        self.wrappedProtocol = self.wrapped

    def install(self) -> None:
        connection: Any = self.connection
        producer, streaming = connection.producer, connection.streamingProducer
        if producer is not None:
            connection.unregisterProducer()
        connection.protocol = self
        connection.getHandle = self.getHandle
        connection.getPeerCertificate = self.getPeerCertificate
        directlyProvides(connection, ISSLTransport)
        connection.TLS = True
        if producer is not None:
            FileDescriptor.registerProducer(connection, producer, streaming)

    # -- ISSLTransport (through the connection) ------------------------------------------------

    def getHandle(self) -> ssl.SSLObject | None:
        return self.tls

    def getPeerCertificate(self) -> Any:
        tls = self.tls
        return tls.getpeercert(binary_form=True) if tls is not None else None

    # -- from the connection: the IProtocol side -----------------------------------------------

    def makeConnection(self, transport: Any) -> None:  # pragma: no cover - installed, not made
        raise RuntimeError("StdlibTLS is installed on a connection, not connected")

    def dataReceived(self, data: bytes) -> None:
        tls = self.tls
        if tls is None:
            return
        self.incoming.write(data)
        if not self.handshake_done:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send_pending()
                return
            except (ssl.SSLError, OSError, ValueError) as e:
                self._fail(e)
                return
            self.handshake_done = True
            self._send_pending()
            if IHandshakeListener.providedBy(self.wrapped):
                self.wrapped.handshakeCompleted()
            waiting, self._before_handshake = self._before_handshake, []
            for chunk in waiting:
                self.write(chunk)
            if self.tls is None or not self.connection.connected:
                return
        chunks: list[bytes] = []
        read, incoming = tls.read, self.incoming
        while True:
            try:
                chunk = read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except (ssl.SSLError, OSError, ValueError) as e:
                self._deliver(chunks)
                self._fail(e)
                return
            if not chunk:  # the client's close_notify: answer it and close
                self._deliver(chunks)
                self.loseConnection()
                return
            chunks.append(chunk)
            if not incoming.pending and not tls.pending():
                break  # all read: another read would only say "want read" (an exception)
        if self.outgoing.pending:
            self._send_pending()  # what reading produced (a TLS 1.3 key update, an alert)
        self._deliver(chunks)

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and self.connection.connected and self.wrapped is not None:
            self.wrapped.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def connectionLost(self, reason: Failure | None = None) -> None:
        tls, self.tls = self.tls, None
        wrapped, self.wrapped = self.wrapped, None
        if tls is None and wrapped is None:
            return
        if self._reason is not None:
            reason = self._reason  # TLS failed: the session logs why
        elif reason is None:
            reason = Failure(ConnectionDone())
        if wrapped is not None:
            wrapped.connectionLost(reason)

    # -- from the session: the transport side --------------------------------------------------

    def write(self, data: bytes) -> None:
        tls = self.tls
        if tls is None or self._closing or not data:
            return
        if not self.handshake_done:
            self._before_handshake.append(data)  # sent once the handshake is done
            return
        try:
            tls.write(data)
        except (ssl.SSLError, OSError, ValueError) as e:
            self._fail(e)
            return
        self._send_pending()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send a close_notify after what was written, then close (as Twisted's layer does)."""
        if self._closing:
            return
        if self._before_handshake and self.tls is not None:
            self._before_handshake = []  # never encrypted: the client never finished TLS
        self._closing = True
        tls = self.tls
        if tls is not None and self.handshake_done:
            try:
                tls.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass  # the close_notify is written (or cannot be): close either way
            self._send_pending()
        FileDescriptor.loseConnection(self.connection)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        FileDescriptor.registerProducer(self.connection, producer, streaming)

    def unregisterProducer(self) -> None:
        FileDescriptor.unregisterProducer(self.connection)

    # -- internals ---------------------------------------------------------------------------

    def _send_pending(self) -> None:
        data = self.outgoing.read()
        if not data:
            return
        connection: Any = self.connection
        if not connection.connected:
            return
        data = fastwrite.send_now(connection, data)  # straight to the socket if nothing waits
        if not data:
            return
        FileDescriptor.write(connection, data)

    def _fail(self, error: BaseException) -> None:
        """TLS failed (a bad handshake, a bad record): send any alert, then close."""
        if self._reason is None:
            self._reason = Failure(error)
        self._send_pending()
        self._closing = True
        FileDescriptor.loseConnection(self.connection)
