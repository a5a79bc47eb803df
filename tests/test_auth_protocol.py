"""AUTH at the protocol level (StringTransport + Clock): what is offered, each reply of
RFC 4954, each mechanism, brute-force slowing, AUTH= on MAIL, and what AUTH unlocks."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from test_auth_helpers import Driver, ScramClient, b64, memory_auth
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from slimta_tx import Reply, Session
from slimta_tx.auth import Auth, AuthLimits, MechanismSpec, Verify
from slimta_tx.auth.mechanisms import Challenge, Malformed, MechanismContext, PasswordCredentials

ALICE_PLAIN = b64("\0alice\0s3cret-pw")


# -- what is offered ------------------------------------------------------------------------


def test_no_checker_means_no_auth() -> None:
    """Fails closed: an Auth without checkers offers nothing and AUTH gets 502 5.5.1."""
    d = Driver(Auth())
    assert d.auth_keyword() is None
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("502", "5.5.1 Command not implemented")
    assert d.proto.session.authed is None


def test_auth_not_enabled_is_502() -> None:
    """An edge without enable_authentication answers AUTH with 502 5.5.1."""
    d = Driver(None)
    d.ehlo()
    assert d.one("AUTH PLAIN") == ("502", "5.5.1 Command not implemented")


def test_tls_session_offers_all_plaintext_session_hides_plain_and_login() -> None:
    """Over TLS every mechanism is advertised; over plaintext PLAIN and LOGIN are not."""
    assert Driver(memory_auth()).auth_keyword() == "AUTH SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"
    assert Driver(memory_auth(), tls=False).auth_keyword() == "AUTH SCRAM-SHA-256 CRAM-MD5"
    assert (
        Driver(memory_auth(allow_insecure=True), tls=False).auth_keyword()
        == "AUTH SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"
    )


def test_only_mechanisms_the_checkers_can_verify_are_offered(tmp_path: Any) -> None:
    """A password file of hashes cannot check CRAM-MD5 or SCRAM: only PLAIN and LOGIN are
    offered, and over plaintext AUTH is not advertised at all."""
    from test_auth_helpers import CHEAP

    from slimta_tx.auth import PasswordFileChecker
    from slimta_tx.auth.passwd import set_password

    path = str(tmp_path / "passwd")
    set_password(path, "alice", "s3cret-pw", CHEAP)
    auth = Auth([PasswordFileChecker(path, hasher=CHEAP)])
    assert Driver(auth).auth_keyword() == "AUTH PLAIN LOGIN"
    assert Driver(auth, tls=False).auth_keyword() is None
    d = Driver(auth)
    d.ehlo()
    assert d.one("AUTH CRAM-MD5") == ("504", "5.5.4 Unrecognized authentication type")
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("235", "2.7.0 Authentication successful")


def test_chosen_mechanisms_and_order() -> None:
    """Auth(mechanisms=...) chooses which are offered and in what order; others get 504."""
    d = Driver(memory_auth(mechanisms=["plain", "CRAM-MD5"]))
    assert d.auth_keyword() == "AUTH PLAIN CRAM-MD5"
    assert d.one("AUTH LOGIN") == ("504", "5.5.4 Unrecognized authentication type")


# -- each mechanism ---------------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    """AUTH PLAIN <base64> -> 235 2.7.0; the identity is in the session."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("235", "2.7.0 Authentication successful")
    assert d.proto.session.authed == "alice"
    assert d.proto.session.auth_mechanism == "PLAIN"


def test_plain_without_initial_response() -> None:
    """AUTH PLAIN -> '334 ' (an empty challenge, with its space) -> response -> 235."""
    d = Driver(memory_auth())
    d.ehlo()
    d.proto.dataReceived(b"AUTH PLAIN\r\n")
    assert d.transport.value() == b"334 \r\n"
    d.transport.clear()
    assert d.one(ALICE_PLAIN) == ("235", "2.7.0 Authentication successful")


