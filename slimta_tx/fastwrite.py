"""Write-through for plain TCP: send at once when nothing is queued, as asyncio does.

Twisted's ``transport.write`` never sends at once: it queues, registers for writability, and
sends on the next reactor turn. In a lockstep SMTP session that is one extra reactor turn and
two ``epoll_ctl`` calls per reply. When the transport is a plain TCP connection with nothing
queued, sending straight away is safe (the kernel keeps the order) and saves all of that; any
part the socket does not take, and every other case (TLS, a queue, a closing connection, a
test transport), goes through ``transport.write`` as before.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["write"]


def write(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, straight to its socket when that keeps the order."""
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and transport.producer is None
        and getattr(transport, "_tempDataLen", 1) == 0
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # Twisted notices the error on its own write and reports it as usual
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)
