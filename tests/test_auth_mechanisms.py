"""SASL mechanisms without I/O: RFC test vectors and each state machine's refusals."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from slimta_tx.auth.mechanisms import (
    Challenge,
    CramMD5,
    CramMD5Credentials,
    Done,
    Login,
    Malformed,
    MechanismContext,
    PasswordCredentials,
    Plain,
    ScramCredentials,
    ScramSHA256,
    Verify,
    saslprep,
)

# RFC 7677 section 3.
RFC7677_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_CLIENT_FINAL = (
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC7677_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def context(random: bytes = b"\x01" * 32, salt: bytes = b"salt" * 4) -> MechanismContext:
    return MechanismContext(
        hostname="mx.test",
        seconds=lambda: 697170952.0,
        random_bytes=lambda n: random[:n],
        scram_salt=lambda user: (salt, 4096),
    )


class _Rfc7677Scram(ScramSHA256):
    """Pins the server nonce of RFC 7677's example (the mechanism base64-encodes its random
    bytes; the RFC's nonce is not base64, so it is patched in after the fact)."""

    def _client_first(self, response: bytes):  # type: ignore[no-untyped-def]
        result = super()._client_first(response)
        nonce = RFC7677_CLIENT_NONCE + RFC7677_SERVER_NONCE
        self._server_first = self._server_first.replace(self._nonce, nonce)
        self._nonce = nonce
        return Challenge(self._server_first.encode()) if isinstance(result, Challenge) else result


