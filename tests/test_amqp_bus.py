"""AmqpBus without a broker: a fake pika channel and a Clock drive confirms, returns,
timeouts, lost connections and reconnection backoff. The real broker: test_amqp_rabbitmq.py."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from pika import spec
from smtp_driver import Driver
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from slimta_tx import Policy, SmtpEdge
from slimta_tx.bus.amqp import AmqpBus, message_properties
from slimta_tx.bus.amqp_link import AmqpLink
from slimta_tx.envelope import Envelope
from slimta_tx.reply import Reply
from slimta_tx.spool import Spool

MESSAGE = b"Subject: hello\r\n\r\nbody line\r\n"


class FakeChannel:
    """Records publishes; the test plays the broker through ``ack``/``nack``/``ret``/``close``."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.on_close: Any = None
        self.on_return: Any = None
        self.link: AmqpLink | None = None

    def add_on_close_callback(self, callback: Any) -> None:
        self.on_close = callback

    def add_on_return_callback(self, callback: Any) -> None:
        self.on_return = callback

    def basic_publish(self, **kwargs: Any) -> None:
        self.published.append(kwargs)

    def ack(self, tag: int, multiple: bool = False) -> None:
        assert self.link is not None
        self.link.on_confirm(SimpleNamespace(method=spec.Basic.Ack(tag, multiple)))

    def nack(self, tag: int) -> None:
        assert self.link is not None
        self.link.on_confirm(SimpleNamespace(method=spec.Basic.Nack(tag, False)))

    def ret(self, tag: int) -> None:
        properties = self.published[tag - 1]["properties"]
        self.on_return(self, spec.Basic.Return(312, "NO_ROUTE", "", "q"), properties, b"")

    def close(self, reason: Exception | None = None) -> None:
        self.on_close(self, reason or ConnectionError("connection reset by peer"))


