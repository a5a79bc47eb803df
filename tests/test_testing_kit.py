"""slimta_tx.testing as users use it, under pytest and under trial: deliberate failures do not
fail the user's test, and no timer is left in the real reactor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from twisted.internet.task import Clock

from slimta_tx import Policy, SmtpEdge
from slimta_tx.protocol import TEMPFAIL
from slimta_tx.testing import BUS_FAILURE, FailingBus, RecordingBus, connect, parse_replies
from tests.support.logs import captured_events

POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))
# As a client that waits where RFC 2920 says wait: EHLO alone, then a group closed by DATA,
# then the content after the 354 (else 554 5.5.0, improper pipelining).
TRANSACTION = (b"EHLO c\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def transact(proto: object, *more: bytes) -> None:
    """The transaction, then ``more``, each as the client sends it: after the last reply."""
    for data in (*TRANSACTION, *more):
        proto.dataReceived(data)  # type: ignore[attr-defined]


def test_failing_bus_answers_what_the_edge_answers_for_a_broken_bus() -> None:
    """FailingBus() gives the client exactly the 451 a raising bus gives, and logs nothing."""
    assert BUS_FAILURE.render() == TEMPFAIL.render()
    bus = FailingBus()
    proto, transport = connect(SmtpEdge(bus, POLICY, reactor=Clock()))
    with captured_events() as events:
        transact(proto, MESSAGE)
    assert parse_replies(transport.value())[-1] == (
        "451",
        "4.3.0 Temporary local problem, try again later",
    )
    assert [e for e in events if "log_failure" in e] == []
    assert len(bus.envelopes) == 1


def test_failing_bus_with_an_error_raises_it_and_the_edge_logs_it() -> None:
    error = ValueError("disk on fire")
    proto, transport = connect(SmtpEdge(FailingBus(error), POLICY, reactor=Clock()))
    with captured_events() as events:
        transact(proto, MESSAGE)
    assert parse_replies(transport.value())[-1][0] == "451"
    assert [e["log_failure"].value for e in events if "log_failure" in e] == [error]


def test_connect_runs_the_session_timers_on_the_edges_clock() -> None:
    clock = Clock()
    proto, transport = connect(SmtpEdge(RecordingBus(), POLICY, reactor=clock))
    assert proto.clock is clock
    clock.advance(POLICY.command_timeout)
    assert parse_replies(transport.value())[-1][0] == "421"


def test_connect_never_puts_a_timer_in_the_real_reactor() -> None:
    """An edge on the real reactor: the session gets a Clock of its own, and the reactor gets
    no DelayedCall from the session, through a whole transaction and QUIT."""
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
    proto, transport = connect(SmtpEdge(RecordingBus(), POLICY))
    assert isinstance(proto.clock, Clock) and proto.clock is not reactor
    transact(proto, MESSAGE, b"QUIT\r\n")
    assert [code for code, _ in parse_replies(transport.value())][-2:] == ["250", "221"]
    assert set(reactor.getDelayedCalls()) == before  # type: ignore[attr-defined]
    proto.clock.advance(POLICY.command_timeout)  # the idle timeout is the test's to run
    explicit = Clock()
    assert connect(SmtpEdge(RecordingBus(), POLICY), clock=explicit)[0].clock is explicit


# What a new user writes first (docs/embedding.md), with both of trial's test case classes.
NEW_USER_TESTS = textwrap.dedent(
    """
    from twisted.trial.unittest import SynchronousTestCase, TestCase

    from slimta_tx import Policy, SmtpEdge
    from slimta_tx.testing import FailingBus, RecordingBus, connect, parse_replies

    POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))
    SESSION = (  # each part after the reply to the one before, as clients send them
        b"EHLO c\\r\\n",
        b"MAIL FROM:<a@b.test>\\r\\nRCPT TO:<u@example.com>\\r\\nDATA\\r\\n",
        b"Subject: hi\\r\\n\\r\\nhello\\r\\n.\\r\\n",
    )


    def send(proto, parts):
        for part in parts:
            proto.dataReceived(part)


    class Checks:
        def test_failing_bus(self):
            proto, transport = connect(SmtpEdge(FailingBus(), POLICY))
            send(proto, SESSION)
            self.assertEqual(parse_replies(transport.value())[-1][0], "451")

        def test_edge_without_a_clock(self):
            bus = RecordingBus()
            proto, transport = connect(SmtpEdge(bus, POLICY))
            send(proto, SESSION)
            self.assertEqual(parse_replies(transport.value())[-1][0], "250")
            self.assertEqual(len(bus.messages), 1)

        BROKEN


    class Synchronous(Checks, SynchronousTestCase):
        pass


    class Asynchronous(Checks, TestCase):
        pass
    """
)


def run_trial(tmp_path: Path, extra: str = "") -> subprocess.CompletedProcess[str]:
    module = tmp_path / "test_new_user.py"
    module.write_text(NEW_USER_TESTS.replace("BROKEN", extra or "pass"))
    return subprocess.run(
        [sys.executable, "-m", "twisted.trial", "--temp-directory", "_trial", "test_new_user"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_new_users_tests_pass_under_trial(tmp_path: Path) -> None:
    """The tests from the issue (a failing bus's 451; an edge built without a Clock) pass
    with SynchronousTestCase and with TestCase: no logged error, no dirty reactor."""
    done = run_trial(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED (successes=4)" in done.stdout


def test_trial_still_catches_what_the_test_did_not_expect(tmp_path: Path) -> None:
    """The harness can fail: a raising bus whose logged error the test does not flush, and a
    timer a test leaves in the real reactor, are reported by trial as before."""
    broken = textwrap.indent(
        textwrap.dedent(
            """
            def test_raising_bus_not_flushed(self):
                proto, transport = connect(SmtpEdge(FailingBus(RuntimeError("x")), POLICY))
                send(proto, SESSION)

            def test_timer_left_behind(self):
                from twisted.internet import reactor
                if isinstance(self, TestCase):
                    reactor.callLater(300, lambda: None)
            """
        ),
        "    ",
    ).strip()
    done = run_trial(tmp_path, broken)
    assert done.returncode != 0
    assert "RuntimeError: x" in done.stdout
    assert "DirtyReactorAggregateError" in done.stdout
