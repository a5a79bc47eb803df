"""DSN parameters (RFC 3461) with RFC 6533's UTF-8 addresses: the grammar, the typed values in
the envelope and its JSON, and the replies (501 5.5.4 for a bad or repeated value)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smtp_driver import Driver

from slimta_tx import Policy
from slimta_tx.dsn import (
    DsnError,
    OriginalRecipient,
    RecipientDsn,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
    utf8_addr_xtext_decode,
    utf8_addr_xtext_encode,
)

# -- the grammar ------------------------------------------------------------------------------


def test_ret() -> None:
    assert [parse_ret(v) for v in ("FULL", "HDRS", "full", "Hdrs")] == [
        "FULL",
        "HDRS",
        "FULL",
        "HDRS",
    ]
    for bad in ("", None, "ALL", "FULL,HDRS", "HEADERS"):
        with pytest.raises(DsnError):
            parse_ret(bad)


def test_envid_is_xtext_of_at_most_100_characters() -> None:
    assert parse_envid("QQ314159") == "QQ314159"
    assert parse_envid("a+2Bb+3Dc") == "a+b=c"
    assert parse_envid("x" * 100) == "x" * 100
    for bad in ("", "x" * 101, "a+2b", "a+2", "a=b", "a\\b" + "+", "caf\u00e9"):
        with pytest.raises(DsnError):
            parse_envid(bad)


def test_notify() -> None:
    assert parse_notify("NEVER") == {"NEVER"}
    assert parse_notify("success,Failure,DELAY") == {"SUCCESS", "FAILURE", "DELAY"}
    assert parse_notify("DELAY") == {"DELAY"}
    for bad in ("", None, "NEVER,SUCCESS", "SUCCESS,", ",FAILURE", "ALWAYS", "SUCCESS FAILURE"):
        with pytest.raises(DsnError):
            parse_notify(bad)


def test_orcpt_rfc822_is_xtext() -> None:
    assert parse_orcpt("rfc822;a+2Bb@example.com") == OriginalRecipient(
        "rfc822", "a+b@example.com"
    )
    assert parse_orcpt("RFC822;x@y.test") == OriginalRecipient("rfc822", "x@y.test")
    assert parse_orcpt("x400;c+3Dus+3Ba+3Dx") == OriginalRecipient("x400", "c=us;a=x")


def test_orcpt_utf8_xtext_and_unitext() -> None:
    """RFC 6533: utf-8-addr-xtext (\\x{HEX} escapes) without SMTPUTF8; utf-8-addr-unitext
    (UTF-8 as it is, escapes allowed) in an SMTPUTF8 transaction."""
    assert parse_orcpt("utf-8;j\\x{F6}rg@b\\x{FC}cher.test") == OriginalRecipient(
        "utf-8", "jörg@bücher.test"
    )
    assert parse_orcpt("UTF-8;a\\x{2B}b\\x{3D}c\\x{5C}d@x.test") == OriginalRecipient(
        "utf-8", "a+b=c\\d@x.test"
    )
    assert parse_orcpt("utf-8;jörg@bücher.test", smtputf8=True) == OriginalRecipient(
        "utf-8", "jörg@bücher.test"
    )
    assert parse_orcpt("utf-8;j\\x{1F600}@x.test", smtputf8=True).address == "j\U0001f600@x.test"
    for bad in (
        "utf-8;jörg@x.test",  # raw UTF-8 needs SMTPUTF8
        "utf-8;a+b@x.test",  # "+" must be escaped
        "utf-8;a\\b@x.test",  # "\" must be escaped
        "utf-8;a\\x{D800}@x.test",  # a surrogate
        "utf-8;a\\x{110000}@x.test",
        "utf-8;a\\x{}@x.test",
        "utf-8;a\\x{0}@x.test",
    ):
        with pytest.raises(DsnError):
            parse_orcpt(bad)


@pytest.mark.parametrize(
    "bad",
    ["", "rfc822", "rfc822;", ";a@b.test", "rfc 822;a@b.test", "rfc822;a b", "rfc822;a+ZZ"],
)
def test_orcpt_syntax_errors(bad: str) -> None:
    with pytest.raises(DsnError):
        parse_orcpt(bad)


def test_orcpt_is_at_most_500_characters() -> None:
    fits = "rfc822;" + "a" * (500 - len("rfc822;"))
    assert parse_orcpt(fits).address == "a" * 493
    with pytest.raises(DsnError):
        parse_orcpt(fits + "a")


@given(
    st.text(
        alphabet=st.characters(exclude_categories=("Cs",), min_codepoint=1),
        min_size=1,
        max_size=40,
    )
)
def test_utf8_addr_xtext_round_trip(address: str) -> None:
    """Any address survives encoding (pure printable ASCII on the wire) and decoding."""
    encoded = utf8_addr_xtext_encode(address)
    assert encoded.isascii() and all(0x21 <= ord(c) <= 0x7E for c in encoded)
    assert "+" not in encoded and "=" not in encoded
    assert utf8_addr_xtext_decode(encoded) == address
    assert parse_orcpt(OriginalRecipient("utf-8", address).to_param()).address == address


def test_orcpt_for_a_next_hop() -> None:
    assert OriginalRecipient("rfc822", "a+b@x.test").to_param() == "rfc822;a+2Bb@x.test"
    utf8 = OriginalRecipient("utf-8", "jörg@x.test")
    assert utf8.to_param() == "utf-8;j\\x{F6}rg@x.test"
    assert utf8.to_param(smtputf8=True) == "utf-8;jörg@x.test"
    assert OriginalRecipient.for_address("u@x.test") == OriginalRecipient("rfc822", "u@x.test")
    assert OriginalRecipient.for_address("ü@x.test") == OriginalRecipient("utf-8", "ü@x.test")


# -- over the protocol ------------------------------------------------------------------------


def deliver(d: Driver, mail: str, *rcpts: str) -> list[tuple[str, str]]:
    replies = [d.cmd(mail)]
    replies += [d.cmd(rcpt) for rcpt in rcpts]
    if all(code.startswith("2") for code, _ in replies):
        replies.append(d.cmd("DATA"))
        replies += d.send(b"Subject: dsn\r\n\r\nhi\r\n.\r\n")
    return replies


def test_dsn_is_advertised_and_recorded_typed_and_in_json() -> None:
    d = Driver()
    assert "DSN" in d.cmd("EHLO client.test")[1].split("\n")
    replies = deliver(
        d,
        "MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B314159",
        "RCPT TO:<u@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Bu@example.com",
        "RCPT TO:<v@example.com> NOTIFY=NEVER",
        "RCPT TO:<w@example.com>",
    )
    assert [code for code, _ in replies] == ["250", "250", "250", "250", "354", "250"]
    env = d.bus.messages[0].envelope
    assert (env.dsn_ret, env.dsn_envid) == ("HDRS", "QQ+314159")
    assert env.recipient_dsn == [
        RecipientDsn(
            frozenset({"SUCCESS", "FAILURE"}), OriginalRecipient("rfc822", "orig+u@example.com")
        ),
        RecipientDsn(frozenset({"NEVER"}), None),
        RecipientDsn(None, None),
    ]
    assert env.recipient_dsn[0].success_requested
    record = json.loads(json.dumps(env.to_json_dict()))
    assert record["dsn"] == {"ret": "HDRS", "envid": "QQ+314159"}
    assert [r.get("dsn") for r in record["recipients"]] == [
        {
            "notify": ["FAILURE", "SUCCESS"],
            "orcpt": {"type": "rfc822", "address": "orig+u@example.com"},
        },
        {"notify": ["NEVER"], "orcpt": None},
        None,
    ]
    # What the client sent stays as sent, for whoever passes the message on.
    assert env.mail_params == {"RET": "HDRS", "ENVID": "QQ+2B314159"}


@pytest.mark.parametrize(
    ("line", "text"),
    [
        ("MAIL FROM:<a@b.test> RET=ALL", "Syntax: RET=FULL or RET=HDRS"),
        ("MAIL FROM:<a@b.test> RET", "Syntax: RET=FULL or RET=HDRS"),
        ("MAIL FROM:<a@b.test> ENVID=a+2b", "Syntax: ENVID=<xtext>: bad character or +XX escape"),
        (
            "MAIL FROM:<a@b.test> ENVID=" + "x" * 101,
            "Syntax: ENVID=<xtext of 1 to 100 characters>",
        ),
        ("MAIL FROM:<a@b.test> RET=FULL RET=HDRS", "Duplicate parameter RET"),
        ("MAIL FROM:<a@b.test> ENVID=1 ENVID=1", "Duplicate parameter ENVID"),
    ],
)
def test_bad_or_repeated_mail_values_are_501(line: str, text: str) -> None:
    d = Driver()
    d.greet()
    assert d.cmd(line) == ("501", f"5.5.4 {text}")


@pytest.mark.parametrize(
    ("params", "text"),
    [
        (
            "NOTIFY=NEVER,SUCCESS",
            "Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (any of them)",
        ),
        ("NOTIFY=SOMETIMES", "Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (any of them)"),
        ("ORCPT=u@example.com", "Syntax: ORCPT=<addr-type>;<address>"),
        ("ORCPT=rfc822;u+zz@example.com", "Syntax: ORCPT=rfc822;<bad encoding of the address>"),
        ("ORCPT=utf-8;a+b@example.com", "Syntax: ORCPT=utf-8;<bad encoding of the address>"),
        ("NOTIFY=NEVER NOTIFY=NEVER", "Duplicate parameter NOTIFY"),
        ("ORCPT=rfc822;a@b ORCPT=rfc822;a@b", "Duplicate parameter ORCPT"),
    ],
)
def test_bad_or_repeated_rcpt_values_are_501(params: str, text: str) -> None:
    d = Driver()
    d.greet()
    d.cmd("MAIL FROM:<a@b.test>")
    assert d.cmd(f"RCPT TO:<u@example.com> {params}") == ("501", f"5.5.4 {text}")
    assert d.proto.session.envelope is not None
    assert d.proto.session.envelope.recipients == []


def test_utf8_orcpt_in_an_smtputf8_transaction() -> None:
    d = Driver()
    d.greet()
    replies = deliver(
        d,
        "MAIL FROM:<jörg@bücher.test> SMTPUTF8",
        "RCPT TO:<zoë@example.com> ORCPT=utf-8;zoë@example.com NOTIFY=DELAY",
    )
    assert replies[-1][0] == "250"
    env = d.bus.messages[0].envelope
    assert env.recipient_dsn == [
        RecipientDsn(frozenset({"DELAY"}), OriginalRecipient("utf-8", "zoë@example.com"))
    ]


def test_each_parameter_on_its_own_command_only() -> None:
    """NOTIFY and ORCPT belong to RCPT, RET and ENVID to MAIL (RFC 3461 4)."""
    d = Driver()
    d.greet()
    assert d.cmd("MAIL FROM:<a@b.test> NOTIFY=NEVER") == (
        "555",
        "5.5.4 Unsupported MAIL parameter NOTIFY",
    )
    d.cmd("MAIL FROM:<a@b.test>")
    assert d.cmd("RCPT TO:<u@example.com> RET=FULL") == (
        "555",
        "5.5.4 Unsupported RCPT parameter RET",
    )


def test_dsn_off_makes_its_parameters_unknown() -> None:
    d = Driver(policy=Policy(hostname="mx.test", accepted_domains=("example.com",), dsn=False))
    assert "DSN" not in d.cmd("EHLO client.test")[1].split("\n")
    assert d.cmd("MAIL FROM:<a@b.test> RET=FULL") == (
        "555",
        "5.5.4 Unsupported MAIL parameter RET",
    )


MAIL_PARAMETERS = ["SMTPUTF8", "BODY=8BITMIME", "RET=FULL", "ENVID=id+2B1", "SIZE=100"]


@pytest.mark.parametrize("order", list(itertools.permutations(MAIL_PARAMETERS)), ids=" ".join)
def test_mail_parameters_combine_in_any_order(order: tuple[str, ...]) -> None:
    """SMTPUTF8, BODY=8BITMIME, SIZE and the DSN parameters together, in every order: the
    same transaction each time."""
    d = Driver()
    d.greet()
    replies = deliver(
        d,
        f"MAIL FROM:<jörg@bücher.test> {' '.join(order)}",
        "RCPT TO:<zoë@example.com> ORCPT=utf-8;zoë@example.com NOTIFY=SUCCESS",
    )
    assert [code for code, _ in replies] == ["250", "250", "354", "250"]
    env = d.bus.messages[0].envelope
    assert (env.smtputf8, env.body, env.dsn_ret, env.dsn_envid) == (
        True,
        "8BITMIME",
        "FULL",
        "id+1",
    )
    assert env.mail_params["SIZE"] == "100"
