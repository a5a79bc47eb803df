"""Connection capacity (issue 11): the listen backlog, descriptors kept in reserve, the raised
descriptor limit, and a global connection limit."""

from __future__ import annotations

import re
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent

from slimta_tx import Policy, SmtpEdge
from slimta_tx.capacity import (
    DEFAULT_LISTEN_BACKLOG,
    ConnectionGate,
    descriptor_reserve,
    raise_descriptor_limit,
    with_backlog,
)
from slimta_tx.protocol import ESMTPServerProtocol
from slimta_tx.spool import Spool
from slimta_tx.tap import Options, makeService
from slimta_tx.testing import RecordingBus, connect, parse_replies
from tests.support.logs import captured_events
from tests.support.process import TWISTD, Twistd

TOO_MANY = ("421", "4.7.0 mx.test Too many connections, try again later")
TOO_BUSY = ("421", "4.3.2 mx.test Too busy, try again later")


# -- the listen backlog ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:25", "tcp:25:backlog=4096"),
        ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1:backlog=4096"),
        ("tcp:port=25", "tcp:port=25:backlog=4096"),
        ("TCP6:25:interface=\\:\\:", "TCP6:25:interface=\\:\\::backlog=4096"),
        ("unix:/run/smtp.sock", "unix:/run/smtp.sock:backlog=4096"),
        ("ssl:465:privateKey=k.pem", "ssl:465:privateKey=k.pem:backlog=4096"),
        ("tcp:25:backlog=10", "tcp:25:backlog=10"),
        ("tcp:backlog=10:25", "tcp:backlog=10:25"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ("txsni:certs:tcp:465", "txsni:certs:tcp:465"),
    ],
)
def test_with_backlog(description: str, expected: str) -> None:
    """Endpoint types that take a backlog get the default when they name none; a backlog the
    user wrote, and endpoints that do not listen themselves (systemd), are left alone."""
    assert with_backlog(description) == expected


