"""A silent broker (no RST, no answers): once the link is known to be stalled, new clients get
a quick 451 instead of waiting for the confirm timeout (issue 11). A fake channel and a Clock
play the broker; tests/test_amqp_partition.py does it with RabbitMQ behind a black hole."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from slimta_tx.bus.amqp import AmqpBus
from slimta_tx.bus.amqp_link import AmqpLink
from tests.test_amqp_bus import Broker, FakeChannel, envelope, pending, result


class ClockedBroker(Broker):
    """Links that know the time (as real ones do), so they can tell a stall."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def accept(self) -> FakeChannel:
        channel = FakeChannel()
        channel.link = AmqpLink(None, channel, clock=self.clock)
        self.channels.append(channel)
        self.attempts[-1].callback(channel.link)
        return channel


def connected(**kwargs: Any) -> tuple[Clock, ClockedBroker, AmqpBus, FakeChannel]:
    clock = Clock()
    broker = ClockedBroker(clock)
    options: dict[str, Any] = {"queue": "mail", "timeout": 30.0, "jitter": 0.0}
    options.update(kwargs)
    bus = AmqpBus(reactor=clock, connect=broker.connect, **options)
    bus.start()
    return clock, broker, bus, broker.accept()


def test_stall_timeout_defaults_to_a_third_of_the_confirm_timeout() -> None:
    clock = Clock()
    assert AmqpBus(queue="q", reactor=clock, connect=Broker().connect).stall_timeout == 10.0
    bus = AmqpBus(queue="q", reactor=clock, connect=Broker().connect, timeout=6, stall_timeout=1)
    assert bus.stall_timeout == 1


def test_silent_broker_new_messages_get_451_at_once() -> None:
    """Nothing confirmed for stall_timeout while a publish waits: the next message gets 451
    at once (not after the 30 s confirm timeout), and is not published into the void."""
    clock, _, bus, channel = connected()
    first = bus.send(envelope())
    clock.advance(9.9)
    waiting = bus.send(envelope())  # not known to be stalled yet: published, waits
    assert pending(first) and pending(waiting) and len(channel.published) == 2
    clock.advance(0.2)
    reply = result(bus.send(envelope()))
    assert (reply.code, reply.enhanced_status_code) == ("451", "4.3.0")
    assert "broker silent: no confirm for 10s" in reply.message
    assert len(channel.published) == 2


def test_a_slow_broker_that_keeps_confirming_is_not_stalled() -> None:
    """Confirms arrive, late: the link is slow, not stalled, and messages keep flowing."""
    clock, _, bus, channel = connected()
    sent: list[Deferred[Any]] = []
    for tag in range(1, 8):
        sent.append(bus.send(envelope()))
        clock.advance(6)
        if tag > 1:
            channel.ack(tag - 1)  # each confirm 6 s after its publish
    assert len(channel.published) == 7
    assert [result(d).code for d in sent[:-1]] == ["250"] * 6


def test_a_confirm_ends_the_stall() -> None:
    clock, _, bus, channel = connected()
    first = bus.send(envelope())
    clock.advance(12)
    assert result(bus.send(envelope())).code == "451"
    channel.ack(1)
    assert result(first).code == "250"
    d = bus.send(envelope())
    channel.ack(2)
    assert result(d).code == "250"


def test_stalled_past_the_confirm_timeout_the_link_is_dropped_and_reopened() -> None:
    """Once a publish has waited the whole confirm timeout, the connection is dropped; the
    reconnection is not waited for (451 at once); once the broker answers, 250 again."""
    clock, broker, bus, channel = connected(initial_backoff=0.5)
    first = bus.send(envelope())
    clock.advance(30)
    assert result(first).code == "451"  # the confirm timeout
    assert bus.connected
    reply = result(bus.send(envelope()))  # finds the stall, drops the link
    assert reply.code == "451"
    assert not bus.connected
    clock.advance(0.5)
    assert len(broker.attempts) == 2  # reconnecting
    reply = result(bus.send(envelope()))
    assert reply.code == "451" and "reconnecting" in reply.message
    channel = broker.accept()
    d = bus.send(envelope())
    channel.ack(1)
    assert result(d).code == "250"


def test_known_down_broker_is_not_waited_for_during_retries() -> None:
    """After a failed attempt, a message arriving while the next attempt is under way gets
    451 at once (a black-holed broker makes each attempt last connect_timeout)."""
    clock = Clock()
    broker = ClockedBroker(clock)
    bus = AmqpBus(
        reactor=clock, connect=broker.connect, queue="q", jitter=0.0, initial_backoff=1.0
    )
    bus.start()
    broker.refuse()
    clock.advance(1.0)
    assert len(broker.attempts) == 2 and pending(broker.attempts[-1])
    reply = result(bus.send(envelope()))
    assert reply.code == "451" and "reconnecting" in reply.message
