"""The AMQP bus against a real RabbitMQ on 127.0.0.1:5672 (guest/guest).

Under ``CI=true`` a missing broker fails these tests; elsewhere they skip, saying how to start
one. Every test uses queues and exchanges of its own (random names) and deletes them.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.mail.smtp import SMTPDeliveryError, sendmail

from slimta_tx import Policy, SmtpEdge
from slimta_tx.bus.amqp import AmqpBus
from slimta_tx.bus.maildir import envelope_of
from slimta_tx.envelope import Envelope
from slimta_tx.spool import Spool

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
ROOT = Path(__file__).resolve().parents[1]
HOW_TO_START = (
    "RabbitMQ is not running on 127.0.0.1:5672; start it with 'rabbitmq-server -detached' "
    "(Debian package rabbitmq-server) or run .ci/services"
)


def broker_listening() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


def load_consumer_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "amqp_consumer_example", ROOT / "examples" / "amqp_consumer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Admin:
    """Declares and deletes the test's own queues and exchanges (pika's blocking client)."""

    def __init__(self) -> None:
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.reconnect()

    def reconnect(self) -> None:
        import pika

        self.connection = pika.BlockingConnection(pika.URLParameters(URL))
        self.channel = self.connection.channel()

    def name(self, kind: str) -> str:
        name = f"slimta-test-{kind}-{uuid.uuid4().hex[:10]}"
        (self.queues if kind == "q" else self.exchanges).append(name)
        return name

    def queue(self, arguments: dict[str, Any] | None = None) -> str:
        name = self.name("q")
        args = {"x-queue-type": "quorum", **(arguments or {})}
        self.channel.queue_declare(name, durable=True, arguments=args)
        return name

    def exchange(self) -> str:
        name = self.name("x")
        self.channel.exchange_declare(name, exchange_type="direct", durable=False)
        return name

    def drain(self, queue: str) -> list[tuple[Any, bytes]]:
        """Every message now in ``queue`` (acknowledged, so the queue ends empty)."""
        out = []
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((properties, body))

    def close(self) -> None:
        if not broker_listening():
            return
        if self.connection.is_closed or self.channel.is_closed:
            self.reconnect()
        for queue in self.queues:
            self.channel.queue_delete(queue)
        for exchange in self.exchanges:
            self.channel.exchange_delete(exchange)
        self.connection.close()


@pytest.fixture
def broker() -> Iterator[Admin]:
    if not broker_listening():
        if os.environ.get("CI") == "true":
            pytest.fail(HOW_TO_START)
        pytest.skip(HOW_TO_START)
    admin = Admin()
    try:
        yield admin
    finally:
        admin.close()


def envelope(body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> Envelope:
    env = Envelope(sender="a@sender.test")
    env.add_recipient("u@example.com", {})
    spool = Spool()
    spool.write(body)
    env.message = spool
    return env


async def until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Wait (bounded) for ``condition``, checking every 50 ms."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"not true within {seconds}s: {condition}")


async def serve(bus: AmqpBus) -> tuple[SmtpEdge, int]:
    edge = SmtpEdge(bus, Policy(hostname="mx.test", accepted_domains=("example.com",)), reactor)
    port = await edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    return edge, port.getHost().port


def smtp_send(port: int, body: bytes) -> Deferred[Any]:
    """Twisted's SMTP client; it turns LF line ends into CRLF itself."""
    assert b"\r" not in body
    return sendmail("127.0.0.1", "a@sender.test", ["u@example.com"], body, port=port)


@pytest_twisted.ensureDeferred
async def test_round_trip_smtp_to_queue_to_consumer_maildir(broker: Admin, tmp_path: Path) -> None:
    """A message sent over SMTP is confirmed by RabbitMQ, and the example consumer writes it
    to its Maildir as the Maildir bus would: Return-Path, the edge's Received: and the
    message, the envelope in the Maildir's envelope journal."""
    queue = broker.name("q")
    bus = AmqpBus(URL, queue=queue, reactor=reactor, timeout=10)
    edge, port = await serve(bus)
    consumer_module = load_consumer_module()
    stored: Deferred[tuple[dict[str, Any], str]] = Deferred()
    maildir = tmp_path / "consumed"
    consumer = consumer_module.Consumer(
        reactor, str(maildir), queue, on_stored=lambda env, name: stored.callback((env, name))
    )
    running = None
    try:
        message = b"From: a@sender.test\nSubject: round trip\n\nHello over AMQP.\n"
        await smtp_send(port, message)
        running = ensureDeferred(consumer.run(URL))
        record, name = await stored.addTimeout(15, reactor)
        content = (maildir / "new" / name).read_bytes()
        assert content.startswith(b"Return-Path: <a@sender.test>\r\nReceived: from ")
        assert f"id {record['queue_id']}".encode() in content
        assert content.endswith(message.replace(b"\n", b"\r\n"))
        assert record["sender"] == "a@sender.test"
        assert [r["address"] for r in record["recipients"]] == ["u@example.com"]
        assert envelope_of(maildir, name) == {"maildir_name": name, **record}
    finally:
        consumer.stop()
        if running is not None:
            await running
        await edge.close()
        await bus.stop()


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_smtp_connections_all_confirmed(broker: Admin) -> None:
    """50 clients at once: every one gets 250 and every message is in the queue once."""
    queue = broker.name("q")
    bus = AmqpBus(URL, queue=queue, reactor=reactor, timeout=20)
    edge, port = await serve(bus)
    try:
        bodies = [f"Subject: n{i}\nX-Seq: {i}\n\nmessage {i}\n".encode() for i in range(50)]
        results = await DeferredList([smtp_send(port, body) for body in bodies])
        assert all(ok for ok, _ in results), [r for ok, r in results if not ok][:3]
    finally:
        await edge.close()
        await bus.stop()
    messages = broker.drain(queue)
    seqs = sorted(int(body.split(b"X-Seq: ")[1].split(b"\r\n")[0]) for _, body in messages)
    assert seqs == list(range(50))
    assert len({properties.message_id for properties, _ in messages}) == 50


