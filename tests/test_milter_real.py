"""Real milters in front of ``twistd slimta --milter ...`` (as users run it): OpenDKIM signs,
Rspamd rejects GTUBE and adds its headers to clean mail; the client is smtplib."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.support.mailbox import stored_messages
from tests.support.milters import GTUBE, dkim_verify, opendkim, opendmarc, rspamd
from tests.support.process import running_twistd, twistd_argv

pytestmark = pytest.mark.slow

CLEAN = (
    "From: Alice <alice@sender.test>\r\n"
    "To: u@example.com\r\n"
    "Subject: a clean message\r\n"
    "Message-ID: <clean-1@sender.test>\r\n"
    "Date: Sun, 06 Dec 2026 07:00:00 +0000\r\n"
    "\r\n"
    "Hello,\r\n\r\nnothing to see here.\r\n"
)


def send(port: int, body: str, sender: str = "alice@sender.test") -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        return client.sendmail(sender, ["u@example.com"], body)


def test_opendkim_signs_and_the_signature_verifies(tmp_path: Path) -> None:
    """A message from the signing domain is stored with a DKIM-Signature that opendkim in
    verify mode accepts (and rejects once the body is changed); the envelope records it."""
    maildir = tmp_path / "maildir"
    keys = tmp_path / "dkim"
    keys.mkdir()
    with opendkim(keys) as dkim:
        argv = twistd_argv(maildir, "--milter", f"{dkim.spec},name=opendkim")
        with running_twistd(argv) as server:
            assert send(server.port, CLEAN) == {}
    [stored] = stored_messages(maildir)
    assert stored.body.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert b" d=sender.test; s=sel;" in stored.body
    assert "verification (s=sel, d=sender.test, 2048-bit key) succeeded" in dkim_verify(
        keys, stored.trace + stored.body
    )
    tampered = stored.body.replace(b"nothing to see", b"something to see")
    assert "failed" in dkim_verify(keys, tampered)
    assert stored.envelope is not None
    assert stored.envelope["milter_actions"] == [
        {"milter": "opendkim", "action": "insert_header", "detail": "DKIM-Signature"}
    ]


def test_opendkim_then_opendmarc_in_order(tmp_path: Path) -> None:
    """Two real milters, in the order given: both act on the stored message, and the
    envelope records which did what, in that order."""
    maildir = tmp_path / "maildir"
    (tmp_path / "dkim").mkdir()
    (tmp_path / "dmarc").mkdir()
    with opendkim(tmp_path / "dkim") as dkim, opendmarc(tmp_path / "dmarc") as dmarc:
        argv = twistd_argv(
            maildir,
            *("--milter", f"{dkim.spec},name=opendkim"),
            *("--milter", f"{dmarc.spec},name=opendmarc"),
        )
        with running_twistd(argv) as server:
            assert send(server.port, CLEAN) == {}
    [stored] = stored_messages(maildir)
    head = stored.body.split(b"\r\n\r\n")[0]
    assert (
        b"Authentication-Results: mx.test; dmarc=none (p=none dis=none) header.from=sender.test"
        in head
    )
    assert head.count(b"DKIM-Signature: ") == 1
    assert stored.envelope is not None
    assert [(a["milter"], a["detail"]) for a in stored.envelope["milter_actions"]] == [
        ("opendkim", "DKIM-Signature"),
        ("opendmarc", "Authentication-Results"),
    ]


def test_rspamd_rejects_gtube_and_marks_clean_mail(tmp_path: Path) -> None:
    """Through rspamd_proxy in milter mode: GTUBE gets a 5xx at the end of data; a clean
    message is stored with the headers Rspamd adds, its queue id being ours (the i macro)."""
    maildir = tmp_path / "maildir"
    with rspamd(tmp_path / "rspamd") as spam:
        argv = twistd_argv(maildir, "--milter", f"{spam.spec},name=rspamd")
        with running_twistd(argv) as server:
            spam_body = CLEAN.replace("nothing to see here.", GTUBE)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                send(server.port, spam_body)
            assert refused.value.smtp_code == 554
            assert refused.value.smtp_error == b"5.7.1 Gtube pattern"
            assert send(server.port, CLEAN) == {}
    [stored] = stored_messages(maildir)
    head = stored.body.split(b"\r\n\r\n")[0].decode()
    assert "\r\nX-Spamd-Result: default: False [" in head
    assert "\r\nX-Rspamd-Server: " in head
    assert stored.envelope is not None
    assert f"\r\nX-Rspamd-Queue-Id: {stored.envelope['queue_id']}" in head
    assert stored.body.endswith(b"nothing to see here.\r\n")


def test_a_milter_that_is_down_tempfails_and_accept_goes_on(tmp_path: Path) -> None:
    """Nothing listening: the default action (tempfail) is a 451 at MAIL; with
    default_action=accept the mail is stored."""
    from tests.support.milters import free_port

    port = free_port()
    maildir = tmp_path / "maildir"
    argv = twistd_argv(maildir, "--milter", f"inet:127.0.0.1:{port}")
    with running_twistd(argv) as server, pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(server.port, CLEAN)
    assert refused.value.smtp_code == 451
    argv = twistd_argv(maildir, "--milter", f"inet:127.0.0.1:{port},default_action=accept")
    with running_twistd(argv) as server:
        assert send(server.port, CLEAN) == {}
    assert len(stored_messages(maildir)) == 1
