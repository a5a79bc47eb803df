"""smtplib clients that speak as a load balancer would: a PROXY header first, then SMTP.

``ProxiedSMTP(header)`` sends ``header`` as soon as it is connected (then STARTTLS works as
usual); ``ProxiedSMTP_SSL(header)`` sends it in clear and only then starts TLS, as HAProxy does
in front of a port-465 listener.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from typing import Any


class ProxiedSMTP(smtplib.SMTP):
    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.proxy_header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.proxy_header)
        return sock


class ProxiedSMTP_SSL(smtplib.SMTP_SSL):
    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.proxy_header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> ssl.SSLSocket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.sendall(self.proxy_header)
        return self.context.wrap_socket(sock, server_hostname=self._host)  # type: ignore[attr-defined]
