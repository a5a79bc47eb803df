"""The pool of docs/deployment.md's third topology, run for real: two ``twistd slimta`` edges
with ``--workers 2`` behind one HAProxy (``send-proxy-v2``, ``option smtpchk``), both
publishing to one RabbitMQ quorum queue with publisher confirms. Many clients send through
HAProxy; one edge (its parent and its workers: the whole process group) is SIGKILLed in the
middle. Every message that got a 250 must be in the queue; a message is in it twice only where
a client saw no 250 for an attempt (at least once).

The HAProxy configuration and the edge's command are the ones the page prints, with only the
addresses, ports, the broker's URL, the queue name and the number of workers replaced
(:func:`config_changes`, :func:`edge_changes`): a change to the page changes what runs here.

Needs ``haproxy`` and RabbitMQ on 127.0.0.1:5672 (guest/guest); under ``CI=true`` a missing one
is a failure. By hand, with the counts printed::

    .venv/bin/python -m pytest tests/test_pool.py -s
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.doc_markers import ROOT, blocks
from tests.support.haproxy import HAProxy, Server, require_haproxy, running_haproxy
from tests.support.pool import (
    ACKED,
    NO_REPLY,
    Attempt,
    Clients,
    Relay,
    copy_of,
    count,
    group_members,
    source_address_works,
)
from tests.support.process import TWISTD, Twistd, twistd_argv

pytestmark = pytest.mark.slow

PAGE = ROOT / "docs" / "deployment.md"
SECTION = "## 3. "
URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
HOW_TO_START = (
    "RabbitMQ is not running on 127.0.0.1:5672; start it with 'rabbitmq-server -detached' "
    "(Debian package rabbitmq-server) or run .ci/services"
)
_LISTENING = re.compile(r"SharedListener starting on (\d+)")
_READY = re.compile(r"worker (\d) ready \(pid (\d+)\)")
WORKERS = 2


def pool_blocks() -> tuple[str, str]:
    """deployment.md's third topology: its HAProxy configuration and its edge command."""
    lines = PAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(SECTION)) + 1
    end = next(
        (i for i, line in enumerate(lines) if i > start and line.startswith("## ")), len(lines)
    )
    inside = [b for b in blocks(PAGE) if start < b.line <= end]
    configs = [b.code for b in inside if b.language == "haproxy"]
    commands = [b.code for b in inside if b.language == "sh" and b.code.startswith("twistd ")]
    assert len(configs) == 1 and len(commands) == 1, (
        f"{PAGE}: section {SECTION!r} should show one haproxy block and one twistd command"
    )
    return configs[0], commands[0]


def replaced(text: str, changes: Sequence[tuple[str, str]], what: str) -> str:
    """``text`` with each change made; a change whose old text is gone fails (the page
    changed: update the test with it)."""
    for old, new in changes:
        assert old in text, f"{what} in {PAGE.name} no longer has {old!r}"
        text = text.replace(old, new)
    return text


def config_changes(
    admin: Path, frontends: Sequence[tuple[str, int]], ports: dict[str, int]
) -> list[tuple[str, str]]:
    """What the test changes in the page's haproxy.cfg: where it listens and connects."""
    host, port = frontends[0]
    return [
        ("/run/haproxy/admin.sock", str(admin)),
        ("bind :25", f"bind {host}:{port}"),
        ("server mx1 10.0.0.11:2525", f"server mx1 127.0.0.1:{ports['mx1']}"),
        ("server mx2 10.0.0.12:2525", f"server mx2 127.0.0.1:{ports['mx2']}"),
    ]


def edge_changes(name: str, port: int, queue: str) -> list[tuple[str, str]]:
    """What the test changes in the page's edge command: 2 workers (this host has 2 cores),
    loopback, the local broker, a queue of its own."""
    return [
        ("twistd ", f"{TWISTD} "),
        ("--workers 4", f"--workers {WORKERS}"),
        ("haproxy:tcp:2525:interface=10.0.0.11", f"haproxy:tcp:{port}:interface=127.0.0.1"),
        ("--proxy-from 10.0.0.5/32", "--proxy-from 127.0.0.1/32"),
        ("mx1.example.com", f"{name}.example.com"),
        ("amqp://edge:secret@mq.example.com:5672/mail", URL),
        ("--amqp-queue inbound", f"--amqp-queue {queue}"),
    ]


def edge_argv(command: str, name: str, port: int, queue: str) -> list[str]:
    """The page's command as argv (line continuations joined, as the shell does)."""
    text = replaced(command, edge_changes(name, port, queue), "the edge command")
    return shlex.split(text.replace("\\\n", " "))


