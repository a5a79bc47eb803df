"""What slimta_tx relies on in Twisted's haproxy package, pinned; and what happens when it no
longer holds (the connection or the listener is refused, never served unsafely)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.protocols.policies import ProtocolWrapper

from slimta_tx import Policy, SmtpEdge, proxy
from slimta_tx.proxy import ProxyConfigError, check_endpoint
from slimta_tx.proxy_header import v1_header
from slimta_tx.testing import RecordingBus
from tests.support.logs import captured_events

PEER = IPv4Address("TCP", "127.0.0.1", 51000)


def test_what_the_take_over_relies_on() -> None:
    """The wrapper is a ProtocolWrapper (public ``wrappedProtocol`` and ``transport``), built by
    ``HAProxyWrappingFactory.protocol``; the ``haproxy:`` endpoint keeps that factory class in
    ``_wrapperFactory``; a fresh wrapper has read nothing (``_parser``/``_proxyInfo`` None)."""
    assert issubclass(HAProxyProtocolWrapper, ProtocolWrapper)
    assert HAProxyWrappingFactory.protocol is HAProxyProtocolWrapper
    assert HAProxyProtocolWrapper.__module__.startswith("twisted.protocols.haproxy")
    endpoint: Any = serverFromString(Clock(), "haproxy:tcp:0:interface=127.0.0.1")
    assert endpoint._wrapperFactory is HAProxyWrappingFactory
    edge = SmtpEdge(RecordingBus(), Policy(), reactor=Clock())
    fresh = HAProxyWrappingFactory(edge).buildProtocol(PEER)
    assert fresh._parser is None and fresh._proxyInfo is None
    assert proxy._twisted_wrapper_class() is HAProxyProtocolWrapper


def _connect(edge: SmtpEdge) -> StringTransport:
    wrapper = HAProxyWrappingFactory(edge).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    wrapper.makeConnection(transport)
    return transport


def test_an_unknown_twisted_wrapper_is_refused_per_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If Twisted's wrapper is not the class this code knows (a future Twisted), a session on
    top of it is closed before any byte is read, and an error logged."""
    monkeypatch.setattr(proxy, "_twisted_wrapper_class", lambda: None)
    edge = SmtpEdge(RecordingBus(), Policy(), reactor=Clock())
    with captured_events() as events:
        transport = _connect(edge)
    assert transport.disconnecting and transport.value() == b""
    assert edge.connections == set()
    assert any(
        "cannot be made safe" in e.get("log_format", "") and e["log_level"].name == "error"
        for e in events
    )


def test_a_wrapper_that_already_read_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrapper that has parsed input before the session saw it cannot be trusted."""
    original = HAProxyProtocolWrapper.makeConnection

    def make_connection(self: Any, transport: Any) -> None:
        self._parser = object()  # as if it had been fed bytes already
        original(self, transport)

    monkeypatch.setattr(HAProxyProtocolWrapper, "makeConnection", make_connection)
    edge = SmtpEdge(RecordingBus(), Policy(), reactor=Clock())
    transport = _connect(edge)
    assert transport.disconnecting and transport.value() == b""


def test_an_unknown_haproxy_endpoint_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = serverFromString(Clock(), "haproxy:tcp:0:interface=127.0.0.1")
    check_endpoint(endpoint)  # known: fine
    monkeypatch.setattr(proxy, "_twisted_wrapper_class", lambda: None)
    with pytest.raises(ProxyConfigError, match="not one slimta_tx can make safe"):
        check_endpoint(endpoint)
    edge = SmtpEdge(RecordingBus(), Policy(), reactor=Clock())
    with pytest.raises(ProxyConfigError):
        edge.listen(endpoint)
    assert edge.ports == []


def test_twisted_wrapper_below_reports_the_header_client() -> None:
    """After the take-over the wrapper's own getPeer/getHost answer with the header's
    addresses, so every layer above (TLS included) sees the client."""
    edge = SmtpEdge(RecordingBus(), Policy(hostname="mx.test"), reactor=Clock())
    wrapper = HAProxyWrappingFactory(edge).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    wrapper.makeConnection(transport)
    wrapper.dataReceived(v1_header(("203.0.113.9", 40000), ("192.0.2.25", 25)))
    assert transport.value().startswith(b"220 mx.test")
    peer, host = wrapper.getPeer(), wrapper.getHost()
    assert (peer.host, peer.port, host.host, host.port) == ("203.0.113.9", 40000, "192.0.2.25", 25)
