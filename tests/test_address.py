"""RFC 5321 path and ESMTP parameter parsing (sections 4.1.2 and 4.5.3.1, RFC 6531, RFC 3461)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from slimta_tx.address import (
    ArgumentError,
    MailArgument,
    is_valid_domain,
    parse_mail_argument,
    parse_path,
    parse_rcpt_argument,
    split_address,
    xtext_decode,
    xtext_encode,
)

ATEXT = "abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~"


def mail_error(argument: str) -> tuple[str, str | None]:
    """The (code, enhanced code) a client gets for ``MAIL <argument>``."""
    with pytest.raises(ArgumentError) as info:
        parse_mail_argument(argument)
    return info.value.reply.code, info.value.reply.enhanced_status_code


def rcpt_error(argument: str, utf8: bool = False) -> tuple[str, str | None]:
    """The (code, enhanced code) a client gets for ``RCPT <argument>``."""
    with pytest.raises(ArgumentError) as info:
        parse_rcpt_argument(argument, utf8=utf8)
    return info.value.reply.code, info.value.reply.enhanced_status_code


# -- accepted paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "address"),
    [
        ("<user@example.com>", "user@example.com"),
        ("<first.last@sub.example.com>", "first.last@sub.example.com"),
        (f"<{ATEXT}@example.com>", f"{ATEXT}@example.com"),
        ("<a@b>", "a@b"),
        ("<user@123.example>", "user@123.example"),
        ("<user@x-y.example>", "user@x-y.example"),
        ('<"john doe"@example.com>', '"john doe"@example.com'),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
        ('<"a\\\\"@example.com>', '"a\\\\"@example.com'),
        ('<"a>b"@example.com>', '"a>b"@example.com'),
        ('<"a@b"@example.com>', '"a@b"@example.com'),
        ('<"a..b."@example.com>', '"a..b."@example.com'),
        ('<""@example.com>', '""@example.com'),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("<user@[ipv6:::1]>", "user@[ipv6:::1]"),
        ("<user@[IPv6:::ffff:192.0.2.1]>", "user@[IPv6:::ffff:192.0.2.1]"),
        ("<user@[x-tag:some-content]>", "user@[x-tag:some-content]"),
    ],
)
def test_valid_paths_accepted_for_mail_and_rcpt(path: str, address: str) -> None:
    """Dot-atoms, quoted local parts and address literals are accepted as sender and recipient."""
    assert parse_mail_argument(f"FROM:{path}").address == address
    assert parse_rcpt_argument(f"TO:{path}").address == address


def test_quoted_local_part_with_gt_is_followed_by_parameters() -> None:
    """A ``>`` inside a quoted local part does not end the path: the parameters still parse."""
    parsed = parse_mail_argument('FROM:<"odd>name"@example.com> SIZE=10')
    assert parsed.address == '"odd>name"@example.com'
    assert parsed.params == {"SIZE": "10"}


def test_escaped_quote_does_not_end_the_quoted_string() -> None:
    """``\\"`` inside quotes is a quoted pair; the ``>`` after it is still inside the quotes."""
    parsed = parse_rcpt_argument('TO:<"a\\">b"@example.com> NOTIFY=NEVER')
    assert parsed.address == '"a\\">b"@example.com'
    assert parsed.params == {"NOTIFY": "NEVER"}


def test_null_reverse_path_only_for_mail() -> None:
    """``<>`` is the null sender (bounces); as a recipient it is bad recipient syntax."""
    assert parse_mail_argument("FROM:<>").address == ""
    assert parse_mail_argument("FROM:<> BODY=7BIT").params == {"BODY": "7BIT"}
    assert rcpt_error("TO:<>") == ("501", "5.1.3")


@pytest.mark.parametrize("name", ["Postmaster", "postmaster", "POSTMASTER"])
def test_postmaster_without_domain_is_a_valid_recipient(name: str) -> None:
    """RFC 5321 4.1.1.3: ``<Postmaster>`` (any case) must be accepted as a forward path."""
    assert parse_rcpt_argument(f"TO:<{name}>").address == name


