"""What one milter is: where it listens and how the edge treats it (:class:`Milter`).

The text form (``--milter`` and :func:`parse_milter`) is Postfix's ``smtpd_milters`` syntax for
one milter::

    inet:HOST:PORT                      inet:127.0.0.1:11332, inet:[::1]:8891
    unix:PATH                           unix:/run/opendkim/opendkim.sock
    ENDPOINT,NAME=VALUE,...             inet:127.0.0.1:8891,default_action=accept
    { ENDPOINT, NAME=VALUE, ... }       Postfix's braces, spaces allowed

with the settings ``connect_timeout``, ``command_timeout``, ``content_timeout`` (seconds, or a
number with ``s``, ``m`` or ``h``), ``default_action`` (``tempfail``, ``accept`` or
``reject``), ``max_connections`` (at most this many connections to the milter at once) and
``name`` (the label in logs and in the envelope's record).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["DEFAULT_ACTIONS", "Milter", "parse_milter"]

DEFAULT_ACTIONS = ("tempfail", "accept", "reject")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smh]?)")


@dataclass(frozen=True)
class Milter:
    """One milter application and the edge's settings for it.

    :param endpoint: ``inet:HOST:PORT`` or ``unix:PATH``.
    :param connect_timeout: seconds to get a connection (a free slot, the TCP or unix
        connect) and the negotiation's answer.
    :param command_timeout: seconds to wait for the answer to each SMTP event.
    :param content_timeout: seconds the message stage (headers, body, end of message) may
        take; each ``SMFIR_PROGRESS`` from the milter starts it again.
    :param default_action: what a milter that is down, slow or broken means for the
        session: ``tempfail`` (4xx to the transaction's commands), ``accept`` (go on without
        it) or ``reject`` (5xx).
    :param max_connections: connections open to this milter at once, over all sessions;
        further sessions wait for a free one (within ``connect_timeout``).
    :param name: the label in logs and in ``envelope.milter_actions`` (default: the endpoint).
    """

    endpoint: str
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0
    default_action: str = "tempfail"
    max_connections: int = 100
    name: str = ""

    def __post_init__(self) -> None:
        endpoint_address(self.endpoint)  # raises ValueError when malformed
        if self.default_action not in DEFAULT_ACTIONS:
            raise ValueError(
                f"default_action must be tempfail, accept or reject, not {self.default_action!r}"
            )
        for setting in ("connect_timeout", "command_timeout", "content_timeout"):
            if not getattr(self, setting) > 0:
                raise ValueError(f"{setting} must be more than 0 seconds")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not self.name:
            object.__setattr__(self, "name", self.endpoint)

    @property
    def address(self) -> tuple[str, str, int]:
        """``("inet", host, port)`` or ``("unix", path, 0)``."""
        return endpoint_address(self.endpoint)


def endpoint_address(endpoint: str) -> tuple[str, str, int]:
    kind, _, rest = endpoint.partition(":")
    if kind == "unix":
        if not rest:
            raise ValueError(f"unix:PATH needs a path: {endpoint!r}")
        return ("unix", rest, 0)
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"inet:HOST:PORT needs a host and a port: {endpoint!r}")
        return ("inet", host, int(port))
    raise ValueError(f"a milter is inet:HOST:PORT or unix:PATH, not {endpoint!r}")


def _seconds(name: str, text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{name} takes seconds (e.g. 30 or 30s or 2m), not {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_milter(text: str) -> Milter:
    """A :class:`Milter` from its text form (see the module's docstring); ValueError says what
    is wrong in one line."""
    spec = text.strip()
    if spec.startswith("{"):
        if not spec.endswith("}"):
            raise ValueError(f"unbalanced braces in {text!r}")
        spec = spec[1:-1]
    items = [item.strip() for item in re.split(r"[,\s]+", spec) if item.strip()]
    if not items:
        raise ValueError("empty milter definition")
    milter = Milter(items[0])
    for item in items[1:]:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value:
            raise ValueError(f"milter setting {item!r} is not NAME=VALUE")
        if key in ("connect_timeout", "command_timeout", "content_timeout"):
            timeouts: dict[str, Any] = {key: _seconds(key, value)}
            milter = replace(milter, **timeouts)
        elif key == "default_action":
            milter = replace(milter, default_action=value.lower())
        elif key == "max_connections":
            if not value.isdigit():
                raise ValueError(f"max_connections takes a whole number, not {value!r}")
            milter = replace(milter, max_connections=int(value))
        elif key == "name":
            milter = replace(milter, name=value)
        else:
            raise ValueError(
                f"unknown milter setting {key!r} (known: connect_timeout, command_timeout, "
                "content_timeout, default_action, max_connections, name)"
            )
    return milter
