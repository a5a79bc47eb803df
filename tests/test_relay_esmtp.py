"""The relay bus and the ESMTP features of issue 17, against a scripted next hop: DSN passed on
(RFC 3461 5.2.1) or a "relayed" notice (5.2.2), per-recipient results for an LMTP listener's
envelope."""

from __future__ import annotations

import email
import email.policy
from typing import Any

from test_relay_bus import envelope, make_bus, reply_of
from twisted.internet.defer import Deferred

from slimta_tx.reply import Reply

DSN_EHLO = b"250-nexthop.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 DSN\r\n"
PLAIN_EHLO = b"250-nexthop.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def dsn_envelope(recipients: dict[str, dict[str, Any]], **mail: Any) -> Any:
    env = envelope([], **mail)
    for rcpt, params in recipients.items():
        env.add_recipient(rcpt, params)
    return env


def result_of(d: Deferred[Any]) -> Any:
    assert d.called, "the bus has not answered"
    return d.result  # type: ignore[attr-defined]


# -- DSN --------------------------------------------------------------------------------------


def test_dsn_parameters_go_to_a_next_hop_that_offers_dsn() -> None:
    """RET, ENVID and NOTIFY as received; ORCPT as received, or added for a recipient that came
    without one (RFC 3461 5.2.1)."""
    bus, hop, _ = make_bus()
    env = dsn_envelope(
        {
            "a@example.test": {
                "NOTIFY": "failure,success",
                "ORCPT": "rfc822;orig+2Ba@example.test",
            },
            "b@example.test": {},
        },
        RET="hdrs",
        ENVID="Q+2B1",
    )
    d = bus.send(env)
    hop.greet(DSN_EHLO)
    assert hop.heard() == (
        b"MAIL FROM:<alice@edge.test> RET=HDRS ENVID=Q+2B1\r\n"
        b"RCPT TO:<a@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Ba@example.test\r\n"
        b"RCPT TO:<b@example.test> ORCPT=rfc822;b@example.test\r\n"
        b"DATA\r\n"
    )
    hop.say(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 2.0.0 queued\r\n")
    assert reply_of(d).code == "250"
    assert hop.heard() == b""  # no notice: the next hop reports delivery itself


def test_utf8_orcpt_goes_as_utf8_addr_xtext_without_smtputf8() -> None:
    bus, hop, _ = make_bus()
    env = dsn_envelope({"a@example.test": {"ORCPT": "utf-8;z\\x{F6}e@example.test"}})
    bus.send(env)
    hop.greet(DSN_EHLO)
    assert b"ORCPT=utf-8;z\\x{F6}e@example.test\r\n" in hop.heard()


def test_non_dsn_next_hop_gets_no_dsn_parameters_and_success_gets_a_relayed_notice() -> None:
    """RFC 3461 5.2.2: the parameters are not passed; recipients that asked NOTIFY=SUCCESS are
    reported "relayed" to the sender, by a notice from <> through the same next hop, before
    the client gets its 250."""
    bus, hop, _ = make_bus()
    env = dsn_envelope(
        {
            "a@example.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;first@example.test"},
            "b@example.test": {"NOTIFY": "NEVER"},
            "c@example.test": {},
        },
        ENVID="Q+2B1",
        RET="FULL",
    )
    d = bus.send(env)
    hop.greet(PLAIN_EHLO)
    assert hop.heard() == (
        b"MAIL FROM:<alice@edge.test>\r\nRCPT TO:<a@example.test>\r\n"
        b"RCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n"
    )
    hop.say(b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 2.0.0 Ok: queued as 77A\r\n")
    assert not d.called  # the notice goes first
    assert hop.heard() == b"MAIL FROM:<>\r\n"
    hop.say(b"250 ok\r\n")
    assert hop.heard() == b"RCPT TO:<alice@edge.test>\r\n"
    hop.say(b"250 ok\r\n")
    assert hop.heard() == b"DATA\r\n"
    hop.say(b"354 go\r\n")
    notice = hop.heard()
    hop.say(b"250 2.0.0 Ok: queued as 78B\r\n")
    assert str(reply_of(d)) == "250 2.0.0 Ok: queued as 77A"
    assert bus.pool.idle == 1
    assert notice.endswith(b"\r\n.\r\n")
    parsed = email.message_from_bytes(notice[:-3], policy=email.policy.SMTP)
    assert parsed["To"].addresses[0].addr_spec == "alice@edge.test"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    text, status, headers = parsed.iter_parts()
    assert "relayed to nexthop.test for <a@example.test>" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    report = status.as_bytes().decode()
    assert "Reporting-MTA: dns; edge.test" in report
    assert "Original-Envelope-Id: Q+1" in report
    assert "Original-Recipient: rfc822;first@example.test" in report
    assert "Final-Recipient: rfc822;a@example.test" in report
    assert "Action: relayed" in report and "Status: 2.0.0" in report
    assert "Remote-MTA: dns; nexthop.test" in report
    assert "Diagnostic-Code: smtp; 250 Ok: queued as 77A" in report
    assert "b@example.test" not in report and "c@example.test" not in report
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: hi" in headers.as_bytes() and b"body" not in headers.as_bytes()


def test_no_notice_for_the_null_sender_or_a_failed_delivery() -> None:
    bus, hop, _ = make_bus()
    env = dsn_envelope({"a@example.test": {"NOTIFY": "SUCCESS"}})
    env.sender = ""
    d = bus.send(env)
    hop.greet(PLAIN_EHLO)
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 ok\r\n")
    assert reply_of(d).code == "250"
    assert hop.heard() == b""
    d = bus.send(dsn_envelope({"a@example.test": {"NOTIFY": "SUCCESS"}}))
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")  # RSET, MAIL, RCPT, DATA
    hop.heard()
    hop.say(b"554 5.7.1 spam\r\n")
    assert reply_of(d).code == "554"
    assert hop.heard() == b""


def test_a_refused_notice_changes_nothing_for_the_client() -> None:
    bus, hop, _ = make_bus()
    d = bus.send(dsn_envelope({"a@example.test": {"NOTIFY": "SUCCESS"}}))
    hop.greet(PLAIN_EHLO)
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 2.0.0 queued\r\n")
    hop.heard()
    hop.say(b"550 5.7.1 no bounces here\r\n")
    assert hop.heard() == b"RSET\r\n"
    hop.say(b"250 ok\r\n")
    assert str(reply_of(d)) == "250 2.0.0 queued"
    assert bus.pool.idle == 1


# -- per-recipient results --------------------------------------------------------------------


def lmtp_envelope(recipients: list[str]) -> Any:
    env = envelope(recipients)
    env.protocol = "LMTP"  # came over an LMTP listener: replies per recipient
    return env


def test_lmtp_listener_envelope_gets_one_result_per_recipient_after_the_data() -> None:
    bus, hop, _ = make_bus(lmtp=True)
    d = bus.send(lmtp_envelope(["a@example.test", "b@example.test"]))
    hop.say(b"220 lmtp\r\n")
    hop.heard()
    hop.say(b"250-lmtp\r\n250 PIPELINING\r\n")
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    hop.heard()
    hop.say(b"250 2.0.0 saved\r\n552 5.2.2 over quota\r\n")
    results = result_of(d)
    assert [str(r) for r in results] == ["250 2.0.0 saved", "552 5.2.2 over quota"]


def test_recipients_refused_at_rcpt_do_not_stop_the_others_for_an_lmtp_listener() -> None:
    """The client hears each recipient, so the accepted ones get the message now."""
    bus, hop, _ = make_bus()
    d = bus.send(lmtp_envelope(["a@example.test", "nobody@example.test", "c@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
    assert hop.heard().endswith(b"\r\nbody\r\n.\r\n")
    hop.say(b"250 2.0.0 queued as 9\r\n")
    assert [str(r) for r in result_of(d)] == [
        "250 2.0.0 queued as 9",
        "550 5.1.1 unknown",
        "250 2.0.0 queued as 9",
    ]


def test_every_recipient_refused_for_an_lmtp_listener() -> None:
    bus, hop, _ = make_bus()
    d = bus.send(lmtp_envelope(["a@example.test", "b@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n450 4.2.1 busy\r\n550 5.1.1 unknown\r\n554 5.5.1 no recipients\r\n")
    assert [str(r) for r in result_of(d)] == ["450 4.2.1 busy", "550 5.1.1 unknown"]
    assert hop.heard() == b""


def test_refused_data_for_an_lmtp_listener_is_each_accepted_recipients_result() -> None:
    bus, hop, _ = make_bus()
    d = bus.send(lmtp_envelope(["a@example.test", "nobody@example.test"]))
    hop.greet()
    hop.heard()
    hop.say(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n451 4.3.0 try later\r\n")
    results: list[Reply] = result_of(d)
    assert [str(r) for r in results] == ["451 4.3.0 try later", "550 5.1.1 unknown"]