def test_postmaster_without_domain_is_not_a_sender() -> None:
    """The domain-less Postmaster exception applies to RCPT only."""
    assert mail_error("FROM:<Postmaster>") == ("501", "5.1.7")


def test_postmaster_with_domain_is_an_ordinary_address() -> None:
    """``postmaster@domain`` parses like any mailbox."""
    assert parse_rcpt_argument("TO:<postmaster@example.com>").address == "postmaster@example.com"


@pytest.mark.parametrize(
    "path",
    ["<@a.example:user@c.example>", "<@a.example,@b.example:user@c.example>"],
)
def test_source_route_accepted_and_dropped(path: str) -> None:
    """RFC 5321 4.1.1.3 / C: a source route is accepted and ignored."""
    assert parse_mail_argument(f"FROM:{path}").address == "user@c.example"
    assert parse_rcpt_argument(f"TO:{path}").address == "user@c.example"


@pytest.mark.parametrize(
    "path",
    [
        "<@a.example:>",
        "<@:user@c.example>",
        "<@a..example:user@c.example>",
        "<@a.example,b.example:user@c.example>",
        "<@a.example,,@b.example:user@c.example>",
        "<@a.example user@c.example>",
        "<@a.example:@b.example:user@c.example>",
    ],
)
def test_malformed_source_route_refused(path: str) -> None:
    """A source route that does not follow the A-d-l grammar is bad address syntax."""
    assert mail_error(f"FROM:{path}") == ("501", "5.1.7")
    assert rcpt_error(f"TO:{path}") == ("501", "5.1.3")


# -- argument form ------------------------------------------------------------------------------


def test_prefix_is_case_insensitive_and_space_after_colon_tolerated() -> None:
    """``from:`` works and ``FROM: <a@b>`` (a common client habit) is tolerated."""
    assert parse_mail_argument("from:<a@example.com>").address == "a@example.com"
    assert parse_mail_argument("FROM: <a@example.com>").address == "a@example.com"
    assert parse_rcpt_argument("to:  <a@example.com>").address == "a@example.com"


@pytest.mark.parametrize(
    "argument",
    [
        "",
        "FROM:",
        "FROM",
        "FROM <a@example.com>",
        "FROM:a@example.com",
        "FROM:<a@example.com",
        "FROM:<a@example.com>SIZE=10",
        "FROM:<a@example.com>>",
        'FROM:<"unterminated@example.com>',
        "TO:<a@example.com>",
        "SENDER:<a@example.com>",
        " FROM:<a@example.com>",
        "FROM:\t<a@example.com>",
    ],
)
def test_malformed_mail_argument_form(argument: str) -> None:
    """A MAIL argument that is not ``FROM:<path> [params]`` gets 501 5.5.4."""
    assert mail_error(argument) == ("501", "5.5.4")


@pytest.mark.parametrize(
    "argument",
    ["", "TO:", "TO <a@example.com>", "TO:a@example.com", "FROM:<a@example.com>", "TO:<a@b.c"],
)
def test_malformed_rcpt_argument_form(argument: str) -> None:
    """A RCPT argument that is not ``TO:<path> [params]`` gets 501 5.5.4."""
    assert rcpt_error(argument) == ("501", "5.5.4")


# -- bad address syntax -------------------------------------------------------------------------