class _ThreadedMemoryReactor(MemoryReactorClock):
    """The Maildir bus's writer thread reports back with callFromThread (its start-up clean-up
    runs there): calls queued here and never run, as nothing in this test waits for them."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[object] = []

    def callFromThread(self, f: object, *args: object, **kwargs: object) -> None:
        self.from_threads.append((f, args, kwargs))


@pytest.mark.parametrize(
    ("listen", "backlog"),
    [(None, DEFAULT_LISTEN_BACKLOG), ("tcp:2600:interface=127.0.0.1:backlog=7", 7)],
)
def test_listeners_the_cli_builds_get_a_large_backlog(
    tmp_path: Path, listen: str | None, backlog: int
) -> None:
    """``twistd slimta`` listens with a backlog of 4096 (Twisted's default is 50), unless the
    description names its own."""
    config = Options()
    args = ["--maildir", str(tmp_path / "md")]
    if listen:
        args += ["--listen", listen]
    config.parseOptions(args)
    reactor = _ThreadedMemoryReactor()
    service = makeService(config, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    try:
        [(_port, _factory, got, _interface)] = reactor.tcpServers
        assert got == backlog
    finally:
        service.stopService()


# -- descriptors -------------------------------------------------------------------------------


class FakeResource:
    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


def test_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    fake = FakeResource(1024, 524288)
    limits = raise_descriptor_limit(fake)
    assert fake.calls == [(524288, 524288)]
    assert (limits.before, limits.soft, limits.hard, limits.raised) == (1024, 524288, 524288, True)


def test_soft_limit_at_the_hard_one_is_left_alone() -> None:
    fake = FakeResource(4096, 4096)
    limits = raise_descriptor_limit(fake)
    assert fake.calls == []
    assert not limits.raised


def test_unlimited_hard_limit_means_the_kernel_maximum() -> None:
    """RLIM_INFINITY cannot be a soft descriptor limit on Linux: fs.nr_open is the most."""
    fake = FakeResource(1024, resource.RLIM_INFINITY)
    limits = raise_descriptor_limit(fake)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert fake.calls == [(nr_open, resource.RLIM_INFINITY)]
    assert limits.soft == nr_open


def test_a_refused_raise_is_reported_not_raised() -> None:
    limits = raise_descriptor_limit(FakeResource(1024, 4096, refuse=True))
    assert (limits.soft, limits.error) == (1024, "not allowed")


@pytest.mark.parametrize(
    ("limit", "reserve"), [(256, 128), (1024, 128), (20000, 2000), (524288, 52428), (100, 50)]
)
def test_descriptor_reserve(limit: int, reserve: int) -> None:
    """A tenth of the limit, at least 128, at most half."""
    assert descriptor_reserve(limit) == reserve


# -- the gate ------------------------------------------------------------------------------------


def make_edge(gate: ConnectionGate) -> SmtpEdge:
    edge = SmtpEdge(RecordingBus(), Policy(hostname="mx.test"), reactor=Clock())
    gate.install(edge)
    return edge


def test_max_connections_turns_the_next_one_away_at_once() -> None:
    """Above max_connections: 421 4.7.0 and a close, no session built (no banner hooks, no
    state); once a session ends, the next client is served again."""
    gate = ConnectionGate(max_connections=2)
    edge = make_edge(gate)
    sessions = [connect(edge) for _ in range(2)]
    with captured_events() as events:
        proto, transport = connect(edge)
        third = connect(edge)
    assert not isinstance(proto, ESMTPServerProtocol)
    assert parse_replies(transport.value()) == [TOO_MANY]
    assert transport.disconnecting
    assert len(edge.connections) == 2
    assert gate.turned_away == {"max-connections": 2, "descriptors": 0}
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert warnings == ["turning new connections away: 2 connections reached (max-connections)"], (
        "one warning per episode, not one per connection"
    )
    for turned_away in (proto, third[0]):
        turned_away.connectionLost(None)  # type: ignore[attr-defined]
    first, _ = sessions[0]
    first.connectionLost(None)  # type: ignore[attr-defined]
    with captured_events() as events:
        proto, transport = connect(edge)
    assert isinstance(proto, ESMTPServerProtocol)
    assert transport.value().startswith(b"220 ")
    assert "accepting connections again (2 turned away)" in [formatEvent(e) for e in events]


def test_descriptor_ceiling_counts_sessions_spool_files_and_turn_aways() -> None:
    """Past limit - reserve descriptors in use: 421 4.3.2. A spool file holds a descriptor
    too, and so does a connection being turned away until it is gone."""
    gate = ConnectionGate(descriptor_limit=10, reserve=6)  # room for 4
    edge = make_edge(gate)
    for _ in range(3):
        connect(edge)
    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(directory, memory_limit=0)
        spool.write(b"x")
        try:
            proto, transport = connect(edge)
            assert parse_replies(transport.value()) == [TOO_BUSY]
            assert gate.turning_away == 1
            spool.close()
            # The turned-away connection still holds its descriptor.
            assert parse_replies(connect(edge)[1].value()) == [TOO_BUSY]
            proto.connectionLost(None)  # type: ignore[attr-defined]
            assert gate.turning_away == 1
        finally:
            spool.close()
    assert gate.turned_away["descriptors"] == 2


def test_implicit_tls_edge_turns_away_without_a_reply() -> None:
    """On port 465 the client expects a TLS handshake: plaintext would be garbage, so the
    connection is closed without one (and without the cost of a handshake)."""
    gate = ConnectionGate(max_connections=1)
    edge = make_edge(gate)
    edge.tls_immediately = True
    edge.tls_context = object()
    edge.connections.add(object())  # type: ignore[arg-type]  # one session, already
    proto = edge.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value() == b""
    assert transport.disconnected


def test_gate_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionGate(max_connections=0)
    with pytest.raises(ValueError, match="reserve"):
        ConnectionGate(descriptor_limit=100, reserve=100)


# -- end to end ----------------------------------------------------------------------------------


def _nofile(soft: int, hard: int) -> Any:
    def set_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_limits


def _start(argv: list[str], soft: int, hard: int, cwd: str) -> Twistd:
    process = Twistd(argv, cwd=cwd, preexec_fn=_nofile(soft, hard))
    process.wait_ready()
    return process


def _greeting(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def _transaction(sock: socket.socket) -> bytes:
    sock.sendall(
        b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    data = b""
    sock.settimeout(20)
    while b"\r\n221 " not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_twistd_at_a_low_descriptor_limit_turns_away_and_keeps_the_bus_working(
    tmp_path: Path,
) -> None:
    """The issue's case: nofile 256/512. The soft limit is raised to 512 and logged; of 500
    simultaneous connections the ones past the reserve get 421 4.3.2 at once (none hang, none
    is closed without a reply), and every transaction on the admitted ones is stored: the bus
    never meets EMFILE."""
    maildir = tmp_path / "md"
    argv = [TWISTD, "-n", "slimta", "--listen", "tcp:0:interface=127.0.0.1"]
    argv += ["--maildir", str(maildir), "--accept-domain", "example.com"]
    server = _start(argv, 256, 512, str(tmp_path))
    sockets: list[socket.socket] = []
    try:
        line = server.wait_for_line(re.compile(r"file descriptors: soft limit"))
        assert "soft limit 512 (was 256, hard limit 512)" in line
        assert "128 kept for the bus and spool" in line and "past 384 in use" in line
        greetings = []
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            sockets.append(sock)
            greetings.append(_greeting(sock))
        admitted = [s for s, g in zip(sockets, greetings, strict=True) if g.startswith(b"220 ")]
        refused = [g for g in greetings if not g.startswith(b"220 ")]
        assert len(admitted) + len(refused) == 500
        assert 380 <= len(admitted) <= 384
        assert {g.split(b" ", 2)[1] for g in refused} == {b"4.3.2"}
        assert all(g.startswith(b"421 ") for g in refused)
        results = [_transaction(sock) for sock in admitted]
        stored = [r for r in results if b"\r\n250 2.6.0 " in r]
        assert len(stored) == len(admitted), [r for r in results if r not in stored][:2]
        assert len(list((maildir / "new").iterdir())) == len(admitted)
        assert "Too many open files" not in server.output
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_twistd_max_connections(tmp_path: Path) -> None:
    """--max-connections 3: the fourth client at once gets 421 4.7.0 and a close; after one
    leaves, a new client is served."""
    argv = [TWISTD, "-n", "slimta", "--listen", "tcp:0:interface=127.0.0.1"]
    argv += ["--maildir", str(tmp_path / "md"), "--max-connections", "3"]
    server = Twistd(argv, cwd=str(tmp_path))
    held: list[socket.socket] = []
    try:
        server.wait_ready()
        time.sleep(0.2)  # bounded: let the readiness probe's connection close on the server
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            held.append(sock)
            assert _greeting(sock).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as extra:
            reply = _greeting(extra)
            assert reply.startswith(b"421 4.7.0 ") and b"Too many connections" in reply
            assert extra.recv(100) == b""  # closed at once
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            with socket.create_connection(("127.0.0.1", server.port), timeout=20) as again:
                if _greeting(again).startswith(b"220 "):
                    break
            assert time.monotonic() < deadline, "never admitted again"
            time.sleep(0.05)  # bounded retry while the server notices the close
    finally:
        for sock in held:
            sock.close()
        server.stop()