class Broker:
    """A connector for AmqpBus: each attempt waits until the test accepts or refuses it."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[AmqpLink]] = []
        self.channels: list[FakeChannel] = []

    def connect(self) -> Deferred[AmqpLink]:
        d: Deferred[AmqpLink] = Deferred()
        self.attempts.append(d)
        return d

    def accept(self) -> FakeChannel:
        channel = FakeChannel()
        channel.link = AmqpLink(None, channel)
        self.channels.append(channel)
        self.attempts[-1].callback(channel.link)
        return channel

    def refuse(self) -> None:
        self.attempts[-1].errback(ConnectionRefusedError("connection refused"))


def make_bus(clock: Clock, broker: Broker, **kwargs: Any) -> AmqpBus:
    options: dict[str, Any] = {"queue": "mail", "timeout": 30.0, "jitter": 0.0}
    options.update(kwargs)
    return AmqpBus(reactor=clock, connect=broker.connect, **options)


def envelope(body: bytes = MESSAGE, rcpts: tuple[str, ...] = ("u@example.com",)) -> Envelope:
    env = Envelope(sender="a@sender.test", mail_params={"BODY": "8BITMIME"})
    for rcpt in rcpts:
        env.add_recipient(rcpt, {})
    env.client_ip, env.ehlo_as = "192.0.2.1", "client.test"
    spool = Spool()
    spool.write(body)
    env.message = spool
    return env


def result(d: Deferred[Reply]) -> Reply:
    out: list[Reply] = []

    def keep(value: Any) -> Any:
        out.append(value)
        return value

    d.addBoth(keep)
    assert out, "the reply is still pending"
    assert isinstance(out[0], Reply), out[0]
    return out[0]


def pending(d: Deferred[Any]) -> bool:
    return not d.called


def connected_bus(**kwargs: Any) -> tuple[Clock, Broker, AmqpBus, FakeChannel]:
    clock, broker = Clock(), Broker()
    bus = make_bus(clock, broker, **kwargs)
    bus.start()
    return clock, broker, bus, broker.accept()


def test_250_only_after_the_broker_confirms() -> None:
    """The reply waits for basic.ack; then it is 250 2.6.0 naming the queue id."""
    _, _, bus, channel = connected_bus()
    env = envelope()
    d = bus.send(env)
    assert len(channel.published) == 1 and pending(d)
    channel.ack(1)
    reply = result(d)
    assert (reply.code, reply.enhanced_status_code) == ("250", "2.6.0")
    assert env.queue_id in reply.message


def test_published_persistent_and_mandatory_to_the_queue() -> None:
    """Persistent delivery (mode 2), mandatory, through the default exchange to the queue."""
    _, _, bus, channel = connected_bus(queue="inbound")
    env = envelope()
    bus.send(env)
    published = channel.published[0]
    assert published["exchange"] == "" and published["routing_key"] == "inbound"
    assert published["mandatory"] is True
    properties = published["properties"]
    assert properties.delivery_mode == 2
    assert properties.message_id == env.queue_id
    assert properties.content_type == "message/rfc822"


def test_message_format_received_header_body_and_envelope_json() -> None:
    """The body is Received: + the message; the slimta-envelope header is the envelope JSON."""
    _, _, bus, channel = connected_bus()
    env = envelope(rcpts=("u@example.com", "v@example.com"))
    bus.send(env)
    published = channel.published[0]
    assert published["body"] == env.received_header() + MESSAGE
    assert published["body"].startswith(b"Received: from client.test")
    headers = published["properties"].headers
    assert headers["slimta-format"] == 1
    record = json.loads(headers["slimta-envelope"])
    assert record == json.loads(json.dumps(env.to_json_dict()))
    assert [r["address"] for r in record["recipients"]] == ["u@example.com", "v@example.com"]
    assert record["mail_params"] == {"BODY": "8BITMIME"}


def test_utf8_addresses_survive_in_the_envelope_header() -> None:
    """SMTPUTF8 addresses are carried as UTF-8 JSON, not escaped away."""
    _, _, bus, channel = connected_bus()
    env = envelope(rcpts=("jürgen@exämple.de",))
    bus.send(env)
    record = json.loads(channel.published[0]["properties"].headers["slimta-envelope"])
    assert record["recipients"][0]["address"] == "jürgen@exämple.de"


def test_nack_is_451() -> None:
    """basic.nack: the broker did not take it; the client must retry."""
    _, _, bus, channel = connected_bus()
    d = bus.send(envelope())
    channel.nack(1)
    reply = result(d)
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.3.0")
    assert "nack" in reply.message


def test_return_then_ack_is_451() -> None:
    """basic.return (unroutable) then basic.ack: not stored anywhere, so 451, not 250."""
    _, _, bus, channel = connected_bus()
    d = bus.send(envelope())
    channel.ret(1)
    channel.ack(1)
    reply = result(d)
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.3.0")
    assert "unroutable" in reply.message


def test_multiple_ack_blames_only_the_returned_message() -> None:
    """With three in flight, a return for #2 and one ack(multiple) for all: only #2 gets 451.

    pika's own TwistedChannel would attach the return to #1 and confirm #2 (a lost message
    acknowledged with 250); the link matches returns by message id.
    """
    _, _, bus, channel = connected_bus()
    sent = [bus.send(envelope()) for _ in range(3)]
    channel.ret(2)
    channel.ack(3, multiple=True)
    assert [result(d).code for d in sent] == ["250", "451", "250"]


def test_multiple_ack_confirms_only_up_to_its_tag() -> None:
    """ack(2, multiple) confirms #1 and #2; #3 still waits for its own confirm."""
    _, _, bus, channel = connected_bus()
    sent = [bus.send(envelope()) for _ in range(3)]
    channel.ack(2, multiple=True)
    assert [result(d).code for d in sent[:2]] == ["250", "250"]
    assert pending(sent[2])
    channel.ack(3)
    assert result(sent[2]).code == "250"


def test_no_confirm_within_timeout_is_451_and_a_late_ack_is_harmless() -> None:
    """No confirm in time: 451 at the timeout; the late ack changes nothing and raises nothing."""
    clock, _, bus, channel = connected_bus(timeout=5.0)
    d = bus.send(envelope())
    clock.advance(4.9)
    assert pending(d)
    clock.advance(0.2)
    reply = result(d)
    assert reply.code == "451" and "within 5s" in reply.message
    channel.ack(1)
    assert result(d).code == "451"


def test_lost_connection_fails_pending_messages_then_reconnects() -> None:
    """Messages awaiting confirms when the connection drops get 451; the bus reconnects."""
    clock, broker, bus, channel = connected_bus(initial_backoff=0.5)
    sent = [bus.send(envelope()) for _ in range(2)]
    channel.close()
    assert [result(d).code for d in sent] == ["451", "451"]
    assert "connection lost" in result(sent[0]).message
    assert not bus.connected
    clock.advance(0.5)
    assert len(broker.attempts) == 2
    channel = broker.accept()
    d = bus.send(envelope())
    channel.ack(1)
    assert result(d).code == "250"