def test_scram_sha256_rfc7677_vector() -> None:
    """The RFC 7677 example exchange: same server-first message, proof accepted for 'pencil',
    and the server signature the RFC shows."""
    mech = _Rfc7677Scram(context(salt=RFC7677_SALT))
    first = mech.start(f"n,,n=user,r={RFC7677_CLIENT_NONCE}".encode())
    assert first == Challenge(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    result = mech.step(RFC7677_CLIENT_FINAL.encode())
    assert isinstance(result, Verify)
    credentials = result.credentials
    assert isinstance(credentials, ScramCredentials)
    assert credentials.username == "user"
    assert not credentials.checkPassword("pencil!")
    assert credentials.checkPassword("pencil")
    assert mech.server_final() == RFC7677_SERVER_FINAL
    assert mech.step(b"") == Done()


def test_scram_refusals() -> None:
    """Channel binding requests, m= extensions, bad saslnames, a changed nonce or a changed
    gs2 header, and a non-empty answer to the server-final message are malformed."""
    for first in (
        b"p=tls-unique,,n=user,r=abc",
        b"n,,m=ext,n=user,r=abc",
        b"n,,n=us=2Xer,r=abc",
        b"n,,n=user",
        b"x,,n=user,r=abc",
        b"n,,n=,r=abc",
        b"\xff",
    ):
        assert isinstance(ScramSHA256(context()).start(first), Malformed), first
    mech = ScramSHA256(context())
    server_first = mech.start(b"n,,n=user,r=abc")
    assert isinstance(server_first, Challenge)
    assert isinstance(mech.step(b"c=biws,r=abcWRONG,p=AAAA"), Malformed)
    mech = ScramSHA256(context())
    mech.start(b"y,,n=user,r=abc")
    nonce = mech._nonce
    # c= must repeat the client's own gs2 header ("y,," here, "biws" is "n,,").
    assert isinstance(mech.step(f"c=biws,r={nonce},p=AAAA".encode()), Malformed)


def test_scram_saslname_escapes_and_authzid() -> None:
    """=2C and =3D decode to ',' and '='; a= becomes the requested authorization identity."""
    mech = ScramSHA256(context())
    assert isinstance(mech.start(b"n,a=b=3Db,n=a=2Cb,r=abc"), Challenge)
    assert mech._username == "a,b"
    assert mech._authzid == "b=b"


def test_scram_credentials_from_stored_keys() -> None:
    """A checker holding only StoredKey/ServerKey (no password) can verify a SCRAM proof."""
    from slimta_tx.auth.mechanisms import scram_keys

    stored, server = scram_keys("pencil", RFC7677_SALT, 4096)
    mech = _Rfc7677Scram(context(salt=RFC7677_SALT))
    mech.start(f"n,,n=user,r={RFC7677_CLIENT_NONCE}".encode())
    result = mech.step(RFC7677_CLIENT_FINAL.encode())
    assert isinstance(result, Verify)
    assert result.credentials.check_keys(stored, server)  # type: ignore[attr-defined]
    assert not result.credentials.check_keys(hashlib.sha256(b"x").digest(), server)  # type: ignore[attr-defined]


def test_plain_rfc4616_forms() -> None:
    """RFC 4616: 'authzid NUL authcid NUL passwd', with and without initial response."""
    result = Plain(context()).start(b"\0tim\0tanstaaftanstaaf")
    assert isinstance(result, Verify)
    assert result.authzid is None
    assert isinstance(result.credentials, PasswordCredentials)
    assert result.credentials.username == "tim"
    assert result.credentials.checkPassword(b"tanstaaftanstaaf")
    assert not result.credentials.checkPassword("tanstaaf")
    mech = Plain(context())
    assert mech.start(None) == Challenge(b"")
    result = mech.step(b"Ursel\0Kurt\0xipj3plmq")
    assert isinstance(result, Verify)
    assert result.authzid == "Ursel"
    for bad in (b"no-nul", b"\0\0pw", b"\0user\0", b"a\0b\0c\0d", b"\0\xff\0pw"):
        assert isinstance(Plain(context()).start(bad), Malformed), bad


def test_login_with_and_without_initial_username() -> None:
    """LOGIN asks Username: then Password:; a user name as initial response skips the first."""
    mech = Login(context())
    assert mech.start(None) == Challenge(b"Username:")
    assert mech.step(b"alice") == Challenge(b"Password:")
    result = mech.step(b"secret")
    assert isinstance(result, Verify)
    assert result.credentials.username == "alice"  # type: ignore[attr-defined]
    mech = Login(context())
    assert mech.start(b"alice") == Challenge(b"Password:")
    assert isinstance(mech.step(b""), Malformed)


def test_cram_md5_rfc2195_example() -> None:
    """RFC 2195's example: tim / tanstaaftanstaaf against its challenge."""
    creds = CramMD5Credentials(
        "tim",
        b"<1896.697170952@postoffice.reston.mci.net>",
        b"b913a602c7eda7a495b4e6e7334d3890",
    )
    assert creds.checkPassword("tanstaaftanstaaf")
    assert not creds.checkPassword("tanstaaf")


def test_cram_md5_challenge_is_unique_and_checked() -> None:
    """The challenge carries random digits, the clock and the host name; no initial
    response is allowed; the digest must be 32 hex digits."""
    mech = CramMD5(context())
    assert isinstance(mech.start(b"x"), Malformed)
    mech = CramMD5(context())
    challenge = mech.start(None)
    assert isinstance(challenge, Challenge)
    assert challenge.data.startswith(b"<72340172838076673.697170952@mx.test>"[:6])
    assert challenge.data.endswith(b".697170952@mx.test>")
    digest = hmac.new(b"pw", challenge.data, hashlib.md5).hexdigest()
    result = mech.step(b"bob " + digest.encode())
    assert isinstance(result, Verify)
    assert result.credentials.checkPassword("pw")  # type: ignore[attr-defined]
    other = CramMD5(context(random=b"\x02" * 32)).start(None)
    assert isinstance(other, Challenge) and other.data != challenge.data
    assert isinstance(CramMD5(context()).step(b"bob abc"), Malformed)


def test_saslprep_rfc4013_examples() -> None:
    """RFC 4013 section 3's examples."""
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("user") == "user"
    assert saslprep("USER") == "USER"
    assert saslprep("\u00aa") == "a"
    assert saslprep("\u2168") == "IX"
    with pytest.raises(ValueError):
        saslprep("\u0007")
    with pytest.raises(ValueError):
        saslprep("\u0627\u0031")


def test_credentials_repr_hides_password() -> None:
    """Credentials objects never show the password in their repr."""
    assert "hunter2" not in repr(PasswordCredentials("alice", "hunter2"))
    assert "hunter2" not in repr(Verify(PasswordCredentials("alice", "hunter2")))