@pytest_twisted.ensureDeferred
async def test_unroutable_message_is_451_until_a_queue_is_bound(broker: Admin) -> None:
    """An exchange with no matching binding returns the message: 451; once bound, 250."""
    exchange = broker.exchange()
    bus = AmqpBus(URL, exchange=exchange, routing_key="edge", reactor=reactor, timeout=10)
    try:
        reply = await bus.send(envelope())
        assert (reply.code, reply.enhanced_status_code) == ("451", "4.3.0")
        assert "unroutable" in reply.message
        queue = broker.queue()
        broker.channel.queue_bind(queue, exchange, routing_key="edge")
        assert (await bus.send(envelope())).code == "250"
        assert len(broker.drain(queue)) == 1
    finally:
        await bus.stop()


@pytest_twisted.ensureDeferred
async def test_missing_exchange_is_451_and_the_bus_recovers(broker: Admin) -> None:
    """Publishing to an exchange that does not exist: 451 while it is missing; after it is
    created the bus reconnects by itself and messages get 250."""
    exchange = broker.name("x")
    bus = AmqpBus(
        URL,
        exchange=exchange,
        routing_key="edge",
        reactor=reactor,
        timeout=10,
        initial_backoff=0.1,
    )
    try:
        reply = await bus.send(envelope())
        assert reply.code == "451"
        broker.channel.exchange_declare(exchange, exchange_type="direct", durable=False)
        queue = broker.queue()
        broker.channel.queue_bind(queue, exchange, routing_key="edge")
        await until(lambda: bus.connected)
        assert (await bus.send(envelope())).code == "250"
    finally:
        await bus.stop()


@pytest_twisted.ensureDeferred
async def test_exchange_deleted_while_running_is_451_then_recovers(broker: Admin) -> None:
    """The broker closes the channel (404) when the exchange vanishes: that message gets 451,
    the server stays up, and the bus reconnects once the exchange is back."""
    exchange = broker.exchange()
    queue = broker.queue()
    broker.channel.queue_bind(queue, exchange, routing_key="edge")
    bus = AmqpBus(
        URL,
        exchange=exchange,
        routing_key="edge",
        reactor=reactor,
        timeout=10,
        initial_backoff=0.1,
    )
    try:
        assert (await bus.send(envelope())).code == "250"
        broker.channel.exchange_delete(exchange)
        assert (await bus.send(envelope())).code == "451"
        broker.channel.exchange_declare(exchange, exchange_type="direct", durable=False)
        broker.channel.queue_bind(queue, exchange, routing_key="edge")
        await until(lambda: bus.connected)
        assert (await bus.send(envelope())).code == "250"
    finally:
        await bus.stop()


@pytest_twisted.ensureDeferred
async def test_full_queue_nacks_and_the_client_gets_451(broker: Admin) -> None:
    """A queue at x-max-length with overflow reject-publish nacks: 451 4.3.0, not 250.

    (A classic queue: it nacks exactly at the limit; a quorum queue applies it lazily.)"""
    queue = broker.queue(
        {"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"}
    )
    bus = AmqpBus(URL, queue=queue, declare=False, reactor=reactor, timeout=10)
    try:
        assert (await bus.send(envelope())).code == "250"
        reply = await bus.send(envelope())
        assert (reply.code, reply.enhanced_status_code) == ("451", "4.3.0")
        assert "nack" in reply.message
    finally:
        await bus.stop()


def rabbitmqctl(*args: str) -> Deferred[tuple[bytes, bytes, int]]:
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        "rabbitmqctl", args, env=os.environ
    )
    return d.addTimeout(120, reactor)