def test_broker_down_answers_451_at_once_and_backs_off() -> None:
    """While the broker is unreachable messages get 451 immediately (no client is held), and
    attempts are spaced 0.5, 1, 2, 4 ... seconds, capped at max_backoff."""
    clock, broker = Clock(), Broker()
    bus = make_bus(clock, broker, initial_backoff=0.5, max_backoff=4.0)
    bus.start()
    broker.refuse()
    reply = result(bus.send(envelope()))
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.3.0")
    assert "unreachable" in reply.message
    gaps = []
    for _ in range(5):
        before = clock.seconds()
        attempts = len(broker.attempts)
        while len(broker.attempts) == attempts:
            clock.advance(0.25)
        gaps.append(clock.seconds() - before)
        broker.refuse()
    assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_backoff_resets_after_a_successful_connection() -> None:
    """After a good connection drops, the first retry comes after the initial delay again."""
    clock, broker = Clock(), Broker()
    bus = make_bus(clock, broker, initial_backoff=0.5)
    bus.start()
    for _ in range(3):
        broker.refuse()
        clock.advance(10)
    channel = broker.accept()
    channel.close()
    attempts = len(broker.attempts)
    clock.advance(0.5)
    assert len(broker.attempts) == attempts + 1


def test_jitter_spreads_retries() -> None:
    """With jitter, the delay is the backoff plus up to that fraction more."""
    import random

    bus = AmqpBus(queue="q", reactor=Clock(), connect=Broker().connect, jitter=0.5)
    bus._rng = random.Random(1)
    delays = {bus.next_delay() for _ in range(20)}
    assert all(0.5 <= delay <= 0.75 for delay in delays) and len(delays) > 1


def test_message_waits_for_a_connection_attempt_in_progress() -> None:
    """At start-up the first message waits for the connection instead of failing."""
    clock, broker = Clock(), Broker()
    bus = make_bus(clock, broker)
    d = bus.send(envelope())  # starts the bus
    assert len(broker.attempts) == 1 and pending(d)
    channel = broker.accept()
    channel.ack(1)
    assert result(d).code == "250"


def test_waiting_for_a_connection_counts_against_the_timeout() -> None:
    """A connection attempt that hangs: the message still gets 451 at its timeout."""
    clock, broker = Clock(), Broker()
    bus = make_bus(clock, broker, timeout=3.0)
    d = bus.send(envelope())
    clock.advance(3.0)
    assert result(d).code == "451"
    broker.accept()  # late: nothing breaks, and the next message goes through
    d = bus.send(envelope())
    broker.channels[-1].ack(1)
    assert result(d).code == "250"


def test_blocked_broker_is_451_at_once() -> None:
    """connection.blocked (a resource alarm): new messages get 451 rather than hanging."""
    _, _, bus, channel = connected_bus()
    assert channel.link is not None
    channel.link.on_blocked(None, SimpleNamespace(method=spec.Connection.Blocked("low disk")))
    assert "blocked" in result(bus.send(envelope())).message
    channel.link.on_unblocked(None, SimpleNamespace(method=spec.Connection.Unblocked()))
    d = bus.send(envelope())
    channel.ack(1)
    assert result(d).code == "250"


def test_message_over_max_size_is_552() -> None:
    """Bigger than max_message_size (the broker's limit): a permanent 552 5.3.4."""
    _, _, bus, channel = connected_bus(max_message_size=10)
    reply = result(bus.send(envelope()))
    assert (reply.code, reply.enhanced_status_code) == ("552", "5.3.4")
    assert channel.published == []


def test_inflight_byte_budget_holds_bodies_on_disk_until_room() -> None:
    """With a budget of one message, the second is not read nor published until the first
    is confirmed: memory for bodies stays bounded under load."""
    _, _, bus, channel = connected_bus(max_inflight_bytes=len(MESSAGE))
    first, second = bus.send(envelope()), bus.send(envelope())
    assert len(channel.published) == 1
    channel.ack(1)
    assert result(first).code == "250"
    assert len(channel.published) == 2
    channel.ack(2)
    assert result(second).code == "250"


def test_stop_waits_for_confirms_then_refuses_new_messages() -> None:
    """stop() lets publishes in flight finish; later messages get 451."""
    _, _, bus, channel = connected_bus()
    d = bus.send(envelope())
    stopped = bus.stop()
    assert pending(stopped)
    channel.ack(1)
    assert result(d).code == "250"
    assert stopped.called
    reply = result(bus.send(envelope()))
    assert reply.code == "451" and "shutting down" in reply.message