def test_plain_empty_initial_response_is_equals_sign() -> None:
    """'AUTH PLAIN =' is an empty initial response (RFC 4954): malformed for PLAIN, 501."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one("AUTH PLAIN =") == ("501", "5.5.2 Malformed authentication response")


def test_login_exchange() -> None:
    """LOGIN: 334 Username: / 334 Password: (base64) then 235."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one("AUTH LOGIN") == ("334", b64("Username:"))
    assert d.one(b64("bob")) == ("334", b64("Password:"))
    assert d.one(b64("other-pw")) == ("235", "2.7.0 Authentication successful")
    assert d.proto.session.authed == "bob"


def test_login_with_initial_username() -> None:
    """AUTH LOGIN <base64 user> goes straight to Password:."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one(f"AUTH LOGIN {b64('alice')}") == ("334", b64("Password:"))
    assert d.one(b64("s3cret-pw"))[0] == "235"


def test_cram_md5_exchange_and_no_initial_response() -> None:
    """CRAM-MD5: HMAC-MD5 of the challenge with the secret; an initial response is 501."""
    d = Driver(memory_auth(), tls=False)
    d.ehlo()
    assert d.one(f"AUTH CRAM-MD5 {b64('x')}") == ("501", "5.5.2 Malformed authentication response")
    code, text = d.one("AUTH CRAM-MD5")
    assert code == "334"
    challenge = base64.b64decode(text)
    assert challenge.startswith(b"<") and challenge.endswith(b"@mx.test>")
    digest = hmac.new(b"s3cret-pw", challenge, hashlib.md5).hexdigest()
    assert d.one(b64(f"alice {digest}")) == ("235", "2.7.0 Authentication successful")
    assert d.proto.session.authed == "alice"


def test_scram_sha256_exchange_over_plaintext() -> None:
    """SCRAM-SHA-256 is offered without TLS; the server's v= is checked by the client and
    acknowledged with an empty line before 235."""
    d = Driver(memory_auth(), tls=False)
    d.ehlo()
    client = ScramClient("alice", "s3cret-pw")
    code, text = d.one(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    assert code == "334"
    server_first = base64.b64decode(text)
    assert server_first.startswith(b"r=" + client.nonce.encode())
    code, text = d.one(b64(client.final(server_first)))
    assert code == "334"
    assert base64.b64decode(text) == b"v=" + base64.b64encode(client.server_signature)
    assert d.one("") == ("235", "2.7.0 Authentication successful")
    assert d.proto.session.authed == "alice"
    assert d.proto.session.auth_mechanism == "SCRAM-SHA-256"


def test_scram_wrong_password_is_535() -> None:
    """A wrong SCRAM proof gets 535 5.7.8 (after the delay), never the server signature."""
    d = Driver(memory_auth())
    d.ehlo()
    client = ScramClient("alice", "wrong")
    _, text = d.one("AUTH SCRAM-SHA-256")
    assert text == ""
    _, text = d.one(b64(client.first()))
    assert d.cmd(b64(client.final(base64.b64decode(text)))) == []
    d.clock.advance(1)
    assert d.take() == [("535", "5.7.8 Authentication credentials invalid")]


def test_secret_func_checks_every_mechanism() -> None:
    """python-slimta's secret_func(user) style (here returning a Deferred) verifies PLAIN,
    CRAM-MD5 and SCRAM."""
    secrets = {"carol": "pa55"}

    def secret_func(user: str) -> Deferred[str | None]:
        return succeed(secrets.get(user))

    auth = Auth(secret_func=secret_func)
    d = Driver(auth)
    assert d.auth_keyword() == "AUTH SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"
    assert d.one(f"AUTH PLAIN {b64(chr(0) + 'carol' + chr(0) + 'pa55')}")[0] == "235"
    d = Driver(auth)
    d.ehlo()
    _, text = d.one("AUTH CRAM-MD5")
    digest = hmac.new(b"pa55", base64.b64decode(text), hashlib.md5).hexdigest()
    assert d.one(b64(f"carol {digest}"))[0] == "235"


def test_custom_mechanism() -> None:
    """A user-added mechanism is offered and its credentials go through the checkers."""

    class Token:
        """X-TOKEN: one response 'user:password' (a toy)."""

        def __init__(self, context: MechanismContext) -> None:
            pass

        def start(self, initial: bytes | None) -> Challenge | Verify | Malformed:
            if initial is None:
                return Challenge(b"token?")
            return self.step(initial)

        def step(self, response: bytes) -> Verify | Malformed:
            user, sep, password = response.decode().partition(":")
            if not sep:
                return Malformed("user:password expected")
            return Verify(PasswordCredentials(user, password))

        def server_final(self) -> bytes | None:
            return None

    auth = memory_auth(mechanisms=["PLAIN"])
    auth.add_mechanism(MechanismSpec("X-TOKEN", Token, False, (IUsernamePassword,)))
    d = Driver(auth, tls=False)
    assert d.auth_keyword() == "AUTH X-TOKEN"
    assert d.one("AUTH X-TOKEN") == ("334", b64("token?"))
    assert d.one(b64("bob:other-pw"))[0] == "235"
    assert d.proto.session.auth_mechanism == "X-TOKEN"


# -- refusals -----------------------------------------------------------------------------


def test_plain_over_plaintext_is_538() -> None:
    """PLAIN/LOGIN without TLS: 538 5.7.11, the credentials are never checked."""
    d = Driver(memory_auth(), tls=False)
    d.ehlo()
    text = "5.7.11 Encryption required for requested authentication mechanism"
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("538", text)
    assert d.one("AUTH LOGIN") == ("538", text)
    assert d.proto.session.authed is None


def test_allow_insecure_accepts_plain_over_plaintext() -> None:
    """--allow-insecure-auth: PLAIN works without TLS."""
    d = Driver(memory_auth(allow_insecure=True), tls=False)
    d.ehlo()
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"


def test_unknown_mechanism_and_syntax() -> None:
    """504 5.5.4 for an unknown mechanism, 501 5.5.4 for no mechanism or extra words."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one("AUTH GSSAPI") == ("504", "5.5.4 Unrecognized authentication type")
    assert d.one("AUTH") == ("501", "5.5.4 Syntax: AUTH mechanism [initial-response]")
    assert d.one("AUTH PLAIN a b") == ("501", "5.5.4 Syntax: AUTH mechanism [initial-response]")