BAD_PATHS = [
    "<user>",
    "<@example.com>",
    "<user@>",
    "<a..b@example.com>",
    "<.a@example.com>",
    "<a.@example.com>",
    "<a b@example.com>",
    "<a\\b@example.com>",
    "<a(comment)@example.com>",
    "<a@b@example.com>",
    '<"a"b@example.com>',
    '<a"b"@example.com>',
    '<"a\x01"@example.com>',
    '<"a\\\x01"@example.com>',
    "<user@-example.com>",
    "<user@example-.com>",
    "<user@exa_mple.com>",
    "<user@example..com>",
    "<user@example.com.>",
    "<user@.example.com>",
    "<user@exa mple.com>",
    "<user@[192.0.2.256]>",
    "<user@[192.0.2]>",
    "<user@[192.0.2.1>",
    "<user@192.0.2.1]>",
    "<user@[IPv6:12345::]>",
    "<user@[IPv6:192.0.2.1]>",
    "<user@[IPv6:fe80::1%eth0]>",
    "<user@[IPv6:fe80::1%a b]>",
    "<user@[IPv6:fe80::1%\x01]>",
    "<user@[nocolon]>",
    "<user@[:content]>",
    "<user@[tag-:content]>",
    "<user@[tag:]>",
    "<user@[tag:a[b]>",
    "<user@[]>",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_sender_syntax(path: str) -> None:
    """A malformed sender mailbox gets 501 5.1.7 (RFC 3463: bad sender's mailbox syntax)."""
    assert mail_error(f"FROM:{path}") == ("501", "5.1.7")


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_recipient_syntax(path: str) -> None:
    """A malformed recipient mailbox gets 501 5.1.3 (RFC 3463: bad destination syntax)."""
    assert rcpt_error(f"TO:{path}") == ("501", "5.1.3")


# -- limits (RFC 5321 4.5.3.1) ------------------------------------------------------------------


def test_local_part_of_64_octets_accepted_65_refused() -> None:
    """4.5.3.1.1: a local part may be 64 octets, not more."""
    assert parse_mail_argument(f"FROM:<{'a' * 64}@example.com>").address.startswith("a" * 64)
    assert mail_error(f"FROM:<{'a' * 65}@example.com>") == ("501", "5.1.7")
    assert rcpt_error(f"TO:<{'a' * 65}@example.com>") == ("501", "5.1.3")


def test_quoted_local_part_length_counts_the_quotes() -> None:
    """The local part as sent, quotes included, is what the 64-octet limit applies to."""
    assert parse_rcpt_argument(f'TO:<"{"a" * 62}"@example.com>')
    assert rcpt_error(f'TO:<"{"a" * 63}"@example.com>') == ("501", "5.1.3")


def test_local_part_limit_is_in_octets_not_characters() -> None:
    """With SMTPUTF8, 32 two-octet characters fit (64 octets); 33 do not."""
    assert parse_mail_argument(f"FROM:<{'é' * 32}@example.com> SMTPUTF8").utf8
    assert mail_error(f"FROM:<{'é' * 33}@example.com> SMTPUTF8") == ("501", "5.1.7")


def test_label_of_63_octets_accepted_64_refused() -> None:
    """A DNS label is at most 63 octets."""
    assert parse_rcpt_argument(f"TO:<a@{'b' * 63}.example>")
    assert rcpt_error(f"TO:<a@{'b' * 64}.example>") == ("501", "5.1.3")


def test_domain_of_255_octets_valid_256_not() -> None:
    """4.5.3.1.2: a domain is at most 255 octets."""
    domain_255 = ".".join(["d" * 63] * 4)
    assert len(domain_255) == 255
    assert is_valid_domain(domain_255)
    domain_256 = ".".join(["d" * 63] * 3 + ["d" * 62, "d"])
    assert len(domain_256) == 256
    assert not is_valid_domain(domain_256)


def _path_of(length: int) -> str:
    """A ``<local@domain>`` path of exactly ``length`` octets, brackets included."""
    local = "l" * 64
    domain_len = length - len(local) - 3
    labels = []
    while domain_len > 0:
        size = min(63, domain_len)
        if domain_len - size == 1:
            size -= 1  # never leave a remainder that is only a dot
        labels.append("d" * size)
        domain_len -= size + 1
    path = f"<{local}@{'.'.join(labels)}>"
    assert len(path) == length
    return path


def test_path_of_256_octets_accepted_257_refused() -> None:
    """4.5.3.1.3: a path is at most 256 octets, punctuation included."""
    assert parse_mail_argument(f"FROM:{_path_of(256)}")
    assert parse_rcpt_argument(f"TO:{_path_of(256)}")
    assert mail_error(f"FROM:{_path_of(257)}") == ("501", "5.5.4")
    assert rcpt_error(f"TO:{_path_of(257)}") == ("501", "5.1.3")


def test_long_source_route_counts_towards_the_path_limit() -> None:
    """A source route cannot be used to smuggle an over-long path."""
    route = ",".join(["@" + "r" * 60 + ".example"] * 4)
    assert rcpt_error(f"TO:<{route}:user@example.com>") == ("501", "5.1.3")


# -- parameters ---------------------------------------------------------------------------------


def test_parameters_parsed_with_upper_case_keys() -> None:
    """Keywords are case-insensitive and stored upper-cased; values keep their case."""
    parsed = parse_mail_argument("FROM:<a@example.com> size=100 Body=8bitmime ret=HDRS")
    assert parsed.params == {"SIZE": "100", "BODY": "8bitmime", "RET": "HDRS"}


def test_keyword_without_value_is_none() -> None:
    """A bare keyword (``SMTPUTF8``) has the value None."""
    assert parse_mail_argument("FROM:<a@example.com> SMTPUTF8").params == {"SMTPUTF8": None}


def test_extra_spaces_between_parameters_tolerated() -> None:
    """Several spaces between parameters, or trailing spaces, do not matter."""
    parsed = parse_rcpt_argument("TO:<a@example.com>  NOTIFY=NEVER   ORCPT=rfc822;a@example.com ")
    assert parsed.params == {"NOTIFY": "NEVER", "ORCPT": "rfc822;a@example.com"}


@pytest.mark.parametrize(
    "params",
    ["SIZE=1 SIZE=2", "SIZE=1 size=2", "BODY=7BIT body", "SMTPUTF8 smtputf8"],
)
def test_duplicate_parameter_refused(params: str) -> None:
    """A keyword given twice, in any case, is a syntax error (501 5.5.4)."""
    assert mail_error(f"FROM:<a@example.com> {params}") == ("501", "5.5.4")
    assert rcpt_error(f"TO:<a@example.com> {params}") == ("501", "5.5.4")


@pytest.mark.parametrize(
    "params",
    [
        "=1",
        "-SIZE=1",
        "SI_ZE=1",
        "SIZE=",
        "X=a=b",
        "X=\x01",
        "X=a\x7f",
        "SIZE=1\tBODY=7BIT",
        "SIZE=1\x0bBODY=7BIT",
        "SIZE=1\x1fBODY=7BIT",
    ],
)
def test_bad_parameter_syntax_refused(params: str) -> None:
    """esmtp-keyword and esmtp-value (RFC 5321 4.1.2) are enforced; only SP separates them."""
    assert mail_error(f"FROM:<a@example.com> {params}") == ("501", "5.5.4")
    assert rcpt_error(f"TO:<a@example.com> {params}") == ("501", "5.5.4")


def test_parameter_value_may_hold_any_visible_ascii_but_equals() -> None:
    """esmtp-value is %d33-60 / %d62-126: punctuation, ``<`` and ``>`` included."""
    value = "".join(chr(c) for c in range(33, 127) if c != ord("="))
    assert parse_rcpt_argument(f"TO:<a@example.com> X={value}").params == {"X": value}


# -- SMTPUTF8 (RFC 6531) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument",
    [
        "FROM:<jörg@example.com>",
        "FROM:<user@bücher.example>",
        'FROM:<"jörg doe"@example.com>',
        "FROM:<user@example.com> X=é",
    ],
)
def test_non_ascii_without_smtputf8_refused_with_553(argument: str) -> None:
    """Non-ASCII in a MAIL argument without SMTPUTF8 gets 553 5.6.7 (RFC 6531 3.7.4.2)."""
    assert mail_error(argument) == ("553", "5.6.7")