def test_bus_needs_exactly_one_target() -> None:
    """A queue or an exchange, not both and not neither."""
    with pytest.raises(ValueError):
        AmqpBus(reactor=Clock(), connect=Broker().connect)
    with pytest.raises(ValueError):
        AmqpBus(queue="q", exchange="x", reactor=Clock(), connect=Broker().connect)


def test_exchange_target_publishes_with_the_routing_key() -> None:
    """--amqp-exchange/--amqp-routing-key: published there, mandatory as well."""
    clock, broker = Clock(), Broker()
    bus = AmqpBus(exchange="mail", routing_key="in.edge", reactor=clock, connect=broker.connect)
    bus.start()
    channel = broker.accept()
    bus.send(envelope())
    assert channel.published[0]["exchange"] == "mail"
    assert channel.published[0]["routing_key"] == "in.edge"


def test_properties_are_built_from_the_envelope() -> None:
    """message_properties: message_id and timestamp come from the envelope."""
    env = envelope()
    properties = message_properties(env)
    assert properties.message_id == env.queue_id
    assert properties.timestamp == int(env.received_at)
    assert properties.app_id == "slimta_tx"


def test_smtp_client_gets_451_while_the_broker_is_down_and_250_after() -> None:
    """End to end on the protocol: the edge stays up through a broker outage; the client
    sees 451 4.3.0 then, after the reconnection, 250."""
    clock, broker = Clock(), Broker()
    bus = make_bus(clock, broker, initial_backoff=1.0)
    bus.start()
    broker.refuse()
    edge = SmtpEdge(bus, Policy(hostname="mx.test", accepted_domains=("example.com",)), clock)
    driver = Driver(edge=edge, clock=clock)
    driver.start_data()
    code, text = driver.send(MESSAGE + b".\r\n")[0]
    assert code == "451" and text.startswith("4.3.0")
    clock.advance(1.0)
    channel = broker.accept()
    assert driver.codes(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n") == [
        "250",
        "250",
        "354",
    ]
    assert driver.send(MESSAGE + b".\r\n") == []  # waiting for the confirm
    channel.ack(1)
    assert driver.read()[0][0] == "250"
    assert not driver.closed


def test_fake_helpers_are_consistent() -> None:
    """succeed/fail connectors behave as attempts that finish at once."""
    clock = Clock()
    channel = FakeChannel()
    channel.link = AmqpLink(None, channel)
    bus = AmqpBus(queue="q", reactor=clock, connect=lambda: succeed(channel.link))
    d = bus.send(envelope())
    channel.ack(1)
    assert result(d).code == "250"
    down = AmqpBus(queue="q", reactor=clock, connect=lambda: fail(ConnectionRefusedError()))
    assert result(down.send(envelope())).code == "451"


def test_per_recipient_publishes_one_message_each_and_answers_each() -> None:
    """per_recipient=True: one message per recipient (its own envelope JSON, message_id
    <queue id>.<n>, the routing key with its domain); each confirmed on its own."""
    clock, broker = Clock(), Broker()
    bus = AmqpBus(
        exchange="mail",
        routing_key="in.{domain}",
        per_recipient=True,
        reactor=clock,
        connect=broker.connect,
    )
    bus.start()
    channel = broker.accept()
    env = envelope(rcpts=("a@Example.com", "b@other.test", "c@example.com"))
    d = bus.send(env)
    assert [p["routing_key"] for p in channel.published] == [
        "in.example.com",
        "in.other.test",
        "in.example.com",
    ]
    assert [p["properties"].message_id for p in channel.published] == [
        f"{env.queue_id}.1",
        f"{env.queue_id}.2",
        f"{env.queue_id}.3",
    ]
    records = [json.loads(p["properties"].headers["slimta-envelope"]) for p in channel.published]
    assert [[r["address"] for r in rec["recipients"]] for rec in records] == [
        ["a@Example.com"],
        ["b@other.test"],
        ["c@example.com"],
    ]
    assert {rec["queue_id"] for rec in records} == {env.queue_id}
    channel.ret(2)
    channel.ack(3, multiple=True)
    out: list[Any] = []
    d.addBoth(out.append)
    [replies] = out
    assert [r.code for r in replies] == ["250", "451", "250"]
    assert "<b@other.test>: unroutable" in replies[1].message