def test_cancel_with_star() -> None:
    """'*' cancels the exchange: 501 5.7.0; the session goes on unauthenticated."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one("AUTH LOGIN")[0] == "334"
    assert d.one("*") == ("501", "5.7.0 Authentication cancelled")
    assert d.proto.session.authed is None
    assert d.one("NOOP") == ("250", "2.0.0 Ok")


def test_invalid_base64_is_501_strict() -> None:
    """Invalid base64 (bad characters, missing padding) is 501 5.5.2, in the initial
    response and in the exchange; and the next command is a command again."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one("AUTH PLAIN AGFsaWNl!!") == ("501", "5.5.2 Invalid base64 data")
    assert d.one("AUTH LOGIN")[0] == "334"
    assert d.one("YWxpY2U") == ("501", "5.5.2 Invalid base64 data")  # no padding
    assert d.one("NOOP") == ("250", "2.0.0 Ok")


def test_response_line_limit_is_12288_during_the_exchange() -> None:
    """RFC 4954: response lines of 12288 octets are accepted in the exchange; a longer one
    is 500 5.5.6, and afterwards command lines have their normal limit again."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one("AUTH LOGIN")[0] == "334"
    long_user = b64("u" * 9000)  # 12000 characters of base64
    assert len(long_user) + 2 <= 12288
    assert d.one(long_user) == ("334", b64("Password:"))
    assert d.one("*")[0] == "501"
    assert d.one("AUTH LOGIN")[0] == "334"
    assert d.one(b"A" * 13000) == ("500", "5.5.6 Authentication line too long")
    assert d.one("NOOP " + "x" * 1000) == ("500", "5.5.6 Line too long")
    assert d.one("NOOP") == ("250", "2.0.0 Ok")


def test_bad_sequences_are_503() -> None:
    """503 5.5.1: AUTH before EHLO, after HELO only, twice, and during a transaction."""
    d = Driver(memory_auth())
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("503", "5.5.1 Send EHLO or HELO first")
    assert d.one("HELO client.test")[0] == "250"
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("503", "5.5.1 Send EHLO first")
    d.ehlo()
    assert d.one("MAIL FROM:<a@example.org>")[0] == "250"
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == (
        "503",
        "5.5.1 AUTH not allowed during a transaction",
    )
    assert d.one("RSET")[0] == "250"
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("503", "5.5.1 Already authenticated")


def test_authzid_other_than_the_user_is_refused() -> None:
    """PLAIN with an authorization identity other than the user's own gets 535."""
    d = Driver(memory_auth(limits=AuthLimits(failure_delay=0)))
    d.ehlo()
    assert d.one(f"AUTH PLAIN {b64('bob' + chr(0) + 'alice' + chr(0) + 's3cret-pw')}")[0] == "535"
    assert (
        d.one(f"AUTH PLAIN {b64('alice' + chr(0) + 'alice' + chr(0) + 's3cret-pw')}")[0] == "235"
    )


