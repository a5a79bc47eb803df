"""A blocking raw-socket SMTP client for tests that need control over every byte sent."""

from __future__ import annotations

import socket

from slimta_tx.testing import parse_replies


class WireClient:
    """Send exact bytes; read whole replies (multi-line replies joined)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[str, str]:
        """The next complete reply; raises ConnectionError if the server closed first."""
        while True:
            end = _reply_end(self._buffer)
            if end is not None:
                raw, self._buffer = self._buffer[:end], self._buffer[end:]
                [parsed] = parse_replies(raw)
                return parsed
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection; unread: {self._buffer!r}")
            self._buffer += chunk

    def command(self, line: str | bytes) -> tuple[str, str]:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        """True once the server has closed (reads EOF or a reset), after any pending replies."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def start_transaction(
        self, sender: str = "a@example.com", rcpt: str = "b@example.com"
    ) -> None:
        """Banner, EHLO, MAIL, RCPT, DATA: leaves the session in DATA after the 354."""
        assert self.reply()[0] == "220"
        assert self.command("EHLO client.test")[0] == "250"
        assert self.command(f"MAIL FROM:<{sender}>")[0] == "250"
        assert self.command(f"RCPT TO:<{rcpt}>")[0] == "250"
        assert self.command("DATA")[0] == "354"


def _reply_end(buffer: bytes) -> int | None:
    """Index just after the last line of the first complete reply in ``buffer``."""
    start = 0
    while True:
        newline = buffer.find(b"\r\n", start)
        if newline < 0:
            return None
        line = buffer[start:newline]
        if (len(line) >= 4 and line[3:4] == b" ") or len(line) == 3:
            return newline + 2
        start = newline + 2


def refuses(port: int) -> bool:
    """True once nothing listens on 127.0.0.1:``port``.

    A reset means the port is closing right now (the connection sat in the backlog of a
    listener being closed): not yet, ask again.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False
