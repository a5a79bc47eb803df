"""Per-recipient bus results: what an SMTP client hears of them (one reply), and the rules."""

from __future__ import annotations

from typing import Any

import pytest
from smtp_driver import Driver
from twisted.internet.defer import succeed
from zope.interface import implementer

from slimta_tx import IBus, Reply
from slimta_tx.envelope import Envelope
from slimta_tx.results import RecipientReplies, fold, per_recipient

OK = Reply("250", "queued", "2.6.0")
BUSY = Reply("450", "mailbox busy", "4.2.1")
UNKNOWN = Reply("550", "no such user", "5.1.1")


def test_all_accepted_is_the_first_reply() -> None:
    assert fold([OK, Reply("250", "other", "2.0.0")], ["a@x", "b@x"]) == OK


def test_a_temporary_failure_wins_over_a_permanent_one() -> None:
    """The client keeps the message and retries; nothing is lost."""
    reply = fold([OK, UNKNOWN, BUSY], ["a@x", "b@x", "c@x"])
    assert (reply.code, reply.enhanced_status_code) == ("450", "4.2.1")
    assert reply.message == "<c@x>: mailbox busy\nAccepted for 1 of 3 recipients"


def test_only_permanent_failures_give_the_first_of_them() -> None:
    reply = fold([UNKNOWN, Reply("552", "over quota", "5.2.2")], ["a@x", "b@x"])
    assert str(reply) == "550 5.1.1 <a@x>: no such user"


def test_per_recipient_expands_one_reply_and_checks_a_list() -> None:
    assert per_recipient(OK, 3) == [OK, OK, OK]
    assert per_recipient([OK, BUSY], 2) == [OK, BUSY]
    with pytest.raises(TypeError):
        per_recipient([OK], 2)
    with pytest.raises(TypeError):
        per_recipient("250 ok", 1)
    with pytest.raises(TypeError):
        per_recipient([OK, "250"], 2)


def test_recipient_replies_render_each_and_stand_for_their_fold() -> None:
    replies = RecipientReplies([OK, UNKNOWN], ["a@x", "b@x"])
    assert replies.render() == b"250 2.6.0 queued\r\n550 5.1.1 no such user\r\n"
    assert (replies.code, replies.enhanced_status_code) == ("550", "5.1.1")
    assert replies.copy().render() == replies.render()


@implementer(IBus)
class PerRecipientBus:
    """Accepts recipients whose local part is not 'busy' or 'nobody'."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def send(self, envelope: Envelope) -> Any:
        self.envelopes.append(envelope)
        answers = {"busy": BUSY, "nobody": UNKNOWN}
        return succeed([answers.get(r.split("@")[0], OK) for r in envelope.recipients])


@pytest.mark.parametrize(
    ("recipients", "expected"),
    [
        (["a", "b"], ("250", "2.6.0 queued")),
        (["a", "nobody", "busy"], ("450", "4.2.1 <busy@example.com>: mailbox busy")),
        (["nobody", "a"], ("550", "5.1.1 <nobody@example.com>: no such user")),
    ],
)
def test_an_smtp_client_hears_one_reply(recipients: list[str], expected: tuple[str, str]) -> None:
    """Over SMTP the per-recipient result becomes one reply (documented in docs/buses.md)."""
    d = Driver(bus=PerRecipientBus())
    d.greet()
    d.cmd("MAIL FROM:<s@sender.test>")
    for rcpt in recipients:
        assert d.cmd(f"RCPT TO:<{rcpt}@example.com>")[0] == "250"
    d.cmd("DATA")
    [(code, text)] = d.send(b"hi\r\n.\r\n")
    assert (code, text.split("\n")[0]) == expected


def test_a_bus_answering_the_wrong_number_of_replies_is_a_451() -> None:
    @implementer(IBus)
    class Wrong:
        def send(self, envelope: Envelope) -> Any:
            return succeed([OK, OK, OK])

    d = Driver(bus=Wrong())
    d.start_data()
    assert d.send(b"hi\r\n.\r\n") == [("451", "4.3.0 Temporary local problem, try again later")]