def test_checker_exception_is_454() -> None:
    """A checker that raises gives 454 4.7.0 (temporary), not 535 and not a crash."""

    @implementer(ICredentialsChecker)
    class Broken:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
            return fail(RuntimeError("database down"))

    d = Driver(Auth([Broken()]))
    d.ehlo()
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}") == ("454", "4.7.0 Temporary authentication failure")
    assert d.one("NOOP")[0] == "250"


def test_auth_validator_sees_identity_and_may_refuse() -> None:
    """The AUTH validator gets (session, reply, identity, mechanism) and may refuse."""
    seen: list[tuple[str, str]] = []

    def validator(session: Session, reply: Reply, identity: str, mechanism: str) -> None:
        seen.append((identity, mechanism))
        if identity == "bob":
            reply.set("535", "Not from here", "5.7.8")

    auth = memory_auth()
    d = Driver(auth)
    d.edge.set_validator("AUTH", validator)
    d.ehlo()
    assert d.one(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + 'other-pw')}") == (
        "535",
        "5.7.8 Not from here",
    )
    assert d.proto.session.authed is None
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
    assert seen == [("bob", "PLAIN"), ("alice", "PLAIN")]


# -- brute force ------------------------------------------------------------------------------


def test_failures_are_delayed_and_doubling_then_421() -> None:
    """The 535 is held back 1 s, then 2 s; the third failure on the connection is 421 4.7.0
    and the connection closes (limit 3 here). Input waits meanwhile."""
    d = Driver(memory_auth(limits=AuthLimits(max_failures_per_connection=3)))
    d.ehlo()
    bad = f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'guess')}"
    assert d.cmd(bad) == []
    d.clock.advance(0.99)
    assert d.take() == []
    d.clock.advance(0.01)
    assert d.take() == [("535", "5.7.8 Authentication credentials invalid")]
    assert d.cmd(bad) == []
    d.clock.advance(1.99)
    assert d.take() == []
    d.clock.advance(0.01)
    assert d.take()[0][0] == "535"
    assert d.cmd(bad) == []
    d.clock.advance(4)
    assert d.take() == [("421", "4.7.0 mx.test Too many authentication failures")]
    assert d.closed


def test_failures_per_address_span_connections() -> None:
    """Failures count per client address across connections: after the address limit, AUTH
    from that address gets 421 4.7.0 at once; another address is not affected; the count
    ages out after the window."""
    auth = memory_auth(
        limits=AuthLimits(
            failure_delay=0, max_failures_per_connection=2, max_failures_per_address=4
        )
    )
    from twisted.internet.task import Clock

    clock = Clock()
    bad = f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'guess')}"
    first = Driver(auth, clock=clock)
    first.ehlo()
    assert first.one(bad)[0] == "535"
    assert first.one(bad)[0] == "421"
    second = Driver(auth, clock=clock, edge=first.edge)
    second.ehlo()
    assert second.one(bad)[0] == "535"
    assert second.one(bad)[0] == "421"
    third = Driver(auth, clock=clock, edge=first.edge)
    third.ehlo()
    assert third.one(f"AUTH PLAIN {ALICE_PLAIN}") == (
        "421",
        "4.7.0 mx.test Too many authentication failures",
    )
    other = Driver(auth, clock=clock, edge=first.edge, peer=("198.51.100.9", 1))
    other.ehlo()
    assert other.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
    clock.advance(901)
    later = Driver(auth, clock=clock, edge=first.edge)
    later.ehlo()
    assert later.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"


