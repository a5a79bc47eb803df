"""ChainBus and TeeBus: 2xx only if every required member confirmed; which reply wins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from smtp_driver import Driver
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from slimta_tx import Policy, SmtpEdge
from slimta_tx.bus.compose import ChainBus, TeeBus, optional
from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply
from slimta_tx.spool import Spool
from slimta_tx.testing import FailingBus, PendingBus, RecordingBus

MESSAGE = b"Subject: x\r\n\r\nbody\r\n"


def envelope() -> Envelope:
    env = Envelope(sender="a@sender.test")
    env.add_recipient("u@example.com", {})
    spool = Spool()
    spool.write(MESSAGE)
    env.message = spool
    return env


def result(d: Deferred[Reply]) -> Reply:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Reply), out
    return out[0]


def now(f: Any) -> Deferred[Any]:
    return succeed(f())


def test_chain_maildir_then_next_hop_passes_on_the_last_reply(tmp_path: Path) -> None:
    """Maildir copy then a next hop: the client sees the next hop's 250; the copy exists."""
    maildir = MaildirBus(str(tmp_path), run_in_thread=now)
    relay = RecordingBus(Reply("250", "2.0.0 Ok: queued as NEXTHOP1", "2.0.0"))
    reply = result(ChainBus([maildir, relay]).send(envelope()))
    assert reply.code == "250" and "NEXTHOP1" in reply.message
    assert len(list((tmp_path / "new").iterdir())) == 1
    assert relay.messages[0].data == MESSAGE


def test_chain_stops_at_the_first_required_failure(tmp_path: Path) -> None:
    """If the local copy fails, the next hop is not tried and the client gets 451."""
    relay = RecordingBus()
    reply = result(ChainBus([FailingBus(), relay]).send(envelope()))
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.3.0")
    assert relay.messages == []


def test_chain_passes_on_a_later_members_refusal(tmp_path: Path) -> None:
    """The copy is stored but the next hop refuses: its reply (here 550) goes to the client."""
    maildir = MaildirBus(str(tmp_path), run_in_thread=now)
    relay = RecordingBus(Reply("550", "No such user", "5.1.1"))
    reply = result(ChainBus([maildir, relay]).send(envelope()))
    assert (reply.code, reply.enhanced_status_code) == ("550", "5.1.1")


def test_optional_member_failure_does_not_fail_the_message() -> None:
    """A best-effort archive that fails is logged; the client still gets the required 250."""
    main = RecordingBus()
    reply = result(ChainBus([optional(FailingBus(), "archive"), main]).send(envelope()))
    assert reply.code == "250"
    assert len(main.messages) == 1


def test_tee_needs_every_required_member() -> None:
    """Tee: one required member answering 451 makes the client's reply 451."""
    ok, down = RecordingBus(), RecordingBus(Reply("451", "busy", "4.3.0"))
    reply = result(TeeBus([ok, down]).send(envelope()))
    assert reply.code == "451"
    assert len(ok.messages) == 1  # a copy was kept: the retry will make a second one


def test_tee_waits_for_all_members_including_optional_ones() -> None:
    """Tee fires only when every member answered, so none still reads the spool afterwards."""
    slow = PendingBus()
    main = RecordingBus()
    d = TeeBus([main, optional(slow)]).send(envelope())
    assert not d.called
    slow.pending[0][2].callback(Reply("451", "later", "4.3.0"))
    assert result(d).code == "250"


def test_tee_sends_to_all_members_at_once() -> None:
    """Both members have the message before either answers."""
    first, second = PendingBus(), PendingBus()
    d = TeeBus([first, second]).send(envelope())
    assert len(first.pending) == len(second.pending) == 1
    second.pending[0][2].callback(Reply("250", "second", "2.0.0"))
    first.pending[0][2].callback(Reply("250", "first", "2.0.0"))
    assert result(d).message == "second"  # the last required member's reply


def test_member_returning_a_non_reply_is_451() -> None:
    """A member that answers something other than a Reply fails safe: 451."""

    class Broken:
        def send(self, envelope: Envelope) -> Any:
            return succeed("ok")

    assert result(ChainBus([Broken()]).send(envelope())).code == "451"


def test_a_composition_needs_a_required_bus() -> None:
    """Nothing to compose, or only optional members, or a non-bus: refused when built."""
    with pytest.raises(ValueError):
        ChainBus([])
    with pytest.raises(ValueError):
        TeeBus([optional(RecordingBus())])
    with pytest.raises(TypeError):
        ChainBus([object()])


def test_start_and_stop_reach_every_member() -> None:
    """start() and stop() are forwarded to members that have them (stop in reverse order)."""
    calls: list[str] = []

    class Lifecycle(RecordingBus):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def start(self) -> None:
            calls.append(f"start {self.name}")

        def stop(self) -> Deferred[None]:
            calls.append(f"stop {self.name}")
            return succeed(None)

    bus = ChainBus([Lifecycle("a"), RecordingBus(), Lifecycle("b")])
    bus.start()
    assert bus.stop().called
    assert calls == ["start a", "start b", "stop b", "stop a"]


def test_client_sees_250_only_when_both_copies_are_safe(tmp_path: Path) -> None:
    """Over SMTP: with the second member failing the client gets 451, then 250 once it works."""
    maildir = MaildirBus(str(tmp_path), run_in_thread=now)
    relay = RecordingBus(Reply("451", "next hop down", "4.4.1"))
    clock = Clock()
    edge = SmtpEdge(
        ChainBus([maildir, relay]),
        Policy(hostname="mx.test", accepted_domains=("example.com",)),
        clock,
    )
    driver = Driver(edge=edge, clock=clock)
    driver.start_data()
    code, text = driver.send(MESSAGE + b".\r\n")[0]
    assert (code, text.split()[0]) == ("451", "4.4.1")
    relay.reply = None
    assert driver.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n") == [
        "250",
        "250",
        "354",
    ]
    assert driver.send(MESSAGE + b".\r\n")[0][0] == "250"
    assert len(list((tmp_path / "new").iterdir())) == 2  # at-least-once: two copies
