"""Validator hooks: the registry, the way they are called, and the built-in relay rule.

A validator is ``func(session, reply, *extra)``. It sees the reply the server proposes and may
change it (``reply.set("550", "No such user", "5.1.1")``); it may return None, a Deferred or a
coroutine (a returned :class:`Reply` replaces the proposed one). An exception is logged and
becomes ``451 4.3.0`` for that command (``421 4.3.0`` for ``BANNER``: a greeting cannot be 451).

Built-in policies (:mod:`slimta_tx.policies`) register *checks* with :meth:`Validators.add_check`.
At each hook the checks run first, in the order they were added, each only while the reply is
still positive (once one has refused, the rest are skipped: no DNS lookup for a client already
refused); then the user's validator (``set_validator``) runs, and sees the reply as the checks
left it, as it sees the relay rule's ``554 5.7.1``.

Validators can also be methods of a class, as in python-slimta: subclass :class:`SmtpValidators`
and give the class (one instance per session) or an instance to ``SmtpEdge.set_validators``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from slimta_tx.address import split_address
from slimta_tx.envelope import Session
from slimta_tx.policy import Policy
from slimta_tx.reply import Reply

__all__ = ["HOOKS", "SmtpValidators", "Validators", "relay_allowed"]

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
    """One validator per hook, as in ``slimta.edge.smtp.set_validator``, plus policy checks."""

    log = Logger()

    def __init__(self) -> None:
        self._hooks: dict[str, Validator] = {}
        self._checks: dict[str, list[Validator]] = {}
        #: The hooks with a validator or checks; the protocol skips the others without a call.
        self.active: frozenset[str] = frozenset()

    def _changed(self) -> None:
        self.active = frozenset(
            [*self._hooks, *(name for name, checks in self._checks.items() if checks)]
        )

    def set(self, command: str, func: Validator | None) -> None:
        name = _hook_name(command)
        if func is None:
            self._hooks.pop(name, None)
        else:
            self._hooks[name] = _fitted(func)
        self._changed()

    def get(self, command: str) -> Validator | None:
        return self._hooks.get(command)

    def add_check(self, command: str, func: Validator, first: bool = False) -> None:
        """Add a policy check at ``command``; checks run in order, before the validator.

        ``first=True`` puts it before the checks already there.
        """
        checks = self._checks.setdefault(_hook_name(command), [])
        if first:
            checks.insert(0, func)
        else:
            checks.append(func)
        self._changed()

    def remove_check(self, command: str, func: Validator) -> None:
        checks = self._checks.get(_hook_name(command), [])
        if func in checks:
            checks.remove(func)
        self._changed()

    def checks(self, command: str) -> list[Validator]:
        return list(self._checks.get(_hook_name(command), ()))

    def __contains__(self, command: str) -> bool:
        return command in self._hooks or bool(self._checks.get(command))

    def run_quick(
        self, command: str, session: Session, reply: Reply, *extra: Any
    ) -> Reply | Deferred[Reply]:
        """Like :meth:`run`, but with nothing registered return ``reply`` itself, at once.

        Most commands on a busy edge have no hook; skipping the Deferred saves real time.
        """
        if command not in self._hooks and not self._checks.get(command):
            return reply
        return self.run(command, session, reply, *extra)

    def run(self, command: str, session: Session, reply: Reply, *extra: Any) -> Deferred[Reply]:
        """Call the checks and the hook (if any); fire with ``reply`` as they left it."""
        funcs = [*self._checks.get(command, ())]
        func = self._hooks.get(command)
        if not funcs and func is None:
            return succeed(reply)
        return Deferred.fromCoroutine(self._run(command, funcs, func, session, reply, extra))

    async def _run(
        self,
        command: str,
        checks: list[Validator],
        validator: Validator | None,
        session: Session,
        reply: Reply,
        extra: tuple[Any, ...],
    ) -> Reply:
        for check in checks:
            if not reply.is_positive:
                break
            reply = await self._call(command, check, session, reply, extra)
        if validator is not None:
            reply = await self._call(command, validator, session, reply, extra)
        return reply

    async def _call(
        self,
        command: str,
        func: Validator,
        session: Session,
        reply: Reply,
        extra: tuple[Any, ...],
    ) -> Reply:
        try:
            result = await maybeDeferred(func, session, reply, *extra)
        except Exception:
            self.log.failure(
                "validator {func} for {command} raised; replying with a temporary failure",
                Failure(),
                func=getattr(func, "__qualname__", repr(func)),
                command=command,
            )
            if command == "BANNER":
                return Reply("421", "Temporary local problem, try again later", "4.3.0")
            return Reply("451", "Temporary local problem, try again later", "4.3.0")
        if isinstance(result, Reply) and result is not reply:
            reply.set(result.code, result.message, result.enhanced_status_code)
        return reply


def _fitted(func: Validator) -> Validator:
    """``func``, or a wrapper passing it only the extras its signature takes.

    The extras after ``(session, reply)`` grew over time (BANNER gets the client address, AUTH
    the identity and mechanism); a validator written as ``func(session, reply)`` keeps working
    instead of raising (which would fail closed on every connection).
    """
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables
        return func
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return func
    positional = sum(
        p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in parameters
    )
    if positional < 2:
        return func  # let the call fail loudly: not a validator

    @functools.wraps(func)
    def fitted(session: Session, reply: Reply, *extra: Any) -> Any:
        return func(session, reply, *extra[: positional - 2])

    return fitted


def _hook_name(command: str) -> str:
    name = _ALIASES.get(command.upper(), command.upper())
    if name not in HOOKS:
        raise ValueError(f"no validator hook named {command!r}; hooks: {sorted(HOOKS)}")
    return name


class SmtpValidators:
    """Validators as methods, in python-slimta's style.

    Override any of ``handle_banner``, ``handle_ehlo``, ``handle_starttls``, ``handle_auth``,
    ``handle_mail``, ``handle_rcpt``, ``handle_data``, ``handle_have_data``, ``handle_rset``,
    ``handle_quit`` and ``handle_unknown``; each gets ``(reply, *extra)`` (the same extras as the
    function validators) and may change the reply or return a Deferred or coroutine.
    ``self.session`` is the session. Give ``SmtpEdge.set_validators`` the class to get one
    instance per session (state kept on ``self`` is per connection), or an instance to share it
    (then ``self.session`` is the session of the current call only).
    """

    session: Session

    def __init__(self, session: Session | None = None) -> None:
        if session is not None:
            self.session = session

    @classmethod
    def hooks(cls) -> list[str]:
        """The hooks this class overrides."""
        return [
            hook
            for hook in sorted(HOOKS)
            if getattr(cls, _method_name(hook)) is not getattr(SmtpValidators, _method_name(hook))
        ]

    def handle_banner(self, reply: Reply, address: tuple[str, int]) -> Any:
        pass

    def handle_ehlo(self, reply: Reply, ehlo_as: str) -> Any:
        pass

    def handle_starttls(self, reply: Reply, *extra: Any) -> Any:
        pass

    def handle_auth(self, reply: Reply, *extra: Any) -> Any:
        pass

    def handle_mail(self, reply: Reply, sender: str, params: dict[str, str | None]) -> Any:
        pass

    def handle_rcpt(self, reply: Reply, recipient: str, params: dict[str, str | None]) -> Any:
        pass

    def handle_data(self, reply: Reply) -> Any:
        pass

    def handle_have_data(self, reply: Reply, envelope: Any) -> Any:
        pass

    def handle_rset(self, reply: Reply) -> Any:
        pass

    def handle_quit(self, reply: Reply) -> Any:
        pass

    def handle_unknown(self, reply: Reply, line: str) -> Any:
        pass


def _method_name(hook: str) -> str:
    return "handle_" + hook.lower()


def install_validators(
    validators: Validators, target: SmtpValidators | type[SmtpValidators]
) -> None:
    """Register each ``handle_*`` method ``target`` overrides as that hook's validator."""
    cls = target if isinstance(target, type) else type(target)
    key = f"validators.{id(target)}"

    def bind(hook: str) -> Validator:
        method_name = _method_name(hook)

        def call(session: Session, reply: Reply, *extra: Any) -> Any:
            if isinstance(target, type):
                instance = session.extra.get(key)
                if instance is None:
                    instance = session.extra[key] = target(session)
            else:
                instance = target
                instance.session = session
            return getattr(instance, method_name)(reply, *extra)

        call.__qualname__ = f"{cls.__qualname__}.{method_name}"
        return call

    for hook in cls.hooks():
        validators.set(hook, bind(hook))


def relay_allowed(
    policy: Policy, session: Session, recipient: str, trusted: bool | None = None
) -> bool:
    """No open relay: trusted network, authenticated client, or an accepted domain.

    ``trusted``: ``policy.is_trusted(session.address[0])`` when the caller knows it already
    (the protocol asks once per session).
    """
    if trusted is None:
        trusted = policy.is_trusted(session.address[0])
    if session.authed or trusted:
        return True
    if recipient.lower() == "postmaster":  # RFC 5321 4.5.1: always accepted.
        return True
    _, domain = split_address(recipient)
    return bool(domain) and policy.is_accepted_domain(domain)