@pytest.mark.parametrize(
    "address",
    [
        "jörg@example.com",
        "user@bücher.example",
        '"jörg doe"@example.com',
        "用户@例子.广告",
        "θσερ@παράδειγμα.δοκιμή",
    ],
)
def test_utf8_addresses_accepted_with_smtputf8(address: str) -> None:
    """With SMTPUTF8 on MAIL, UTF-8 local parts and U-label domains are accepted, also in RCPT."""
    parsed = parse_mail_argument(f"FROM:<{address}> smtputf8")
    assert parsed.address == address
    assert parsed.utf8
    assert parse_rcpt_argument(f"TO:<{address}>", utf8=True).address == address


def test_non_ascii_recipient_needs_smtputf8_transaction() -> None:
    """RCPT with a UTF-8 address is 553 5.6.7 unless the MAIL carried SMTPUTF8."""
    assert rcpt_error("TO:<jörg@example.com>") == ("553", "5.6.7")
    assert rcpt_error("TO:<a@example.com> X=é") == ("553", "5.6.7")
    assert parse_rcpt_argument("TO:<a@example.com> X=é", utf8=True).params == {"X": "é"}


def test_ascii_address_is_not_utf8() -> None:
    """``MailArgument.utf8`` is False for plain ASCII, even with SMTPUTF8 given."""
    assert not parse_mail_argument("FROM:<a@example.com> SMTPUTF8").utf8
    assert not MailArgument("").utf8