@contextmanager
def running_edge(argv: list[str], directory: Path, workers: int = WORKERS) -> Iterator[Twistd]:
    """The edge in a process group of its own (in ``directory``: twistd writes its pid file
    there); every worker ready. Afterwards SIGTERM, and SIGKILL to the group if it lingers."""
    directory.mkdir()
    edge = Twistd(argv, cwd=str(directory), new_session=True)
    try:
        if workers == 1:
            edge.wait_for_line(re.compile(r"AMQP: connected"), timeout=60)
        else:
            for slot in range(1, workers + 1):
                edge.wait_for_line(re.compile(rf"worker {slot} ready \(pid"))
                connected = re.compile(rf"\[worker-{slot} .*AMQP: connected")
                edge.wait_for_line(connected, timeout=60)
        yield edge
    finally:
        if edge.proc.poll() is None:
            edge.kill(signal.SIGTERM)
            try:
                edge.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(edge.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        edge.stop()


class Queue:
    """The test's own quorum queue on the local RabbitMQ (declared by the edges; read and
    deleted here, with a new connection if the broker restarted meanwhile)."""

    def __init__(self) -> None:
        self.name = f"slimta-pool-{uuid.uuid4().hex[:10]}"

    def _channel(self) -> Any:
        import pika

        deadline = time.monotonic() + 120
        while True:
            try:
                connection = pika.BlockingConnection(pika.URLParameters(URL))
                return connection, connection.channel()
            except pika.exceptions.AMQPConnectionError:
                # Another test may be restarting the shared broker: wait for it (bounded).
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def drain(self) -> list[tuple[Any, bytes]]:
        """Every message in the queue (taken: the queue ends empty)."""
        connection, channel = self._channel()
        try:
            out = []
            while True:
                method, properties, body = channel.basic_get(self.name, auto_ack=True)
                if method is None:
                    return out
                out.append((properties, body))
        finally:
            connection.close()

    def length(self) -> int:
        connection, channel = self._channel()
        try:
            return int(channel.queue_declare(self.name, passive=True).method.message_count)
        finally:
            connection.close()

    def delete(self) -> None:
        connection, channel = self._channel()
        try:
            channel.queue_delete(self.name)
        finally:
            connection.close()


@pytest.fixture
def queue() -> Iterator[Queue]:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail(HOW_TO_START)
        pytest.skip(HOW_TO_START)
    made = Queue()
    try:
        yield made
    finally:
        made.delete()


def wait_down(proxy: HAProxy, name: str, timeout: float = 60) -> float:
    """Seconds until HAProxy reports ``name`` DOWN (polled every 20 ms; bounded)."""
    start = time.monotonic()
    while proxy.status().get(name) != "DOWN":
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{name} not DOWN after {timeout} s: {proxy.status()}")
        time.sleep(0.02)  # polls HAProxy's admin socket (bounded)
    return time.monotonic() - start


def test_pool_loses_nothing_acknowledged_when_an_edge_is_killed(
    tmp_path: Path, queue: Queue
) -> None:
    """Two edges (2 workers each) behind HAProxy, one quorum queue; one edge SIGKILLed (its
    whole process group) while 20 clients send. HAProxy takes it out; the clients' retries land
    on the other edge; every 250 is in the queue once, under its queue id; every other copy
    comes from an attempt whose client saw no 250."""
    require_haproxy()
    assert source_address_works("127.0.0.2"), "loopback 127.0.0.2 is not usable here"
    config, command = pool_blocks()
    with ExitStack() as stack:
        edges: dict[str, Twistd] = {}
        ports: dict[str, int] = {}
        for name in ("mx1", "mx2"):
            argv = edge_argv(command, name, 0, queue.name)
            edges[name] = stack.enter_context(running_edge(argv, tmp_path / name))
            match = _LISTENING.search(edges[name].output)
            assert match is not None
            ports[name] = int(match.group(1))

        def make_config(admin: Path, frontends: Sequence[tuple[str, int]]) -> str:
            return replaced(config, config_changes(admin, frontends, ports), "haproxy.cfg")

        proxy = stack.enter_context(
            running_haproxy(
                [Server("mx1", ports["mx1"]), Server("mx2", ports["mx2"])],
                tmp_path / "haproxy",
                config=make_config,
                backend="edges",
            )
        )
        clients = Clients("127.0.0.1", proxy.port)
        runner = threading.Thread(target=clients.run, daemon=True)
        runner.start()
        clients.wait_for_acks(600, timeout=180)
        victim = edges["mx1"]
        members = group_members(victim.pid)
        workers = {int(m.group(2)) for m in _READY.finditer(victim.output)}
        assert workers <= set(members) and victim.pid in members  # parent and its workers
        killed_at_acks = clients.acked
        sessions_at_kill = int(proxy.stat("stot")["mx1"])
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        down_after = wait_down(proxy, "mx1")
        down_at = killed_at + down_after
        sessions_at_down = int(proxy.stat("stot")["mx1"])
        clients.wait_for_acks(clients.acked + 600, timeout=180)
        clients.stop()
        runner.join(200)
        assert not runner.is_alive()
        assert victim.proc.wait(10) == -signal.SIGKILL
        assert group_members(victim.pid) == []
        sessions = {name: int(n) for name, n in proxy.stat("stot").items()}
        log = proxy.log_text()
    copies = [copy_of(properties, body) for properties, body in queue.drain()]
    counts = count(clients.attempts, copies, "mx1.example.com", clients.source)
    print(
        f"\npool: {counts.summary()}\n"
        f"  SIGKILL of mx1 (pids {sorted(members)}) after {killed_at_acks} acknowledgements; "
        f"HAProxy marked it DOWN {down_after:.2f} s later, having sent it "
        f"{sessions_at_down - sessions_at_kill} more connections; HAProxy sessions {sessions}\n"
        + "".join(f"  haproxy: {line}\n" for line in log.splitlines() if "mx1 is DOWN" in line)
    )
    assert clients.failures == []
    assert counts.acknowledged == counts.messages  # every message got its 250 in the end
    assert counts.lost == 0, counts.examples
    assert counts.duplicates_of_acknowledged == 0, counts.examples
    assert counts.duplicates == counts.duplicates_without_250
    assert counts.not_from_client == 0  # PROXY v2 carried each client's own address
    assert counts.by_edge.get("mx1.example.com", 0) > 0
    assert counts.by_edge.get("mx2.example.com", 0) > 0
    # Out of rotation: once DOWN, HAProxy gave mx1 no more connections; every connection
    # begun since then reached mx2.
    assert sessions["mx1"] == sessions_at_down
    after_down = [a for history in clients.attempts.values() for a in history if a.began > down_at]
    assert sum(a.outcome == ACKED for a in after_down) >= 500
    assert {a.edge for a in after_down} <= {"mx2.example.com", None}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)  # polls another process (bounded)