# -- after AUTH ---------------------------------------------------------------------------------


def test_authenticated_client_may_relay_and_is_recorded() -> None:
    """An anonymous client from outside may not relay (554 5.7.1); after AUTH it may, and the
    envelope and Received: say who and how (ESMTPSA)."""
    d = Driver(memory_auth())
    d.ehlo()
    assert d.one("MAIL FROM:<alice@example.org>")[0] == "250"
    assert d.one("RCPT TO:<friend@elsewhere.test>")[0] == "554"
    assert d.one("RSET")[0] == "250"
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
    assert d.one("MAIL FROM:<alice@example.org>")[0] == "250"
    assert d.one("RCPT TO:<friend@elsewhere.test>")[0] == "250"
    assert d.one("DATA")[0] == "354"
    assert d.cmd(b"Subject: hi\r\n\r\nhello\r\n.")[0][0] == "250"
    envelope = d.bus.messages[0].envelope
    assert envelope.authed == "alice"
    assert envelope.protocol == "ESMTPSA"
    assert b"with ESMTPSA" in envelope.received_header()


def test_esmtpa_without_tls() -> None:
    """Authenticated over plaintext (SCRAM): Received: says ESMTPA."""
    d = Driver(memory_auth(allow_insecure=True), tls=False)
    d.ehlo()
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
    d.one("MAIL FROM:<alice@example.org>")
    d.one("RCPT TO:<x@elsewhere.test>")
    d.one("DATA")
    d.cmd(b"\r\nhi\r\n.")
    assert b"with ESMTPA" in d.bus.messages[0].envelope.received_header()


def test_require_auth_is_530_until_authenticated() -> None:
    """require_auth (submission): MAIL gets 530 5.7.0 until AUTH succeeds, even from a
    trusted network."""
    d = Driver(memory_auth(require_auth=True), peer=("127.0.0.1", 5000))
    d.ehlo()
    assert d.one("MAIL FROM:<alice@example.org>") == ("530", "5.7.0 Authentication required")
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
    assert d.one("MAIL FROM:<alice@example.org>")[0] == "250"


def test_mail_auth_parameter() -> None:
    """AUTH= on MAIL (RFC 4954 §5): from an unauthenticated client it is recorded as <>;
    from an authenticated one as given; malformed xtext is 501 5.5.4."""
    d = Driver(memory_auth())
    assert "AUTH" in " ".join(d.ehlo())
    assert d.one("MAIL FROM:<a@example.org> AUTH=e+3Dmc2@example.com")[0] == "250"
    assert d.proto.session.envelope is not None
    assert d.proto.session.envelope.mail_params["AUTH"] == "<>"
    d.one("RSET")
    assert d.one("MAIL FROM:<a@example.org> AUTH=bad+zz") == (
        "501",
        "5.5.4 Syntax: AUTH=<mailbox as xtext> or AUTH=<>",
    )
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
    assert d.one("MAIL FROM:<a@example.org> AUTH=e+3Dmc2@example.com")[0] == "250"
    assert d.proto.session.envelope.mail_params["AUTH"] == "e+3Dmc2@example.com"
    d.one("RSET")
    assert d.one("MAIL FROM:<a@example.org> AUTH=<>")[0] == "250"


def test_require_tls_refuses_auth_before_starttls() -> None:
    """With the edge requiring TLS (enable_tls(..., require_tls=True)), AUTH before TLS gets
    530 5.7.0, even for mechanisms that are safe over plaintext."""
    d = Driver(memory_auth(), tls=False)
    d.edge.require_tls = True
    d.ehlo()
    assert d.one("AUTH CRAM-MD5") == ("530", "5.7.0 Must issue a STARTTLS command first")
    d.proto.session.security = "TLS"
    assert d.one(f"AUTH PLAIN {ALICE_PLAIN}")[0] == "235"
