"""DNSBL/DNSWL and reverse DNS policies against a fake resolver (no network), with a Clock."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest_twisted
from smtp_driver import Driver
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names import client, common, dns, error, server

from slimta_tx import Policy, Session, SmtpEdge
from slimta_tx.policies import DnsblPolicy, EarlyTalkerPolicy, ReverseDnsPolicy
from slimta_tx.policies.dns import reverse_pointer
from slimta_tx.testing import RecordingBus

POLICY = Policy(hostname="mx.test", accepted_domains=("example.com",))
CLIENT = ("192.0.2.10", 40000)


def a(name: str, address: str) -> dns.RRHeader:
    return dns.RRHeader(name, dns.A, payload=dns.Record_A(address))


def aaaa(name: str, address: str) -> dns.RRHeader:
    return dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(address))


def ptr(name: str, target: str) -> dns.RRHeader:
    return dns.RRHeader(name, dns.PTR, payload=dns.Record_PTR(target))


class FakeResolver:
    """Answers from a table; a name may map to records, an exception, or a pending Deferred.
    Unknown names are NXDOMAIN. Every query is recorded."""

    def __init__(self, table: dict[tuple[str, int], Any] | None = None) -> None:
        self.table = table or {}
        self.queries: list[tuple[str, int]] = []

    def _answer(self, name: str, kind: int) -> Deferred[Any]:
        self.queries.append((name, kind))
        entry = self.table.get((name, kind))
        if entry is None:
            return fail(error.DNSNameError(name))
        if isinstance(entry, Deferred):
            return entry
        if isinstance(entry, Exception):
            return fail(entry)
        return succeed((entry, [], []))

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, dns.AAAA)

    def lookupPointer(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._answer(name, dns.PTR)


def edge_with(*policies: Any) -> tuple[SmtpEdge, Clock, RecordingBus]:
    clock = Clock()
    bus = RecordingBus()
    edge = SmtpEdge(bus, POLICY, reactor=clock)
    for policy in policies:
        policy.install(edge)
    return edge, clock, bus


def test_reverse_pointer_names() -> None:
    """IPv4 in reversed octets, IPv6 in reversed nibbles, under in-addr.arpa/ip6.arpa or a
    DNSBL zone (RFC 5782)."""
    ip4 = ipaddress.ip_address("192.0.2.10")
    ip6 = ipaddress.ip_address("2001:db8::1")
    assert reverse_pointer(ip4) == "10.2.0.192.in-addr.arpa"
    assert reverse_pointer(ip4, "zen.example.") == "10.2.0.192.zen.example"
    assert reverse_pointer(ip6, "bl.example").startswith("1.0.0.0.0.0.0.0")
    assert reverse_pointer(ip6, "bl.example").endswith(".8.b.d.0.1.0.0.2.bl.example")


# -- DNSBL / DNSWL -------------------------------------------------------------------------


def test_listed_client_gets_554_naming_the_zone() -> None:
    """A client listed in a DNSBL gets a 554 5.7.1 greeting naming the zone; then only QUIT."""
    resolver = FakeResolver({("10.2.0.192.bl.example", dns.A): [a("x", "127.0.0.2")]})
    edge, clock, _ = edge_with(DnsblPolicy(["clean.example", "bl.example"], resolver=resolver))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.banner == [
        ("554", "5.7.1 Service unavailable; client [192.0.2.10] blocked using bl.example")
    ]
    assert d.cmd("EHLO x.test")[0] == "503"
    assert d.proto.session.extra["dnsbl"] == "bl.example"


def test_unlisted_client_is_greeted_and_every_zone_was_asked() -> None:
    """Not listed anywhere (NXDOMAIN): the normal greeting; each zone was queried once."""
    resolver = FakeResolver()
    edge, clock, _ = edge_with(DnsblPolicy(["one.example", "two.example"], resolver=resolver))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.banner[0][0] == "220"
    assert sorted(resolver.queries) == [
        ("10.2.0.192.one.example", dns.A),
        ("10.2.0.192.two.example", dns.A),
    ]


def test_dns_failure_and_error_codes_never_reject() -> None:
    """SERVFAIL, answers outside 127/8 and 127.255.255.x error codes are not listings."""
    resolver = FakeResolver(
        {
            ("10.2.0.192.fail.example", dns.A): error.DNSServerError("SERVFAIL"),
            ("10.2.0.192.odd.example", dns.A): [a("x", "10.0.0.2")],
            ("10.2.0.192.refused.example", dns.A): [a("x", "127.255.255.254")],
        }
    )
    zones = ["fail.example", "odd.example", "refused.example"]
    edge, clock, _ = edge_with(DnsblPolicy(zones, resolver=resolver))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.banner[0][0] == "220"


def test_a_lookup_that_hangs_times_out_and_the_client_is_greeted() -> None:
    """A DNSBL that never answers: after the timeout (Clock) the client gets its greeting."""
    hanging: Deferred[Any] = Deferred()
    resolver = FakeResolver({("10.2.0.192.slow.example", dns.A): hanging})
    edge, clock, _ = edge_with(DnsblPolicy(["slow.example"], resolver=resolver, timeout=3.0))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.banner == []
    clock.advance(2.9)
    assert d.read() == []
    clock.advance(0.2)
    assert d.read()[0][0] == "220"
    assert hanging.called  # cancelled by the timeout


def test_allowlisted_client_is_never_blocked() -> None:
    """Listed in a DNSWL and a DNSBL: greeted, and the session records the allowlist."""
    resolver = FakeResolver(
        {
            ("10.2.0.192.bl.example", dns.A): [a("x", "127.0.0.2")],
            ("10.2.0.192.wl.example", dns.A): [a("x", "127.0.10.0")],
        }
    )
    edge, clock, _ = edge_with(
        DnsblPolicy(["bl.example"], allowlists=["wl.example"], resolver=resolver)
    )
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.banner[0][0] == "220"
    assert d.proto.session.extra["dnswl"] == "wl.example"


def test_trusted_networks_are_not_looked_up() -> None:
    """Clients in trusted networks (loopback by default) cost no DNS queries."""
    resolver = FakeResolver()
    edge, clock, _ = edge_with(DnsblPolicy(["bl.example"], resolver=resolver))
    d = Driver(edge=edge, clock=clock, peer=("127.0.0.1", 5000))
    assert d.banner[0][0] == "220"
    assert resolver.queries == []


def test_answers_are_cached_per_zone_and_address() -> None:
    """A second connection from the same address within the cache time asks no DNS."""
    resolver = FakeResolver({("10.2.0.192.bl.example", dns.A): [a("x", "127.0.0.2")]})
    edge, clock, _ = edge_with(DnsblPolicy(["bl.example"], resolver=resolver, cache_ttl=60))
    Driver(edge=edge, clock=clock, peer=CLIENT)
    assert Driver(edge=edge, clock=clock, peer=CLIENT).banner[0][0] == "554"
    assert len(resolver.queries) == 1
    clock.advance(61)
    Driver(edge=edge, clock=clock, peer=CLIENT)
    assert len(resolver.queries) == 2


def test_ipv6_client_is_looked_up_in_nibble_form() -> None:
    """An IPv6 client is queried as reversed nibbles under the zone."""
    name = reverse_pointer(ipaddress.ip_address("2001:db8::5"), "bl.example")
    resolver = FakeResolver({(name, dns.A): [a("x", "127.0.0.4")]})
    edge, clock, _ = edge_with(DnsblPolicy(["bl.example"], resolver=resolver))
    d = Driver(edge=edge, clock=clock, peer=("2001:db8::5", 1000))
    assert d.banner[0][0] == "554"


def test_dnsbl_at_rcpt_refuses_recipients_but_not_postmaster() -> None:
    """command="RCPT": a listed client is refused per recipient, and may still write to
    postmaster (RFC 5321 4.5.1)."""
    resolver = FakeResolver({("10.2.0.192.bl.example", dns.A): [a("x", "127.0.0.2")]})
    edge, clock, _ = edge_with(DnsblPolicy(["bl.example"], resolver=resolver, command="RCPT"))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.banner[0][0] == "220"
    d.greet()
    replies = d.send(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<postmaster>\r\n"
    )
    assert [code for code, _ in replies] == ["250", "554", "250"]
    assert "blocked using bl.example" in replies[1][1]
    assert len(resolver.queries) == 1  # one lookup per session


def test_early_talker_delay_is_skipped_for_dnswl_clients() -> None:
    """A client on a DNSWL is greeted without the greeting delay."""
    resolver = FakeResolver({("10.2.0.192.wl.example", dns.A): [a("x", "127.0.10.0")]})
    edge, clock, _ = edge_with(
        DnsblPolicy(allowlists=["wl.example"], resolver=resolver), EarlyTalkerPolicy(5.0)
    )
    assert Driver(edge=edge, clock=clock, peer=CLIENT).banner[0][0] == "220"
    other = Driver(edge=edge, clock=clock, peer=("192.0.2.11", 1))
    assert other.banner == []
    clock.advance(5)
    assert other.read()[0][0] == "220"


# -- reverse DNS ------------------------------------------------------------------------------


def rdns_table(**extra: Any) -> dict[tuple[str, int], Any]:
    table: dict[tuple[str, int], Any] = {
        ("10.2.0.192.in-addr.arpa", dns.PTR): [ptr("10.2.0.192.in-addr.arpa", "Mail.Client.test")],
        ("mail.client.test", dns.A): [a("mail.client.test", "192.0.2.10")],
    }
    table.update(extra)
    return table


def test_forward_confirmed_name_goes_to_session_and_received_header() -> None:
    """PTR then A lead back to the client: session.reverse_name is set before the greeting
    and the Received: header shows it."""
    resolver = FakeResolver(rdns_table())
    edge, clock, bus = edge_with(ReverseDnsPolicy(resolver=resolver))
    seen: list[Any] = []
    edge.set_validator("BANNER", lambda s, r, a: seen.append(s.reverse_name))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert seen == ["mail.client.test"]
    d.start_data()
    d.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    envelope = bus.messages[0].envelope
    assert envelope.client_name == "mail.client.test"
    assert b"(mail.client.test [192.0.2.10])" in envelope.received_header()


def test_unconfirmed_name_is_not_used() -> None:
    """A PTR name whose A records do not include the client is not trusted: reverse_name
    stays None and Received: says unknown."""
    resolver = FakeResolver(rdns_table(**{}))
    resolver.table[("mail.client.test", dns.A)] = [a("mail.client.test", "198.51.100.1")]
    edge, clock, bus = edge_with(ReverseDnsPolicy(resolver=resolver))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.proto.session.reverse_name is None
    d.start_data()
    d.send(b"\r\nbody\r\n.\r\n")
    assert b"(unknown [192.0.2.10])" in bus.messages[0].envelope.received_header()


def test_second_ptr_name_can_confirm() -> None:
    """Several PTR names: the first that forward-confirms is used."""
    resolver = FakeResolver(
        {
            ("10.2.0.192.in-addr.arpa", dns.PTR): [
                ptr("r", "wrong.test"),
                ptr("r", "right.test"),
            ],
            ("wrong.test", dns.A): [a("wrong.test", "198.51.100.1")],
            ("right.test", dns.A): [a("right.test", "192.0.2.10")],
        }
    )
    edge, clock, _ = edge_with(ReverseDnsPolicy(resolver=resolver))
    assert Driver(edge=edge, clock=clock, peer=CLIENT).proto.session.reverse_name == "right.test"


def test_ipv6_reverse_dns_uses_aaaa() -> None:
    """An IPv6 client is confirmed with AAAA records."""
    ip = ipaddress.ip_address("2001:db8::25")
    resolver = FakeResolver(
        {
            (reverse_pointer(ip), dns.PTR): [ptr("r", "v6.client.test")],
            ("v6.client.test", dns.AAAA): [aaaa("v6.client.test", "2001:db8::25")],
        }
    )
    edge, clock, _ = edge_with(ReverseDnsPolicy(resolver=resolver))
    d = Driver(edge=edge, clock=clock, peer=("2001:db8::25", 1))
    assert d.proto.session.reverse_name == "v6.client.test"


def test_reverse_dns_timeout_greets_without_a_name() -> None:
    """A PTR query that never answers: after the timeout the client is greeted, name None,
    and the failure is not cached (the next connection asks again)."""
    resolver = FakeResolver({("10.2.0.192.in-addr.arpa", dns.PTR): Deferred()})
    edge, clock, _ = edge_with(ReverseDnsPolicy(resolver=resolver, timeout=2.0))
    d = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert d.banner == []
    clock.advance(2)
    assert d.read()[0][0] == "220"
    assert d.proto.session.reverse_name is None
    resolver.table[("10.2.0.192.in-addr.arpa", dns.PTR)] = rdns_table()[
        ("10.2.0.192.in-addr.arpa", dns.PTR)
    ]
    resolver.table[("mail.client.test", dns.A)] = rdns_table()[("mail.client.test", dns.A)]
    again = Driver(edge=edge, clock=clock, peer=CLIENT)
    assert again.proto.session.reverse_name == "mail.client.test"


def test_reverse_dns_cache_and_shared_lookups() -> None:
    """Two clients from one address at once share one lookup; later ones use the cache until
    it expires; a missing name is cached for the negative time."""
    pending: Deferred[Any] = Deferred()
    table = rdns_table()
    answer = table[("10.2.0.192.in-addr.arpa", dns.PTR)]
    table[("10.2.0.192.in-addr.arpa", dns.PTR)] = pending
    resolver = FakeResolver(table)
    edge, clock, _ = edge_with(ReverseDnsPolicy(resolver=resolver, cache_ttl=100))
    first = Driver(edge=edge, clock=clock, peer=CLIENT)
    second = Driver(edge=edge, clock=clock, peer=CLIENT)
    pending.callback((answer, [], []))
    assert first.read()[0][0] == second.read()[0][0] == "220"
    assert second.proto.session.reverse_name == "mail.client.test"
    assert [q for q in resolver.queries if q[1] == dns.PTR] == [
        ("10.2.0.192.in-addr.arpa", dns.PTR)
    ]
    Driver(edge=edge, clock=clock, peer=CLIENT)
    assert len(resolver.queries) == 2  # PTR + A, once
    clock.advance(101)
    resolver.table[("10.2.0.192.in-addr.arpa", dns.PTR)] = answer
    Driver(edge=edge, clock=clock, peer=CLIENT)
    assert len(resolver.queries) == 4
    # NXDOMAIN for another address: cached as "no name" for negative_ttl (300 s).
    Driver(edge=edge, clock=clock, peer=("192.0.2.99", 1))
    Driver(edge=edge, clock=clock, peer=("192.0.2.99", 1))
    assert resolver.queries.count(("99.2.0.192.in-addr.arpa", dns.PTR)) == 1


class _Zone(common.ResolverBase):
    """A tiny authoritative answerer for the local DNS server below."""

    def __init__(self, records: dict[tuple[bytes, int], list[dns.RRHeader]]) -> None:
        super().__init__()
        self.records = records

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        found = self.records.get((name.lower(), type))
        if found is None:
            return fail(error.DomainError(name))
        return succeed((found, [], []))


@pytest_twisted.inlineCallbacks
def test_real_twisted_names_resolver_against_a_local_dns_server() -> Any:
    """With twisted.names' own client.Resolver (over UDP to a DNS server on 127.0.0.1), the
    DNSBL and reverse DNS policies get their answers: the API is used as it really is."""
    from twisted.internet import reactor

    zone = _Zone(
        {
            (b"10.2.0.192.bl.example", dns.A): [a("10.2.0.192.bl.example", "127.0.0.2")],
            (b"10.2.0.192.in-addr.arpa", dns.PTR): [ptr("10.2.0.192.in-addr.arpa", "c.test")],
            (b"c.test", dns.A): [a("c.test", "192.0.2.10")],
        }
    )
    factory = server.DNSServerFactory(clients=[zone])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    try:
        resolver = client.Resolver(servers=[("127.0.0.1", port.getHost().port)])
        edge = SmtpEdge(RecordingBus(), POLICY)
        dnsbl = DnsblPolicy(["bl.example", "other.example"], resolver=resolver, timeout=5)
        rdns = ReverseDnsPolicy(resolver=resolver, timeout=5)
        dnsbl.install(edge)
        rdns.install(edge)
        session = Session(address=CLIENT)
        verdict = yield Deferred.fromCoroutine(dnsbl.verdict(session))
        name = yield rdns.lookup(ipaddress.ip_address("192.0.2.10"))
        assert verdict == (None, "bl.example")
        assert name == "c.test"
    finally:
        yield port.stopListening()
