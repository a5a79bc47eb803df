"""First-day checks of ``twistd slimta``: a bad listener or Maildir is one line, exit 1.

Each check raises ``usage.UsageError`` with a message naming the option and its value, which
:class:`slimta_tx.tap.Options` prints as one line (exit status 1) instead of the traceback the
same mistake would give later, in ``makeService`` or at the first message. Nothing here binds a
port or creates a directory: the checks only read.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.python import usage

__all__ = ["check_bus_paths", "check_listener", "check_maildir"]

_INT = re.compile(r"invalid literal for int\(\) with base 10: (.*)")
_KEYWORD = re.compile(r"got an unexpected keyword argument (.*)")
_TCP_KINDS = ("tcp", "tcp6", "ssl")


def _reason(error: BaseException) -> str:
    """A short reason from what Twisted's endpoint parsers raise."""
    text = str(error).splitlines()[0] if str(error) else ""
    if match := _INT.match(text):
        return f"{match.group(1)} is not a number"
    if match := _KEYWORD.search(text):
        return f"unknown parameter {match.group(1)}"
    if text.startswith("Unknown endpoint type"):
        return (
            f"{text[0].lower()}{text[1:]} (tcp:PORT, tcp6:PORT, unix:PATH, ssl:..., systemd:...)"
        )
    if isinstance(error, IndexError):
        return "no such inherited socket"
    return text or type(error).__name__


def check_listener(option: str, description: str) -> None:
    """Parse a listener description as ``twistd slimta`` will (without binding it).

    With the reactor ``twistd`` runs (installed before the plugin's options are parsed), so
    an endpoint plugin that looks at its reactor while parsing sees the real one.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from slimta_tx.proxy import ProxyConfigError, proxied_description

    try:
        inner = proxied_description(description) or description
    except ProxyConfigError as e:
        raise usage.UsageError(f"--{option} {e}") from None
    try:
        serverFromString(reactor, inner)
    except Exception as e:
        raise usage.UsageError(f"--{option} {description}: {_reason(e)}") from None
    kind, _, rest = inner.partition(":")
    kind = kind.lower()
    fields = [field for field in rest.split(":") if field]
    if kind in _TCP_KINDS:
        positional = [field for field in fields if "=" not in field]
        named = [field[5:] for field in fields if field.startswith("port=")]
        port = (positional or named or [""])[0]
        if port.isdigit() and not 0 <= int(port) <= 65535:
            raise usage.UsageError(
                f"--{option} {description}: port {port} is not between 0 and 65535"
            )
    if kind == "unix" and fields:
        path = next((f[8:] for f in fields if f.startswith("address=")), fields[0])
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise usage.UsageError(f"--{option} {description}: no such directory: {directory}")


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_maildir(option: str, path: str) -> None:
    """A Maildir that exists must be one we can write; one that does not must be creatable.

    ``os.access`` answers for the running user, and for a read-only file system even as root.
    """
    from slimta_tx.bus.maildir.store import SUBDIRS

    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise usage.UsageError(f"--{option} {path}: exists and is not a directory")
        for sub in SUBDIRS:
            here = os.path.join(full, sub)
            if os.path.exists(here) and not os.path.isdir(here):
                raise usage.UsageError(
                    f"--{option} {path}: {here} is in the way (not a directory)"
                )
            target = here if os.path.exists(here) else full
            if not _writable(target):
                raise usage.UsageError(
                    f"--{option} {path}: {target} is not writable (uid {os.getuid()}); "
                    "every message would get 451"
                )
        return
    ancestor = os.path.dirname(full)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise usage.UsageError(
            f"--{option} {path}: cannot create it: {ancestor} is a file, not a directory"
        )
    if not _writable(ancestor):
        raise usage.UsageError(
            f"--{option} {path}: cannot create it: {ancestor} is not writable (uid {os.getuid()})"
        )


def check_bus_paths(config: Any) -> None:
    """The Maildirs ``twistd slimta`` will write: ``--maildir`` when it is the bus, and every
    ``--also-maildir``."""
    if not any(config.get(name) for name in ("bus", "amqp", "relay", "relay-lmtp")):
        check_maildir("maildir", config["maildir"])
    for path in config.get("also-maildir") or ():
        check_maildir("also-maildir", path)
