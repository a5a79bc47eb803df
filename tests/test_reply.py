"""Reply rendering: what a client sees on the wire for a :class:`Reply`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimta_tx.reply import Reply
from slimta_tx.testing import parse_replies


def test_single_line_with_explicit_enhanced_code() -> None:
    """A one-line reply is ``code SP esc SP text CRLF``."""
    assert Reply("250", "Sender ok", "2.1.0").render() == b"250 2.1.0 Sender ok\r\n"


def test_multi_line_reply_uses_dash_on_all_but_last() -> None:
    """Lines separated by ``\\n`` become continuation lines; only the last has a space."""
    reply = Reply("250", "mx.test\nPIPELINING\nSIZE 1000", "2.0.0")
    assert reply.render() == (
        b"250-2.0.0 mx.test\r\n250-2.0.0 PIPELINING\r\n250 2.0.0 SIZE 1000\r\n"
    )


def test_multi_line_without_enhanced_codes() -> None:
    """EHLO-style replies can be rendered with no enhanced code on any line."""
    reply = Reply("250", "mx.test\nPIPELINING\n8BITMIME")
    assert reply.render(with_enhanced=False) == (
        b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    )


def test_multi_line_replies_sharing_their_tail_keep_their_own_first_line() -> None:
    """EHLO replies of many sessions share their keyword lines (rendered once and kept):
    each still carries its own first line, cleaned when it has control characters."""
    tail = "PIPELINING\n8BITMIME"
    first = Reply("250", f"mx.test Hello a.example\n{tail}").render(with_enhanced=False)
    second = Reply("250", f"mx.test Hello b.example\n{tail}").render(with_enhanced=False)
    dirty = Reply("250", f"mx.test Hello \x01evil\n{tail}").render(with_enhanced=False)
    assert first == b"250-mx.test Hello a.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    assert second == b"250-mx.test Hello b.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    assert dirty.endswith(b"\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    assert b"\x01" not in dirty and dirty.count(b"\r\n") == 3


@given(
    st.lists(
        st.text(st.characters(blacklist_characters="\n"), max_size=20), min_size=1, max_size=4
    ),
    st.integers(0, 200),
)
def test_multi_line_replies_render_the_same_every_time(lines: list[str], n: int) -> None:
    """Rendering a reply a second time (its tail cached) gives the same bytes, well-formed,
    whatever many other tails were rendered in between."""
    reply = Reply("250", "\n".join(["mx.test", *lines]))
    once = reply.render(with_enhanced=False)
    for i in range(n):
        Reply("250", f"mx.test\nX-{i}").render(with_enhanced=False)
    assert reply.render(with_enhanced=False) == once
    wire_lines = once.split(b"\r\n")
    assert wire_lines[-1] == b"" and len(wire_lines) == len(lines) + 2
    assert all(line[:4] == b"250-" for line in wire_lines[:-2])
    assert wire_lines[-2][:3] == b"250" and wire_lines[-2][3:4] in (b"", b" ")


@pytest.mark.parametrize(
    ("code", "expected"),
    [("250", "2.0.0"), ("221", "2.0.0"), ("421", "4.0.0"), ("451", "4.0.0"), ("554", "5.0.0")],
)
def test_enhanced_code_derived_from_class(code: str, expected: str) -> None:
    """Without an explicit enhanced code, 2xx/4xx/5xx get ``<class>.0.0``."""
    reply = Reply(code, "text")
    assert reply.effective_enhanced_code() == expected
    assert reply.render() == f"{code} {expected} text\r\n".encode()


def test_enhanced_code_of_wrong_class_is_replaced() -> None:
    """An enhanced code whose class contradicts the reply code is not sent (RFC 3463 2)."""
    reply = Reply("550", "No such user", "2.1.5")
    assert reply.render() == b"550 5.0.0 No such user\r\n"


@pytest.mark.parametrize("esc", ["5.1", "5.1.1.1", "x.1.1", "5.1000.1", "5.1.1 extra", ""])
def test_malformed_enhanced_code_is_replaced(esc: str) -> None:
    """A malformed enhanced code never reaches the wire; the class default does."""
    assert Reply("550", "No", esc).render() == b"550 5.0.0 No\r\n"


def test_three_digit_subcodes_are_kept() -> None:
    """RFC 3463 allows up to three digits in each of subject and detail."""
    assert Reply("550", "No", "5.123.456").render() == b"550 5.123.456 No\r\n"


@pytest.mark.parametrize("code", ["354", "334"])
def test_no_enhanced_code_on_3xx(code: str) -> None:
    """3xx intermediate replies never carry an enhanced code, even when one is given."""
    reply = Reply(code, "go ahead", "2.0.0")
    assert reply.effective_enhanced_code() is None
    assert reply.render() == f"{code} go ahead\r\n".encode()


def test_greeting_without_enhanced_code() -> None:
    """The 220 banner is rendered with ``with_enhanced=False``: no enhanced code."""
    assert Reply("220", "mx.test ESMTP").render(with_enhanced=False) == b"220 mx.test ESMTP\r\n"


def test_with_enhanced_false_drops_explicit_code() -> None:
    """``with_enhanced=False`` (the client did not EHLO) drops even an explicit code."""
    reply = Reply("550", "No such user", "5.1.1")
    assert reply.effective_enhanced_code(with_enhanced=False) is None
    assert reply.render(with_enhanced=False) == b"550 No such user\r\n"


def test_empty_message_renders_code_and_enhanced_code_only() -> None:
    """An empty message gives a bare line with no trailing space."""
    assert Reply("250", "").render() == b"250 2.0.0\r\n"
    assert Reply("354", "").render() == b"354\r\n"


@pytest.mark.parametrize(
    "message",
    [
        "ok\r\n250 injected",
        "ok\r250 injected",
        "ok\x00\x1b[31m\x7f",
        "tab\there",
        "\r\n",
    ],
)
def test_control_characters_never_reach_the_wire(message: str) -> None:
    """CR, LF inside lines and other C0/DEL characters are replaced: no injected reply line.

    A ``\\n`` still separates lines of a multi-line reply, but each of those lines carries the
    reply's own code, so a validator cannot forge a different reply.
    """
    wire = Reply("550", message, "5.7.1").render()
    lines = wire.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert line[:3] == b"550"
        assert line[3:4] in (b" ", b"-")
        assert not any(c < 0x20 or c == 0x7F for c in line)
    assert lines[-2][3:4] == b" "
    assert wire.count(b"550 ") == 1


def test_injection_attempt_gives_one_reply_to_a_parser() -> None:
    """A client-side parser sees exactly one reply with the original code."""
    wire = Reply("550", "denied\r\n250 2.0.0 accepted\r\n250 ok", "5.7.1").render()
    replies = parse_replies(wire)
    assert [code for code, _ in replies] == ["550"]


@given(st.text(max_size=200))
def test_any_message_renders_to_well_formed_lines(message: str) -> None:
    """Whatever text a validator puts in a reply, the wire form is well-formed SMTP lines."""
    wire = Reply("451", message, "4.3.0").render()
    replies = parse_replies(wire)
    assert len(replies) == 1
    assert replies[0][0] == "451"
    for line in wire.split(b"\r\n")[:-1]:
        assert b"\r" not in line and b"\n" not in line
        assert line.startswith((b"451-4.3.0", b"451 4.3.0"))


@pytest.mark.parametrize("code", ["421", "221"])
def test_closes_connection_for_421_and_221(code: str) -> None:
    """421 and 221 end the session (RFC 5321 3.8)."""
    assert Reply(code, "bye").closes_connection


@pytest.mark.parametrize("code", ["250", "220", "354", "450", "550", "554", "521"])
def test_other_codes_do_not_close(code: str) -> None:
    """No other reply closes the connection by itself."""
    assert not Reply(code, "x").closes_connection


@pytest.mark.parametrize(
    ("code", "positive", "error"),
    [("250", True, False), ("354", True, False), ("451", False, True), ("550", False, True)],
)
def test_classification(code: str, positive: bool, error: bool) -> None:
    """2xx/3xx are positive, 4xx/5xx are errors."""
    reply = Reply(code, "x")
    assert reply.is_positive is positive
    assert reply.is_error is error


@pytest.mark.parametrize("code", ["25", "2500", "abc", "600", "199", "", " 250", "2.5"])
def test_invalid_code_renders_as_temporary_failure(code: str) -> None:
    """A reply with an invalid code goes out as a consistent ``451 4.0.0``: the client retries
    later instead of reading garbage, and never sees a success enhanced code on a 451."""
    reply = Reply(code, "oops", "2.0.0")
    assert reply.render() == b"451 4.0.0 oops\r\n"
    assert reply.render(with_enhanced=False) == b"451 oops\r\n"


def test_integer_code_is_accepted() -> None:
    """A validator may pass the code as an int; it is stored as a string."""
    reply = Reply(550, "no")  # type: ignore[arg-type]
    assert reply.code == "550"
    reply.set(421, "bye")  # type: ignore[arg-type]
    assert reply.code == "421"
    assert reply.closes_connection


def test_set_changes_in_place_and_returns_self() -> None:
    """A validator rejects by calling ``set`` on the reply it was given."""
    reply = Reply("250", "Ok", "2.1.0")
    same = reply.set("550", "Go away", "5.7.1")
    assert same is reply
    assert reply.render() == b"550 5.7.1 Go away\r\n"
    reply.set("451", "later")
    assert reply.enhanced_status_code is None
    assert reply.render() == b"451 4.0.0 later\r\n"


def test_copy_is_independent() -> None:
    """Changing a copy leaves the original untouched."""
    original = Reply("250", "Ok", "2.0.0")
    clone = original.copy()
    clone.set("550", "No", "5.0.0")
    assert original == Reply("250", "Ok", "2.0.0")


def test_str_is_the_rendered_text_without_final_crlf() -> None:
    """``str(reply)`` is handy in logs: the wire text without the last CRLF."""
    assert str(Reply("250", "a\nb", "2.0.0")) == "250-2.0.0 a\r\n250 2.0.0 b"


def test_non_ascii_text_is_utf8_encoded() -> None:
    """Non-ASCII text (SMTPUTF8 sessions) is encoded as UTF-8, not mangled."""
    assert Reply("250", "déjà vu", "2.0.0").render() == "250 2.0.0 déjà vu\r\n".encode()


@pytest.mark.parametrize("message", ["x\ud800y", "mx.test\n\udfff", "\ud800"])
def test_a_lone_surrogate_in_a_validators_text_is_replaced_not_raised(message: str) -> None:
    """Text that cannot be UTF-8 (a lone surrogate, only a validator can make one: a
    client's text is decoded strictly) still renders, with "?" in its place."""
    wire = Reply("550", message, "5.7.1").render()
    assert wire.startswith(b"550") and b"?" in wire and wire.endswith(b"\r\n")
    assert b"?" in Reply("250", message).render(with_enhanced=False)
