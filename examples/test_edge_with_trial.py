"""Testing your own slimta_tx code with trial: ``trial examples/test_edge_with_trial.py``.

The code under test is a validator (``only_known_users``) on an edge. The tests use the kit in
``slimta_tx.testing``: sessions on a ``StringTransport`` with a ``Clock`` under
``SynchronousTestCase``, and a real socket with Twisted's own SMTP client under ``TestCase``,
which runs the reactor. docs/embedding.md explains each part; ``make test`` runs this module.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.mail.smtp import sendmail
from twisted.trial.unittest import SynchronousTestCase, TestCase

from slimta_tx import Policy, Reply, SmtpEdge
from slimta_tx.testing import FailingBus, PendingBus, RecordingBus, connect, parse_replies

POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))
# A group as RFC 2920 allows it: MAIL, RCPT and DATA together, after EHLO's reply (a client
# that sends on behind EHLO or DATA without waiting is refused with 554 5.5.0, as Postfix does).
TRANSACTION = b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def only_known_users(session: Any, reply: Reply, recipient: str, params: Any) -> None:
    """The code under test: a RCPT validator that knows one user."""
    if recipient.lower() != "bob@example.com":
        reply.set("550", "No such user here", "5.1.1")


class Session:
    """One SMTP session on a StringTransport, for SynchronousTestCase."""

    def __init__(self, edge: SmtpEdge) -> None:
        self.proto, self.transport = connect(edge)
        self.banner = self.read()
        self.ehlo = self.send(b"EHLO client.test\r\n")

    def read(self) -> list[tuple[str, str]]:
        replies = parse_replies(self.transport.value())
        self.transport.clear()
        return replies

    def send(self, data: bytes) -> list[tuple[str, str]]:
        self.proto.dataReceived(data)
        return self.read()


class ValidatorTests(SynchronousTestCase):
    """No reactor: the edge runs on a Clock, every reply is there as soon as it is made."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = RecordingBus()
        self.edge = SmtpEdge(self.bus, POLICY, reactor=self.clock)
        self.edge.set_validator("RCPT", only_known_users)
        self.session = Session(self.edge)

    def test_a_known_user_gets_the_message(self) -> None:
        self.assertEqual([code for code, _ in self.session.send(TRANSACTION)][-1], "354")
        [(code, _)] = self.session.send(MESSAGE + b".\r\n")
        self.assertEqual(code, "250")
        self.assertEqual(self.bus.messages[0].data, MESSAGE)
        self.assertEqual(self.bus.messages[0].envelope.recipients, ["bob@example.com"])

    def test_an_unknown_user_is_refused_at_rcpt(self) -> None:
        replies = self.session.send(
            b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<eve@example.com>\r\n"
        )
        self.assertEqual(replies[-1], ("550", "5.1.1 No such user here"))

    def test_an_idle_client_is_closed_after_the_timeout(self) -> None:
        """The edge's timers run on the Clock: advance it instead of waiting."""
        self.clock.advance(POLICY.command_timeout)
        self.assertEqual(self.session.read()[0][0], "421")
        self.assertTrue(self.session.transport.disconnecting)


class BusFailureTests(SynchronousTestCase):
    """The retry path: the client gets 451 and keeps its message."""

    def test_a_failing_bus_gives_451(self) -> None:
        session = Session(SmtpEdge(FailingBus(), POLICY, reactor=Clock()))
        session.send(TRANSACTION)
        self.assertEqual(
            session.send(MESSAGE + b".\r\n"),
            [("451", "4.3.0 Temporary local problem, try again later")],
        )

    def test_a_bus_that_raises_gives_451_and_is_logged(self) -> None:
        """A raising bus is logged by the edge; the test says that error is expected."""
        session = Session(SmtpEdge(FailingBus(ValueError("disk on fire")), POLICY, Clock()))
        session.send(TRANSACTION)
        self.assertEqual(session.send(MESSAGE + b".\r\n")[0][0], "451")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_the_client_waits_while_the_bus_works(self) -> None:
        """PendingBus: the reply comes only when the test fires the delivery."""
        bus = PendingBus()
        session = Session(SmtpEdge(bus, POLICY, reactor=Clock()))
        session.send(TRANSACTION)
        self.assertEqual(session.send(MESSAGE + b".\r\n"), [])
        envelope, _, delivery = bus.pending[0]
        delivery.callback(Reply("250", f"Queued as {envelope.queue_id}", "2.6.0"))
        self.assertEqual(session.read()[0][0], "250")


class RealReactorTests(TestCase):
    """TestCase runs the reactor, and fails a test that leaves anything in it."""

    def test_an_edge_on_the_real_reactor_leaves_no_timer(self) -> None:
        """connect() runs the session's timers on a Clock of its own when the edge has the
        real reactor, so the idle timer does not outlive the test."""
        bus = RecordingBus()
        session = Session(SmtpEdge(bus, POLICY))
        session.send(TRANSACTION)
        self.assertEqual(session.send(MESSAGE + b".\r\n")[0][0], "250")

    @inlineCallbacks
    def test_twisted_mail_client_over_a_real_socket(self) -> Any:
        """Twisted's own client on 127.0.0.1, port 0. It turns every LF into CRLF, so give
        it the message with LF line ends (a CRLF message would reach us as CR CR LF and get
        550 5.5.2)."""
        from twisted.internet import reactor

        bus = RecordingBus()
        edge = SmtpEdge(bus, POLICY)
        edge.set_validator("RCPT", only_known_users)
        port = yield edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        self.addCleanup(edge.close)
        accepted, _ = yield sendmail(
            "127.0.0.1",
            "alice@sender.test",
            ["bob@example.com"],
            b"Subject: hi\n\nhello\n",
            port=port.getHost().port,
        )
        self.assertEqual(accepted, 1)
        self.assertEqual(bus.messages[0].data, MESSAGE)