@pytest.mark.parametrize(
    "path", ["<jörg.@example.com>", "<user@-bücher.example>", "<user@bü cher.example>"]
)
def test_utf8_addresses_still_follow_the_grammar(path: str) -> None:
    """SMTPUTF8 relaxes the character set, not the structure."""
    assert mail_error(f"FROM:{path} SMTPUTF8") == ("501", "5.1.7")


# -- parse_path, split_address ------------------------------------------------------------------


def test_parse_path_directly() -> None:
    """``parse_path`` validates one bracketed path for MAIL or RCPT."""
    assert parse_path("<a@example.com>", "MAIL") == "a@example.com"
    assert parse_path("<>", "MAIL") == ""
    with pytest.raises(ArgumentError) as info:
        parse_path("a@example.com", "RCPT")
    assert info.value.reply.code == "501"
    assert info.value.reply.enhanced_status_code == "5.5.4"


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("a@example.com", ("a", "example.com")),
        ('"x@y"@example.com', ('"x@y"', "example.com")),
        ("postmaster", ("postmaster", "")),
        ("", ("", "")),
    ],
)
def test_split_address_at_the_last_at_sign(address: str, parts: tuple[str, str]) -> None:
    """The domain starts after the last ``@``; quoted local parts may hold one."""
    assert split_address(address) == parts


def test_argument_error_reply_is_a_fresh_reply() -> None:
    """Each error carries its own Reply, so a validator may change it without side effects."""
    with pytest.raises(ArgumentError) as first:
        parse_mail_argument("FROM:<bad>")
    first.value.reply.set("550", "changed")
    assert mail_error("FROM:<bad>") == ("501", "5.1.7")


# -- xtext (RFC 3461 4) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoded", "encoded"),
    [
        ("", ""),
        ("abc", "abc"),
        ("a+b", "a+2Bb"),
        ("a=b", "a+3Db"),
        ("a b", "a+20b"),
        ("rfc822;user@example.com", "rfc822;user@example.com"),
        ("é", "+C3+A9"),
        ("\x00\x7f", "+00+7F"),
    ],
)
def test_xtext_known_values(decoded: str, encoded: str) -> None:
    """xtext escapes ``+``, ``=``, controls, space and non-ASCII as ``+XX``."""
    assert xtext_encode(decoded) == encoded
    assert xtext_decode(encoded) == decoded


