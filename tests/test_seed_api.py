"""The seed API over real sockets: new(socket, bus), accept(), close(), socket activation, and
a graceful shutdown that loses nothing."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from smtp_driver import Driver
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from slimta_tx import Policy, Reply, SmtpEdge
from slimta_tx.accept import EdgeClosed, HeldConnection, new
from slimta_tx.service import EdgeService
from slimta_tx.testing import PendingBus, RecordingBus
from tests.support.doc_markers import blocks
from tests.support.mailbox import stored_messages
from tests.support.process import TWISTD
from tests.support.wire import WireClient, refuses

POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))
BODY = b"From: a@sender.test\r\nSubject: seed\r\n\r\nhello\r\n"


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def send_one(port: int, rcpt: str = "u@example.com") -> Any:
    """A whole transaction with smtplib (blocking: run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        return client.sendmail("a@sender.test", [rcpt], BODY)


# -- new(socket, bus) ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_new_serves_an_already_listening_socket() -> Any:
    """new(socket, bus): the edge serves a socket made elsewhere (the caller may close its
    copy); smtplib delivers through it; close() stops listening on it."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    bus = RecordingBus()
    edge = new(sock, bus, POLICY)
    sock.close()
    refused = yield deferToThread(send_one, port)
    assert refused == {}
    assert bus.messages[0].data == BODY
    yield edge.close()
    assert (yield deferToThread(refuses, port))


def test_adopting_a_socket_that_is_not_listening_is_refused() -> None:
    """A bound but not listening socket is a mistake, reported at once."""
    edge = SmtpEdge(RecordingBus(), POLICY, reactor=Clock())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="not listening"):
            edge.adopt(sock)


# -- accept() -----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_accept_hands_out_connections_one_at_a_time() -> Any:
    """Seed style: accept() fires with a callable per connection; calling it runs the whole
    session and returns a Deferred of its end. A connection that arrives while nobody is
    accepting waits, unanswered, until accept() takes it. After close(), accept() fails with
    EdgeClosed."""
    from twisted.internet import reactor

    bus = RecordingBus()
    edge = SmtpEdge(bus, POLICY)
    listening = yield edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    port = listening.getHost().port

    first: HeldConnection = yield Deferred.fromCoroutine(_accept_while(edge, send_one, port))
    delivery = first.delivery  # type: ignore[attr-defined]
    assert not delivery.called  # accepted but not started: no banner yet
    ended = first()
    yield ended
    assert (yield delivery) == {}

    # Nobody accepting: the next connection is held, unread and ungreeted.
    assert edge._accept_queue is not None
    arrived: Deferred[None] = Deferred()
    queue_arrived = edge._accept_queue.arrived

    def spy(held: HeldConnection) -> None:
        queue_arrived(held)
        arrived.callback(None)

    edge._accept_queue.arrived = spy  # type: ignore[method-assign]
    client = yield deferToThread(WireClient, port)
    yield arrived
    [held] = edge._accept_queue.held
    assert held.session_protocol is None
    second = yield edge.accept()
    assert second is held
    second()
    assert (yield deferToThread(client.reply))[0] == "220"
    assert (yield deferToThread(client.command, "QUIT"))[0] == "221"
    yield second.ended
    client.close()

    waiting = edge.accept()
    yield edge.close()
    with pytest.raises(EdgeClosed):
        yield waiting
    with pytest.raises(EdgeClosed):
        yield edge.accept()
    assert len(bus.messages) == 1


async def _accept_while(edge: SmtpEdge, client: Any, port: int) -> HeldConnection:
    handler = edge.accept()
    delivery = deferToThread(client, port)
    held = await handler
    held.delivery = delivery  # type: ignore[attr-defined]
    return held


# -- close() ------------------------------------------------------------------------------


def test_close_gives_idle_sessions_421_and_fires_when_all_are_gone() -> None:
    """close(): an idle session gets 421 4.3.2 at once; the Deferred fires once it is gone."""
    clock = Clock()
    edge = SmtpEdge(RecordingBus(), POLICY, reactor=clock)
    d = Driver(edge=edge, clock=clock)
    d.greet()
    closing = edge.close()
    assert d.read() == [("421", "4.3.2 mx.test Service shutting down")]
    assert d.closed and not closing.called
    d.proto.connectionLost(None)
    assert closing.called


def test_close_lets_the_transaction_in_progress_finish() -> None:
    """A session in the middle of DATA finishes its message (250, stored), then gets 421."""
    clock = Clock()
    bus = RecordingBus()
    edge = SmtpEdge(bus, POLICY, reactor=clock)
    d = Driver(edge=edge, clock=clock)
    d.start_data()
    d.send(BODY[:10])
    closing = edge.close()
    assert d.read() == [] and not d.closed
    replies = d.send(BODY[10:] + b".\r\n")
    assert [code for code, _ in replies] == ["250", "421"]
    assert bus.messages[0].data == BODY
    d.proto.connectionLost(None)
    assert closing.called


def test_close_waits_for_the_bus_then_answers() -> None:
    """Closing while the bus is storing the message: the client still gets the bus's 250."""
    clock = Clock()
    bus = PendingBus()
    edge = SmtpEdge(bus, POLICY, reactor=clock)
    d = Driver(edge=edge, clock=clock)
    d.start_data()
    d.send(BODY + b".\r\n")
    closing = edge.close()
    assert d.read() == []
    bus.pending[0][2].callback(Reply("250", "stored", "2.6.0"))
    assert d.read() == [("250", "2.6.0 stored"), ("421", "4.3.2 mx.test Service shutting down")]
    d.proto.connectionLost(None)
    assert closing.called


def test_sessions_that_outstay_the_grace_get_421_and_lose_no_acknowledged_mail() -> None:
    """After shutdown_grace seconds a session still in a transaction gets 421 4.3.2 (the
    client will retry: nothing it sent was acknowledged) and close() fires when it is gone."""
    clock = Clock()
    bus = RecordingBus()
    edge = SmtpEdge(bus, POLICY.evolve(shutdown_grace=10.0), reactor=clock)
    d = Driver(edge=edge, clock=clock)
    d.start_data()
    d.send(BODY)
    closing = edge.close()
    clock.advance(9.9)
    assert d.read() == []
    clock.advance(0.1)
    assert d.read() == [("421", "4.3.2 mx.test Service shutting down")]
    assert d.closed
    d.proto.connectionLost(None)
    assert closing.called
    assert bus.messages == []


def test_a_connection_arriving_during_close_is_turned_away() -> None:
    """Connections that still arrive while closing (already in the backlog) get 421 4.3.2."""
    clock = Clock()
    edge = SmtpEdge(RecordingBus(), POLICY, reactor=clock)
    edge.close()
    d = Driver(edge=edge, clock=clock)
    assert d.banner == [("421", "4.3.2 mx.test Service shutting down")]


def test_edge_service_stop_drains_through_close() -> None:
    """EdgeService.stopService (what twistd runs on SIGTERM) waits for the transaction in
    progress: the Deferred fires only once the session is gone."""
    clock = Clock()
    bus = RecordingBus()
    edge = SmtpEdge(bus, POLICY, reactor=clock)
    service = EdgeService(edge, [], reactor=clock)
    service.startService()
    d = Driver(edge=edge, clock=clock)
    d.start_data()
    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == []
    assert [code for code, _ in d.send(BODY + b".\r\n")] == ["250", "421"]
    d.proto.connectionLost(None)
    assert stopped == [None]
    assert len(bus.messages) == 1


@pytest_twisted.inlineCallbacks
def test_close_over_a_real_socket_refuses_new_clients_and_finishes_the_old() -> Any:
    """Real TCP: after close() the port refuses new connections while the client already in
    DATA finishes, gets its 250 and then 421."""
    from twisted.internet import reactor

    bus = RecordingBus()
    edge = SmtpEdge(bus, POLICY)
    listening = yield edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    port = listening.getHost().port
    client = yield deferToThread(WireClient, port)
    yield deferToThread(client.start_transaction, "a@sender.test", "u@example.com")
    closing = edge.close()
    yield deferLater(reactor, 0, lambda: None)  # one reactor turn: the port is closed
    assert (yield deferToThread(refuses, port))
    reply = yield deferToThread(client.command, BODY + b".")
    after = yield deferToThread(client.reply)
    assert reply[0] == "250" and after[0] == "421"
    client.close()
    yield closing
    assert bus.messages[0].data == BODY


# -- socket activation and SIGTERM, in a real twistd ------------------------------------------

_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "smtp"  # systemd >= 227 passes both; Twisted wants both
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.mark.slow
def test_systemd_socket_activation_and_sigterm_lose_nothing(tmp_path: Path) -> None:
    """twistd slimta --listen systemd:domain=INET:index=0 serves a listening socket inherited
    as fd 3 (LISTEN_FDS/LISTEN_PID, as systemd passes it). SIGTERM during DATA: the port
    closes, the client finishes and gets 250 then 421, the message is stored, and the
    process ends cleanly."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    maildir = tmp_path / "md"
    log = (tmp_path / "twistd.log").open("wb")
    argv = [
        sys.executable,
        "-c",
        _ACTIVATE,
        str(sock.fileno()),
        TWISTD,
        "-n",
        "--pidfile=",
        "slimta",
        "--listen",
        "systemd:domain=INET:index=0",
        "--maildir",
        str(maildir),
        "--hostname",
        "mx.test",
    ]
    proc = subprocess.Popen(argv, pass_fds=(sock.fileno(),), stdout=log, stderr=subprocess.STDOUT)
    sock.close()  # only twistd holds the listening socket now
    try:
        with WireClient(port) as client:
            client.start_transaction()
            client.send(BODY[:15])
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while not refuses(port):
                assert time.monotonic() < deadline, "the port never closed"
                time.sleep(0.01)  # bounded poll of another process
            code, text = client.command(BODY[15:] + b".")
            after = client.reply()
            assert client.closed_by_server()
        # twistd ends with the signal it stopped for (systemd counts SIGTERM as success).
        assert proc.wait(20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    output = (tmp_path / "twistd.log").read_text()
    assert (code, after[0]) == ("250", "421"), output
    [stored] = stored_messages(maildir)
    assert stored.body == BODY
    assert stored.envelope is not None and text.endswith(stored.envelope["queue_id"])
    assert "Traceback" not in output


# -- the docs' examples run and print what the pages say ----------------------------------------
# (tests/test_docs_examples.py runs each page's script and compares its output)

DOCS = Path(__file__).parent.parent / "docs" / "api"
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != "README.md")


def test_there_is_a_page_per_seed_function() -> None:
    """docs/api has one page per function of slimta.edge.smtp."""
    assert [p.stem for p in PAGES] == sorted(
        [
            "new",
            "set_banner_message",
            "set_max_message_size",
            "enable_tls",
            "set_validator",
            "enable_authentication",
            "accept",
            "close",
        ]
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_each_api_page_has_a_script_that_runs_and_its_output(page: Path) -> None:
    """Each page's Python example is a whole script, marked to run, followed by the output it
    must print."""
    [script] = [block for block in blocks(page) if block.language == "python"]
    assert script.marker is not None and script.marker.mode == "run"
    assert script.output
