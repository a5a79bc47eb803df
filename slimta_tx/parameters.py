"""MAIL and RCPT parameters: which are allowed on this session, and whether their values are.

The handlers in :mod:`slimta_tx.commands` parse the argument (:mod:`slimta_tx.address`) and then
ask :func:`check_mail` or :func:`check_rcpt`; None means every parameter is allowed and valid,
otherwise the reply says which is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimta_tx.address import MailArgument
from slimta_tx.dsn import DsnError, parse_envid, parse_notify, parse_orcpt, parse_ret
from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.protocol import ESMTPServerProtocol

__all__ = ["check_mail", "check_rcpt"]

_BODY_VALUES = ("7BIT", "8BITMIME")
_DSN_MAIL = frozenset({"RET", "ENVID"})
_DSN_RCPT = frozenset({"NOTIFY", "ORCPT"})


def check_mail(proto: ESMTPServerProtocol, parsed: MailArgument) -> Reply | None:
    """The parameters of ``MAIL``: SIZE, BODY, SMTPUTF8, DSN's RET and ENVID, REQUIRETLS, and
    those features register (AUTH=)."""
    params = parsed.params
    if not params:
        return None
    if not proto.session.extended_smtp:
        return Reply("555", "MAIL parameters are not allowed after HELO", "5.5.4")
    policy = proto.policy
    allowed = {"SIZE", "BODY", "SMTPUTF8", *proto.edge.extra_mail_params}
    if not policy.smtputf8:
        allowed.discard("SMTPUTF8")
    if policy.dsn:
        allowed |= _DSN_MAIL
    if policy.requiretls:
        allowed.add("REQUIRETLS")
    for key in params:
        if key not in allowed:
            return Reply("555", f"Unsupported MAIL parameter {key}", "5.5.4")
    size = params.get("SIZE", "0")
    if "SIZE" in params:
        if size is None or not size.isdigit() or len(size) > 20:
            return Reply("501", "Syntax: SIZE=<number>", "5.5.4")
        limit = proto.policy.max_message_size
        if limit and int(size) > limit:
            return Reply("552", "Message size exceeds fixed maximum message size", "5.3.4")
    if "BODY" in params:
        body = (params["BODY"] or "").upper()
        binary = policy.binarymime and policy.chunking
        if body not in _BODY_VALUES and not (binary and body == "BINARYMIME"):
            if binary:
                return Reply("501", "Syntax: BODY=7BIT, 8BITMIME or BINARYMIME", "5.5.4")
            return Reply("501", "Syntax: BODY=7BIT or BODY=8BITMIME", "5.5.4")
    if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
        return Reply("501", "SMTPUTF8 takes no value", "5.5.4")
    if "REQUIRETLS" in params:
        if params["REQUIRETLS"] is not None:
            return Reply("501", "REQUIRETLS takes no value", "5.5.4")
        if proto.session.security is None:
            # RFC 8689: only a TLS session can promise TLS all the way.
            return Reply("530", "REQUIRETLS needs a TLS session (STARTTLS first)", "5.7.10")
    try:
        if "RET" in params:
            parse_ret(params["RET"])
        if "ENVID" in params:
            parse_envid(params["ENVID"])
    except DsnError as e:
        return Reply("501", str(e), "5.5.4")
    return None


def check_rcpt(proto: ESMTPServerProtocol, parsed: MailArgument) -> Reply | None:
    """The parameters of ``RCPT``: NOTIFY and ORCPT when DSN is offered."""
    params = parsed.params
    if not params:
        return None
    allowed = _DSN_RCPT if proto.policy.dsn else frozenset()
    for key in params:
        if key not in allowed:
            return Reply("555", f"Unsupported RCPT parameter {key}", "5.5.4")
    envelope = proto.session.envelope
    try:
        if "NOTIFY" in params:
            parse_notify(params["NOTIFY"])
        if "ORCPT" in params:
            parse_orcpt(params["ORCPT"], envelope is not None and envelope.smtputf8)
    except DsnError as e:
        return Reply("501", str(e), "5.5.4")
    return None
