"""The core SMTP commands, one function each, dispatched through :data:`HANDLERS`.

Each handler gets the protocol and the argument text. It proposes a reply, lets the
command's validator change it (possibly asynchronously, through ``run_step``), and finishes
with ``finish_command``, which also moves the state machine on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from slimta_tx import chunking, parameters, pipelining
from slimta_tx.address import ArgumentError, parse_mail_argument, parse_rcpt_argument
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply
from slimta_tx.state import State
from slimta_tx.validators import relay_allowed

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = ["HANDLERS"]

Handler = Callable[["ESMTPServerProtocol", str], None]

# Refusals of MAIL that are policy, not syntax: the smtp.reject event's reason.
_MAIL_REFUSALS = {"552": "size", "530": "auth_required"}
_DATA = State.DATA  # a module global: State.DATA goes through EnumType.__getattr__


def _greeting(proto: ESMTPServerProtocol, argument: str, verb: str) -> None:
    name = argument.strip()
    if not name or " " in name:
        proto.refuse(Reply("501", f"Syntax: {verb} hostname", "5.5.4"))
        return
    policy, session = proto.policy, proto.session
    previous = (session.ehlo_as, session.extended_smtp)
    extended = verb != "HELO"  # EHLO, or LMTP's LHLO (RFC 2033)
    if extended:
        keywords = proto.edge.ehlo_keywords(session)
        reply = Reply("250", "\n".join([f"{policy.hostname} Hello {name}", *keywords]))
    else:
        reply = Reply("250", f"{policy.hostname} Hello {name}")

    def done(reply: Reply) -> None:
        if reply.code.startswith("2"):
            proto.reset_transaction()
            session.ehlo_as, session.extended_smtp = name, extended
        else:
            # A refused greeting changes nothing (RFC 5321 4.1.4).
            session.ehlo_as, session.extended_smtp = previous
        proto.finish_command(verb, reply, enhanced=not reply.code.startswith("2"))

    # Validators tell EHLO from HELO by this flag, as in python-slimta.
    session.extended_smtp = extended
    proto.run_step(proto.call_hook("EHLO", reply, name), done)


def ehlo(proto: ESMTPServerProtocol, argument: str) -> None:
    _greeting(proto, argument, "EHLO")


def helo(proto: ESMTPServerProtocol, argument: str) -> None:
    _greeting(proto, argument, "HELO")


def lhlo(proto: ESMTPServerProtocol, argument: str) -> None:
    """LMTP's greeting (RFC 2033 4.1): EHLO's reply; see :mod:`slimta_tx.lmtp`."""
    _greeting(proto, argument, "LHLO")


def mail(proto: ESMTPServerProtocol, argument: str) -> None:
    try:
        parsed = parse_mail_argument(argument)
    except ArgumentError as e:
        proto.finish_command("MAIL", e.reply)
        return
    problem = parameters.check_mail(proto, parsed)
    if problem is None:
        problem = proto.edge.check_mail(proto.session, parsed)
    if problem is not None:
        reason = _MAIL_REFUSALS.get(problem.code)
        if reason == "auth_required" and proto.edge.tls_required(proto.session):
            reason = "tls_required"
        if reason is not None:  # (syntax errors are logged by refuse())
            proto.edge.events.rejected(proto.session, reason, problem)
        proto.finish_command("MAIL", problem)
        return
    reply = Reply("250", f"Sender <{parsed.address}> ok", "2.1.0")

    def done(reply: Reply) -> None:
        if reply.code.startswith("2"):
            proto.session.envelope = Envelope.start(proto.session, parsed.address, parsed.params)
        proto.finish_command("MAIL", reply)

    proto.run_step(proto.call_hook("MAIL", reply, parsed.address, parsed.params), done)


def rcpt(proto: ESMTPServerProtocol, argument: str) -> None:
    envelope = proto.session.envelope
    assert envelope is not None
    try:
        parsed = parse_rcpt_argument(argument, utf8=envelope.smtputf8)
    except ArgumentError as e:
        proto.finish_command("RCPT", e.reply)
        return
    if parsed.params:
        problem = parameters.check_rcpt(proto, parsed)
        if problem is not None:
            proto.finish_command("RCPT", problem)
            return
    if len(envelope.recipients) >= proto.policy.max_recipients:
        refusal = Reply("452", "Too many recipients", "4.5.3")
        proto.edge.events.rejected(proto.session, "recipients", refusal)
        proto.finish_command("RCPT", refusal)
        return
    reply = Reply("250", f"Recipient <{parsed.address}> ok", "2.1.5")
    relay_denied = not relay_allowed(
        proto.policy, proto.session, parsed.address, trusted=proto.client_trusted()
    )
    if relay_denied:
        reply.set("554", f"<{parsed.address}>: Relay access denied", "5.7.1")

    def done(reply: Reply) -> None:
        if reply.code.startswith("2"):
            envelope.add_recipient(parsed.address, parsed.params)
        elif relay_denied and reply.code == "554":
            proto.edge.events.rejected(proto.session, "relay", reply)
        proto.finish_command("RCPT", reply)

    proto.run_step(proto.call_hook("RCPT", reply, parsed.address, parsed.params), done)


def data(proto: ESMTPServerProtocol, argument: str) -> None:
    if argument.strip():
        proto.refuse(Reply("501", "Syntax: DATA", "5.5.4"))
        return
    envelope = proto.session.envelope
    if envelope is not None and envelope.body == "BINARYMIME":
        # RFC 3030: a BINARYMIME message goes by BDAT only.
        proto.refuse(Reply("503", "BODY=BINARYMIME needs BDAT, not DATA", "5.5.1"))
        return
    reply = Reply("354", "End data with <CR><LF>.<CR><LF>")

    def done(reply: Reply) -> None:
        if pipelining.content_before_354(proto):
            return  # content (or commands) before the reply: 554 5.5.0, closing
        proto.finish_command("DATA", reply)
        if proto.state is _DATA:
            proto.start_data()

    proto.run_step(proto.call_hook("DATA", reply), done)


def rset(proto: ESMTPServerProtocol, argument: str) -> None:
    if argument.strip():
        proto.refuse(Reply("501", "Syntax: RSET", "5.5.4"))
        return
    proto.reset_transaction()
    reply = Reply("250", "Ok", "2.0.0")
    proto.run_step(proto.call_hook("RSET", reply), lambda r: proto.finish_command("RSET", r))


def noop(proto: ESMTPServerProtocol, argument: str) -> None:
    proto.send(Reply("250", "Ok", "2.0.0"))


def quit_(proto: ESMTPServerProtocol, argument: str) -> None:
    edge = proto.edge
    if proto.milters is None and "QUIT" not in edge.validators.active:
        # Nothing can change the 221: sent as rendered once per edge, then the close.
        proto.send_wire(edge.bye_wire())
        proto.close_after_flush()
        return
    reply = Reply("221", f"{proto.policy.hostname} Bye", "2.0.0")

    def done(reply: Reply) -> None:
        proto.send(reply)
        if not reply.closes_connection:
            proto.close_after_flush()

    proto.run_step(proto.call_hook("QUIT", reply), done)


def vrfy(proto: ESMTPServerProtocol, argument: str) -> None:
    if not argument.strip():
        proto.refuse(Reply("501", "Syntax: VRFY address", "5.5.4"))
        return
    proto.send(
        Reply("252", "Cannot VRFY user, but will accept message and attempt delivery", "2.0.0")
    )


def help_(proto: ESMTPServerProtocol, argument: str) -> None:
    verbs = sorted(
        {
            *(verb for verb in proto.handlers if verb != "BDAT"),  # LHLO for LMTP
            *(["BDAT"] if proto.policy.chunking else []),
            *proto.edge.extra_commands,
        }
    )
    text = "Supported commands:\n" + " ".join(verbs) + "\nSee RFC 5321"
    proto.send(Reply("214", text, "2.0.0"))


HANDLERS: dict[str, Handler] = {
    "BDAT": chunking.bdat,
    "EHLO": ehlo,
    "HELO": helo,
    "MAIL": mail,
    "RCPT": rcpt,
    "DATA": data,
    "RSET": rset,
    "NOOP": noop,
    "QUIT": quit_,
    "VRFY": vrfy,
    "HELP": help_,
}