def ensure_broker_running() -> None:
    """Whatever happened in the test, leave RabbitMQ running (bounded waits)."""
    if broker_listening():
        return
    subprocess.run(["rabbitmqctl", "start_app"], timeout=120, check=False, capture_output=True)
    subprocess.run(["rabbitmqctl", "await_startup"], timeout=120, check=False, capture_output=True)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_broker_restart_loses_nothing_that_got_250(broker: Admin) -> None:
    """Clients keep sending while RabbitMQ's application is stopped and started again: some
    get 451 during the outage, and every message that got 250 is in the queue afterwards."""
    queue = broker.queue()
    bus = AmqpBus(
        URL,
        queue=queue,
        reactor=reactor,
        timeout=10,
        connect_timeout=3,
        initial_backoff=0.2,
        max_backoff=1.0,
    )
    edge, port = await serve(bus)
    accepted: list[int] = []
    refused: list[int] = []
    counter = iter(range(100_000))
    phase = {"stop": False}

    async def client() -> None:
        for _ in range(2000):  # bounded
            if phase["stop"]:
                return
            seq = next(counter)
            try:
                await smtp_send(port, f"Subject: r\nX-Seq: {seq}\n\nbody\n".encode())
                accepted.append(seq)
            except SMTPDeliveryError:
                refused.append(seq)
                await deferLater(reactor, 0.05, lambda: None)  # pace retries while down

    clients = [ensureDeferred(client()) for _ in range(4)]
    try:
        await until(lambda: len(accepted) >= 20)
        _, err, code = await rabbitmqctl("stop_app")
        assert code == 0, err
        before_outage = len(accepted)
        await until(lambda: len(refused) >= 5)
        _, err, code = await rabbitmqctl("start_app")
        assert code == 0, err
        await until(lambda: bus.connected, 60)
        await until(lambda: len(accepted) >= before_outage + 20, 60)
    finally:
        phase["stop"] = True
        await DeferredList(clients)
        await edge.close()
        await bus.stop()
        ensure_broker_running()
    await until(broker_listening, 60)
    broker.reconnect()  # the old connection died with the broker's application
    found = set()
    for _, body in broker.drain(queue):
        found.add(int(body.split(b"X-Seq: ")[1].split(b"\r\n")[0]))
    missing = sorted(set(accepted) - found)
    assert refused, "the outage was not noticed by any client"
    assert not missing, f"acknowledged with 250 but lost: {missing[:10]}"


@pytest.mark.slow
def test_twistd_amqp_with_a_maildir_copy(broker: Admin, tmp_path: Path) -> None:
    """twistd slimta --amqp URL --amqp-queue Q --also-maildir P: a message sent with smtplib
    gets 250 and is both in the queue and in the Maildir copy, under the same queue id."""
    import smtplib

    from tests.support.process import running_twistd, twistd_argv

    queue = broker.name("q")
    copy = tmp_path / "copy"
    argv = twistd_argv(
        tmp_path / "unused",
        "--accept-domain",
        "example.com",
        "--amqp",
        URL,
        "--amqp-queue",
        queue,
        "--also-maildir",
        str(copy),
    )
    with running_twistd(argv) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.sendmail(
                "a@sender.test", ["u@example.com"], b"Subject: cli\r\n\r\nvia twistd\r\n"
            )
    messages = broker.drain(queue)
    assert len(messages) == 1 and messages[0][1].endswith(b"Subject: cli\r\n\r\nvia twistd\r\n")
    stored = list((copy / "new").iterdir())
    assert len(stored) == 1
    assert messages[0][0].message_id in stored[0].name


@pytest_twisted.ensureDeferred
async def test_per_recipient_routing_by_domain_through_an_lmtp_listener(broker: Admin) -> None:
    """A topic exchange bound for example.com only; one message per recipient, routed by its
    domain: over LMTP the client hears 250 for the routed recipient and 451 (unroutable) for
    the other, and only the routed copy is in the queue."""
    from tests.support.wire import WireClient

    exchange = broker.name("x")
    broker.channel.exchange_declare(exchange, exchange_type="topic", durable=False)
    queue = broker.queue()
    broker.channel.queue_bind(queue, exchange, routing_key="in.example.com")
    bus = AmqpBus(
        URL,
        exchange=exchange,
        routing_key="in.{domain}",
        per_recipient=True,
        reactor=reactor,
        timeout=10,
    )
    policy = Policy(hostname="mx.test", accepted_domains=("example.com", "elsewhere.test"))
    edge = SmtpEdge(bus, policy, reactor, lmtp=True)
    port = (await edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))).getHost()

    def client() -> list[tuple[str, str]]:
        with WireClient(port.port) as lmtp:
            lmtp.reply()
            lmtp.command("LHLO client.test")
            lmtp.command("MAIL FROM:<a@sender.test>")
            lmtp.command("RCPT TO:<u@example.com>")
            lmtp.command("RCPT TO:<v@elsewhere.test>")
            lmtp.command("DATA")
            lmtp.send(b"Subject: per recipient\r\n\r\nhi\r\n.\r\n")
            return [lmtp.reply(), lmtp.reply()]

    try:
        from twisted.internet.threads import deferToThread

        first, second = await deferToThread(client)
    finally:
        await edge.close()
        await bus.stop()
    assert first[0] == "250"
    assert second[0] == "451" and "<v@elsewhere.test>: unroutable" in second[1]
    [(properties, _)] = broker.drain(queue)
    assert properties.message_id.endswith(".1")
