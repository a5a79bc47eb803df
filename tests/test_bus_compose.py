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


# -- per-recipient results ----------------------------------------------------------------------


class ByLocalPart:
    """Answers per recipient: 'busy' 450, 'nobody' 550, anyone else ``ok``."""

    def __init__(self, ok: Reply | None = None) -> None:
        self.ok = ok or Reply("250", "stored", "2.0.0")
        self.seen: list[list[str]] = []

    def send(self, env: Envelope) -> Deferred[list[Reply]]:
        self.seen.append(list(env.recipients))
        table = {"busy": Reply("450", "busy", "4.2.1"), "nobody": Reply("550", "unknown", "5.1.1")}
        return succeed([table.get(r.split("@")[0], self.ok) for r in env.recipients])


def many(*locals_: str) -> Envelope:
    env = envelope()
    env.recipients, env.rcpt_params = [], []
    for local in locals_:
        env.add_recipient(f"{local}@example.com", {})
    return env


def results(d: Deferred[Any]) -> list[str]:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], list), out
    return [str(r) for r in out[0]]


def test_chain_hands_the_next_member_only_the_recipients_still_accepted() -> None:
    """A per-recipient member first: the next member gets only what it accepted, and the
    chain answers per recipient."""
    first, second = ByLocalPart(), RecordingBus(Reply("250", "relayed", "2.0.0"))
    out = results(ChainBus([first, second]).send(many("a", "nobody", "b", "busy")))
    assert out == ["250 2.0.0 relayed", "550 5.1.1 unknown", "250 2.0.0 relayed", "450 4.2.1 busy"]
    assert [m.envelope.recipients for m in second.messages] == [["a@example.com", "b@example.com"]]
    assert second.messages[0].envelope.queue_id  # same message, same queue id


def test_chain_stops_when_no_recipient_is_left() -> None:
    last = RecordingBus()
    out = results(ChainBus([ByLocalPart(), last]).send(many("nobody", "busy")))
    assert out == ["550 5.1.1 unknown", "450 4.2.1 busy"]
    assert last.messages == []


def test_tee_decides_recipient_by_recipient() -> None:
    """Every member gets every recipient; each recipient's verdict is its first required
    refusal, else the last required member's reply; an optional member changes nothing."""
    failing_optional = optional(ByLocalPart(Reply("451", "archive down", "4.3.0")))
    tee = TeeBus([RecordingBus(), failing_optional, ByLocalPart()])
    assert results(tee.send(many("a", "nobody"))) == ["250 2.0.0 stored", "550 5.1.1 unknown"]


def test_an_smtp_client_of_a_per_recipient_chain_hears_one_reply() -> None:
    edge = SmtpEdge(
        ChainBus([ByLocalPart()]),
        Policy(hostname="mx.test", accepted_domains=("example.com",)),
        reactor=Clock(),
    )
    d = Driver(edge=edge)
    d.greet()
    d.cmd("MAIL FROM:<s@sender.test>")
    d.cmd("RCPT TO:<a@example.com>")
    d.cmd("RCPT TO:<nobody@example.com>")
    d.cmd("DATA")
    [(code, text)] = d.send(b"hi\r\n.\r\n")
    assert (code, text) == (
        "550",
        "5.1.1 <nobody@example.com>: unknown\n5.1.1 Accepted for 1 of 2 recipients",
    )
