"""The command state machine as a table: which command is allowed where, and what follows.

Pure data and two small functions; the protocol asks :func:`check` before running a command
and :func:`after` for the state that follows its reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from slimta_tx.reply import Reply

__all__ = ["COMMANDS", "UNIMPLEMENTED", "State", "after", "check"]


class State(str, Enum):
    GREETING = "greeting"  # the banner is not out yet
    CONNECTED = "connected"  # banner sent, no successful EHLO/HELO
    READY = "ready"  # greeted, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # message body arriving
    CHUNKING = "chunking"  # BDAT chunks accepted, the LAST one not yet (RFC 3030)
    BDAT = "bdat"  # the octets of one BDAT chunk arriving
    CLOSED = "closed"

    # str's hash, in C: Enum's own __hash__ is a Python function, and the protocol looks
    # states up in sets and dicts several times per command. (Equal values hash alike.)
    __hash__ = str.__hash__


_ANY = frozenset({State.CONNECTED, State.READY, State.MAIL, State.RCPT, State.CHUNKING})
_IN_TRANSACTION = frozenset({State.MAIL, State.RCPT, State.CHUNKING})


@dataclass(frozen=True)
class CommandSpec:
    allowed: frozenset[State]
    # The 503 text for each state the command is not allowed in.
    refusals: tuple[tuple[frozenset[State], str], ...] = ()


_NEED_HELO = "Send EHLO or HELO first"

COMMANDS: dict[str, CommandSpec] = {
    "EHLO": CommandSpec(_ANY),
    "HELO": CommandSpec(_ANY),
    "LHLO": CommandSpec(_ANY),  # LMTP's greeting (RFC 2033)
    "MAIL": CommandSpec(
        frozenset({State.READY}),
        (
            (frozenset({State.CONNECTED}), _NEED_HELO),
            (_IN_TRANSACTION, "Nested MAIL command"),
        ),
    ),
    "RCPT": CommandSpec(
        frozenset({State.MAIL, State.RCPT}),
        (
            (frozenset({State.CONNECTED}), _NEED_HELO),
            (frozenset({State.READY}), "Need MAIL before RCPT"),
            (frozenset({State.CHUNKING}), "RCPT not allowed after BDAT"),
        ),
    ),
    "DATA": CommandSpec(
        frozenset({State.RCPT}),
        (
            (frozenset({State.CONNECTED}), _NEED_HELO),
            (frozenset({State.READY}), "Need MAIL before DATA"),
            (frozenset({State.MAIL}), "Need RCPT before DATA (no valid recipients)"),
            (frozenset({State.CHUNKING}), "DATA not allowed after BDAT"),  # RFC 3030 MUST
        ),
    ),
    # BDAT is allowed everywhere by the table: its octets follow whatever the reply, so the
    # handler always reads them and only then refuses (see slimta_tx/chunking.py).
    "BDAT": CommandSpec(_ANY),
    "RSET": CommandSpec(_ANY),
    "NOOP": CommandSpec(_ANY),
    "QUIT": CommandSpec(_ANY),
    "VRFY": CommandSpec(_ANY),
    "HELP": CommandSpec(_ANY),
    "STARTTLS": CommandSpec(
        frozenset({State.READY}),
        (
            (frozenset({State.CONNECTED}), _NEED_HELO),
            (_IN_TRANSACTION, "STARTTLS not allowed during a transaction"),
        ),
    ),
    "AUTH": CommandSpec(
        frozenset({State.READY}),
        (
            (frozenset({State.CONNECTED}), _NEED_HELO),
            (_IN_TRANSACTION, "AUTH not allowed during a transaction"),
        ),
    ),
}

# Known to SMTP but not offered here: 502 5.5.1 rather than 500 5.5.2.
UNIMPLEMENTED = frozenset(
    {
        "EXPN",
        "TURN",
        "ETRN",
        "ATRN",
        "SEND",
        "SOML",
        "SAML",
        "VERB",
        "ONEX",
        "XCLIENT",
        "STARTTLS",
        "AUTH",
    }
)


# A verb a feature registers without a row of its own: allowed whenever a session is open.
_DEFAULT_SPEC = CommandSpec(_ANY)


def check(state: State, verb: str) -> Reply | None:
    """None if ``verb`` may run in ``state``, else the 503 reply."""
    spec = COMMANDS.get(verb, _DEFAULT_SPEC)
    if state in spec.allowed:
        return None
    for states, text in spec.refusals:
        if state in states:
            return Reply("503", text, "5.5.1")
    return Reply("503", "Bad sequence of commands", "5.5.1")


_NEXT = {"MAIL": State.MAIL, "RCPT": State.RCPT, "DATA": State.DATA}
# Module globals: ``State.X`` goes through EnumType.__getattr__ (~70 ns a time).
_CONNECTED, _READY = State.CONNECTED, State.READY


def after(state: State, verb: str, reply: Reply) -> State:
    """The state that follows ``verb``'s ``reply`` (sent in ``state``)."""
    first = reply.code[:1]
    ok = first == "2" or first == "3"
    if verb == "EHLO" or verb == "HELO" or verb == "LHLO":
        # A refused greeting leaves the state as it was (RFC 5321 4.1.4).
        return _READY if ok else state
    if verb == "RSET":
        return _CONNECTED if state is _CONNECTED else _READY
    if not ok:
        return state
    return _NEXT.get(verb, state)