@pytest.mark.parametrize("bad", ["+", "+2", "+2b", "+GG", "a b", "a=b", "é", "+C3"])
def test_xtext_malformed_raises_value_error(bad: str) -> None:
    """Lower-case hex, truncated escapes, raw specials or bad UTF-8 raise ValueError."""
    with pytest.raises(ValueError):
        xtext_decode(bad)


@given(st.text())
def test_xtext_round_trip(value: str) -> None:
    """Any string survives encode then decode, and the encoding is plain xchar/hexchar."""
    encoded = xtext_encode(value)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert xtext_decode(encoded) == value


# -- properties ---------------------------------------------------------------------------------

_atom = st.text(alphabet=ATEXT, min_size=1, max_size=12)
_dot_atom = st.lists(_atom, min_size=1, max_size=4).map(".".join)
_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=5).map(".".join)


@given(_dot_atom, _domain)
def test_any_valid_dot_atom_address_round_trips(local: str, domain: str) -> None:
    """Every dot-atom@domain within the limits is accepted and returned unchanged."""
    assume(len(local) <= 64 and len(local) + len(domain) + 3 <= 256)
    address = f"{local}@{domain}"
    assert parse_mail_argument(f"FROM:<{address}>").address == address
    assert parse_rcpt_argument(f"TO:<{address}> NOTIFY=NEVER").address == address


_TOKENS = st.sampled_from(
    [
        "<", ">", '"', "\\", "@", "[", "]", ":", ",", ".", " ", "=", "a", "Z", "1", "-", "é",
        "%", "\x00", "\t", "IPv6:", "::1", "192.0.2.1", "SMTPUTF8", "SIZE=1", "postmaster",
        "\u2028", "\x85",
    ]
)  # fmt: skip
_fuzz = st.one_of(st.text(max_size=80), st.lists(_TOKENS, max_size=40).map("".join))


def _check_outcome(call: object, argument: str) -> None:
    try:
        parsed = call(argument)  # type: ignore[operator]
    except ArgumentError as error:
        assert error.reply.code in ("501", "553")
        assert error.reply.render().count(b"\r\n") == 1
        return
    assert isinstance(parsed, MailArgument)
    # Whatever is accepted is safe to put in a header or a log line.
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in parsed.address)
    assert len(parsed.address.encode("utf-8")) <= 254


@given(_fuzz)
def test_mail_parser_never_raises_anything_but_argument_error(tail: str) -> None:
    """Arbitrary input gives a MailArgument or an ArgumentError with a 501/553 reply."""
    _check_outcome(parse_mail_argument, "FROM:<" + tail)
    _check_outcome(parse_mail_argument, tail)


@given(_fuzz, st.booleans())
def test_rcpt_parser_never_raises_anything_but_argument_error(tail: str, utf8: bool) -> None:
    """Arbitrary input gives a MailArgument or an ArgumentError with a 501/553 reply."""
    _check_outcome(lambda a: parse_rcpt_argument(a, utf8=utf8), "TO:<" + tail)
    _check_outcome(lambda a: parse_rcpt_argument(a, utf8=utf8), tail)


@given(
    st.sampled_from(["IPv6:", "IPv6:fe80::1%", "IPv6:::ffff:", "192.0.2.", "tag:", ""]), st.text()
)
def test_accepted_address_literal_holds_only_dcontent(prefix: str, text: str) -> None:
    """An accepted literal holds only dcontent (%d33-90 / %d94-126): no space, control or
    non-ASCII can hide in it (``ipaddress`` alone would allow ``fe80::1%<anything>``)."""
    literal = f"[{prefix}{text}]"
    if is_valid_domain(literal, utf8=True):
        assert all(33 <= ord(c) <= 126 for c in literal)