def test_the_brokers_confirm_gates_the_250_and_a_kill_before_it_is_no_250(
    tmp_path: Path, queue: Queue
) -> None:
    """An edge with 2 workers publishes through a relay that holds back the broker's replies.
    The message is in the queue, and the client has no reply, until the confirm is let
    through; then 250 with that copy's queue id. A second message is in the queue, its confirm
    held, when the edge's process group is SIGKILLed: the client sees the connection drop
    after its final dot (no 250), sends again through another edge and gets a 250; the queue
    has both copies, and that duplicate is one at-least-once allows."""
    relay = Relay(("127.0.0.1", 5672))
    held_url = f"amqp://guest:guest@127.0.0.1:{relay.port}/%2F"
    common = ["--accept-domain", "example.com", "--amqp-queue", queue.name, "--amqp-timeout", "60"]
    try:
        with ExitStack() as stack:
            argv = twistd_argv(tmp_path / "unused", "--workers", "2", "--amqp", held_url, *common)
            edge = stack.enter_context(running_edge(argv, tmp_path / "held"))
            edge.wait_ready()
            clients = Clients("127.0.0.1", edge.port, source="127.0.0.1")
            outcomes: dict[str, Attempt] = {}

            def send(token: str, number: int = 1) -> threading.Thread:
                thread = threading.Thread(
                    target=lambda: outcomes.__setitem__(token, clients.attempt(token, number))
                )
                thread.start()
                return thread

            relay.hold()
            sending = send("gated")
            wait_for(lambda: queue.length() == 1, "the message in the queue")
            wait_for(lambda: relay.held_bytes > 0, "the broker's confirm at the relay")
            sending.join(1.0)  # the confirm is held: no reply may come
            assert sending.is_alive(), outcomes
            relay.release()
            sending.join(30)
            gated = outcomes["gated"]
            assert gated.outcome == ACKED, gated

            relay.hold()
            sending = send("in-flight")
            wait_for(lambda: queue.length() == 2, "the second message in the queue")
            wait_for(lambda: relay.held_bytes > 0, "its confirm at the relay")
            assert sending.is_alive(), outcomes
            os.killpg(edge.pid, signal.SIGKILL)
            sending.join(30)
            assert outcomes["in-flight"].outcome == NO_REPLY, outcomes["in-flight"]

            argv = twistd_argv(tmp_path / "unused", "--amqp", URL, *common)
            other = stack.enter_context(running_edge(argv, tmp_path / "other", workers=1))
            other.wait_ready()
            clients.port = other.port
            retry = clients.attempt("in-flight", 2)
            assert retry.outcome == ACKED, retry
    finally:
        relay.close()
    copies = [copy_of(properties, body) for properties, body in queue.drain()]
    attempts = {"gated": [gated], "in-flight": [outcomes["in-flight"], retry]}
    counts = count(attempts, copies, "mx.test", "127.0.0.1")
    print(f"\nconfirm gate: {counts.summary()}")
    assert [c.queue_id for c in copies if c.token == "gated"] == [gated.queue_id]
    assert counts.lost == 0 and counts.duplicates_of_acknowledged == 0
    assert counts.duplicates == counts.duplicates_without_250 == 1
    assert counts.in_flight_at_kill == counts.in_flight_at_kill_in_queue == 1
