"""Validator hooks: the registry, the way they are called, and the built-in relay rule.

A validator is ``func(session, reply, *extra)``. It sees the reply the server proposes and may
change it (``reply.set("550", "No such user", "5.1.1")``); it may return a value, a Deferred or
a coroutine. An exception is logged and becomes ``451 4.3.0`` for that command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from slimta_tx.address import split_address
from slimta_tx.envelope import Session
from slimta_tx.policy import Policy
from slimta_tx.reply import Reply

__all__ = ["HOOKS", "Validators", "relay_allowed"]

Validator = Callable[..., Any]

# The seed's commands, plus the points a real edge decides at.
HOOKS = frozenset(
    {
        "BANNER",
        "EHLO",
        "MAIL",
        "RCPT",
        "DATA",
        "HAVE_DATA",
        "RSET",
        "QUIT",
        "STARTTLS",
        "AUTH",
        "UNKNOWN",
    }
)
_ALIASES = {"HELO": "EHLO"}


class Validators:
    """One validator per hook, as in ``slimta.edge.smtp.set_validator``."""

    log = Logger()

    def __init__(self) -> None:
        self._hooks: dict[str, Validator] = {}

    def set(self, command: str, func: Validator | None) -> None:
        name = _ALIASES.get(command.upper(), command.upper())
        if name not in HOOKS:
            raise ValueError(f"no validator hook named {command!r}; hooks: {sorted(HOOKS)}")
        if func is None:
            self._hooks.pop(name, None)
        else:
            self._hooks[name] = func

    def get(self, command: str) -> Validator | None:
        return self._hooks.get(command)

    def __contains__(self, command: str) -> bool:
        return command in self._hooks

    def run(self, command: str, session: Session, reply: Reply, *extra: Any) -> Deferred[Reply]:
        """Call the hook (if any); fire with ``reply`` as the hook left it."""
        func = self._hooks.get(command)
        if func is None:
            return succeed(reply)
        d: Deferred[Any] = maybeDeferred(func, session, reply, *extra)

        def failed(failure: Failure) -> Reply:
            self.log.failure(
                "validator for {command} raised; replying 451", failure, command=command
            )
            return Reply("451", "Temporary local problem, try again later", "4.3.0")

        return d.addCallbacks(lambda _: reply, failed)


def relay_allowed(policy: Policy, session: Session, recipient: str) -> bool:
    """No open relay: trusted network, authenticated client, or an accepted domain."""
    if session.authed or policy.is_trusted(session.address[0]):
        return True
    if recipient.lower() == "postmaster":  # RFC 5321 4.5.1: always accepted.
        return True
    _, domain = split_address(recipient)
    return bool(domain) and policy.is_accepted_domain(domain)
