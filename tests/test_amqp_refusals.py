"""A broker that refuses the connection says why, by name, and the bus keeps retrying (issue 14).

Against the real RabbitMQ on 127.0.0.1:5672 (as tests/test_amqp_rabbitmq.py: under
``CI=true`` a missing broker fails). Before: ``cannot connect to queue 'q' (1)``, forever.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher

from slimta_tx.bus.amqp import AmqpBus
from slimta_tx.bus.amqp_link import BrokerRefused, Target, describe_error, open_link
from tests import test_amqp_rabbitmq
from tests.test_amqp_rabbitmq import Admin

broker = test_amqp_rabbitmq.broker  # the fixture: the broker, or a skip (a failure under CI)

WRONG_PASSWORD = "amqp://guest:not-the-password@127.0.0.1:5672/%2F"
NO_VHOST = "amqp://guest:guest@127.0.0.1:5672/no-such-vhost"
AUTH = (
    "authentication failed: 403 ACCESS_REFUSED - Login was refused using authentication "
    "mechanism PLAIN. For details see the broker logfile."
)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (WRONG_PASSWORD, AUTH),
        (NO_VHOST, "access refused: 530 NOT_ALLOWED - vhost no-such-vhost not found"),
    ],
    ids=["wrong-password", "no-vhost"],
)
async def test_the_link_names_the_refusal(broker: Admin, url: str, reason: str) -> None:
    with pytest.raises(BrokerRefused) as refused:
        await open_link(reactor, url, Target.for_queue(broker.name("q")), 10)
    assert str(refused.value) == reason
    assert describe_error(refused.value) == reason


@pytest_twisted.ensureDeferred
async def test_the_bus_logs_an_authentication_failure_and_keeps_retrying(broker: Admin) -> None:
    queue = broker.name("q")
    lines: list[dict[str, Any]] = []
    two: Deferred[None] = Deferred()

    def observe(event: dict[str, Any]) -> None:
        if "cannot connect" in event.get("log_format", ""):
            lines.append(event)
            if len(lines) == 2 and not two.called:
                two.callback(None)

    bus = AmqpBus(WRONG_PASSWORD, queue=queue, reactor=reactor, initial_backoff=0.01, jitter=0)
    globalLogPublisher.addObserver(cast(ILogObserver, observe))
    try:
        bus.start()
        await two.addTimeout(30, reactor)
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observe))
        await bus.stop()
    assert [event["error"] for event in lines] == [AUTH, AUTH]
    assert bus.last_error == AUTH


def test_pika_guesses_are_named_too() -> None:
    from pika import exceptions

    closed = exceptions.ConnectionClosedByBroker(403, "ACCESS_REFUSED - Login was refused")
    assert describe_error(exceptions.ProbableAuthenticationError(repr(closed))) == (
        "authentication failed (the broker refused the user or password): "
        "403 ACCESS_REFUSED - Login was refused"
    )
    assert describe_error(exceptions.ProbableAccessDeniedError("")) == (
        "access refused (no such virtual host, or the user may not use it)"
    )
    assert describe_error(exceptions.IncompatibleProtocolError("")) == (
        "the broker refused the protocol (not AMQP 0-9-1?)"
    )
    refused = BrokerRefused(exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - bye"))
    assert str(refused) == "the broker refused the connection: 320 CONNECTION_FORCED - bye"
