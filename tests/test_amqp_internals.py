"""The pika internals slimta_tx.bus.amqp_link relies on, pinned (issue 14).

A pika release that moves them fails here, by name, rather than in a broker test or in
production. What the link does without them is tested below too.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pika = pytest.importorskip("pika")

from pika.adapters.twisted_connection import (  # noqa: E402
    TwistedChannel,
    TwistedProtocolConnection,
)
from pika.channel import Channel  # noqa: E402

from slimta_tx.bus import amqp_link  # noqa: E402
from slimta_tx.bus.amqp_link import AmqpLink, PikaIncompatible, raw_channel  # noqa: E402
from tests.support.logs import captured_events  # noqa: E402


def parameters(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)


def protocol() -> Any:
    from twisted.internet.task import Clock

    params = pika.ConnectionParameters(blocked_connection_timeout=30)
    return TwistedProtocolConnection(params, custom_reactor=Clock())


def test_twisted_channel_wraps_the_raw_channel_as_underscore_channel() -> None:
    raw = Channel(protocol()._impl, 1, lambda channel: None)
    assert raw_channel(TwistedChannel(raw)) is raw


def test_the_raw_channel_methods_the_link_calls() -> None:
    assert {"ack_nack_callback", "callback"} <= parameters(Channel.confirm_delivery)
    assert {"callback"} <= parameters(Channel.add_on_return_callback)
    assert {"callback"} <= parameters(Channel.add_on_close_callback)
    assert {"exchange", "routing_key", "body", "properties", "mandatory"} <= parameters(
        Channel.basic_publish
    )


def test_the_protocol_keeps_the_pika_connection_as_underscore_impl() -> None:
    impl = protocol()._impl
    assert isinstance(impl, pika.connection.Connection)
    assert callable(impl.add_on_connection_blocked_callback)
    assert callable(impl.add_on_connection_unblocked_callback)


class FakeChannel:
    def add_on_close_callback(self, callback: Any) -> None:
        pass

    def add_on_return_callback(self, callback: Any) -> None:
        pass


def test_the_blocked_notices_reach_the_link_through_impl() -> None:
    connection = protocol()
    link = AmqpLink(None, FakeChannel())
    assert amqp_link.watch_blocked(connection, link)
    # How pika dispatches a connection.blocked frame to the callbacks added for it.
    impl = connection._impl
    frame = pika.frame.Method(0, pika.spec.Connection.Blocked(reason="low on disk"))
    impl.callbacks.process(0, pika.spec.Connection.Blocked, impl, frame)
    assert link.blocked == "low on disk"
    unblocked = pika.frame.Method(0, pika.spec.Connection.Unblocked())
    impl.callbacks.process(0, pika.spec.Connection.Unblocked, impl, unblocked)
    assert link.blocked is None


def test_without_underscore_impl_one_warning_and_no_blocked_notices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(amqp_link, "_warned_no_impl", False)
    with captured_events() as events:
        for _ in range(2):
            assert not amqp_link.watch_blocked(object(), AmqpLink(None, FakeChannel()))
    warnings = [e for e in events if "no _impl" in e.get("log_format", "")]
    assert len(warnings) == 1


def test_without_underscore_channel_the_link_refuses_by_name() -> None:
    with pytest.raises(PikaIncompatible, match=r"no _channel.*pika>=1\.2,<2"):
        raw_channel(object())


def test_why_an_opening_connection_failed_is_where_the_link_reads_it() -> None:
    """The adapter passes its ``_on_connection_failed`` as the open-error callback (which
    the link overrides to keep the error); the broker's connection.close waits in
    ``_impl._error`` until the TCP close (the link reads it first)."""
    assert {"_connection", "_error_message"} <= parameters(
        TwistedProtocolConnection._on_connection_failed
    )
    connection = amqp_link._connection_class(TwistedProtocolConnection)(
        pika.ConnectionParameters()
    )
    assert connection._impl._error is None
    refused = pika.exceptions.ConnectionClosedByBroker(403, "ACCESS_REFUSED - no")
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    connection.makeConnection(StringTransport())  # pika sends its protocol header
    connection._impl._error = refused  # what pika does on the broker's connection.close
    failed: list[Any] = []
    connection.ready.addErrback(failed.append)
    connection.connectionLost(Failure(ConnectionDone()))
    assert connection.open_error is refused
    assert failed  # and `ready` failed, as before
