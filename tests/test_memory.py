"""Memory under hostile input (issue 11): nothing of a closed connection stays reachable, and
the heap's free memory goes back to the system after a burst. The soak itself (minutes of
fuzzing, the RSS curve) is bench/soak.py."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from smtp_driver import Driver
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from slimta_tx import Policy, SmtpEdge
from slimta_tx.memory import HeapInfo, MemoryTrimmer, glibc
from slimta_tx.testing import PendingBus, RecordingBus
from tests.support.logs import captured_events

MIB = 1024 * 1024


def forget_buffered_log_events() -> None:
    """A process that never began logging (pytest) keeps its first log events, and each
    event's ``log_source`` with it, in Twisted's initial buffer; twistd begins logging at
    start-up and keeps none. Empty that buffer so that it does not count as a reference."""
    from twisted.logger import globalLogBeginner

    buffer = getattr(globalLogBeginner, "_initialBuffer", None)
    if buffer is not None:
        buffer._buffer.clear()


def hostile_sessions(edge: SmtpEdge, clock: Clock) -> list[weakref.ref[Any]]:
    """Sessions that end every which way; weak references to their protocols and parts."""
    refs: list[weakref.ref[Any]] = []
    envelope = b"EHLO a\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\n"
    scripts = [
        envelope + b"DATA\r\nhi\r\n.\r\nQUIT\r\n",
        envelope + b"DATA\r\npartial",
        envelope + b"BDAT 100\r\nxx",
        b"\x00\xff" * 300 + b"\r\n" + b"NOOP\n" * 50,
        b"MAIL FROM:<" + b"a" * 100_000,
        b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + b"\x00" * 100,
        b"BAD\r\n" * 30,
    ]
    for script in scripts:
        d = Driver(edge=edge, clock=clock)
        d.send(script)
        refs += [weakref.ref(d.proto), weakref.ref(d.proto.session), weakref.ref(d.proto.reader)]
        d.proto.connectionLost(None)
    return refs


def test_a_closed_connection_leaves_nothing_reachable() -> None:
    """Whatever the client did, once its connection is gone its protocol, session, reader
    and deadline timers are garbage, and no timer of it is left on the clock."""
    clock = Clock()
    edge = SmtpEdge(
        RecordingBus(), Policy(hostname="mx.test", accepted_domains=("example.com",)), clock
    )
    refs = hostile_sessions(edge, clock)
    forget_buffered_log_events()
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []
    assert edge.connections == set()
    assert clock.getDelayedCalls() == []


def test_a_connection_closed_while_the_bus_works_is_let_go_when_it_answers() -> None:
    """The bus holds the envelope until it answers; then nothing of the session is left."""
    clock, bus = Clock(), PendingBus()
    edge = SmtpEdge(bus, Policy(hostname="mx.test", accepted_domains=("example.com",)), clock)
    d = Driver(edge=edge, clock=clock)
    d.start_data()
    d.send(b"hi\r\n.\r\n")
    proto = weakref.ref(d.proto)
    d.proto.connectionLost(None)
    del d
    from slimta_tx import Reply

    bus.pending[0][2].callback(Reply("250", "ok", "2.6.0"))
    bus.pending.clear()
    forget_buffered_log_events()
    gc.collect()
    assert proto() is None
    assert clock.getDelayedCalls() == []


class FakeAllocator:
    def __init__(self, free: int, in_use: int = 10 * MIB) -> None:
        self.free = free
        self.in_use = in_use
        self.trims = 0

    def info(self) -> HeapInfo:
        return HeapInfo(self.in_use + self.free, self.in_use, self.free)

    def trim(self) -> None:
        self.trims += 1


def test_trimmer_trims_only_past_the_threshold() -> None:
    """A few MiB free: left alone (trimming would only fault them in again). Past the
    threshold: one trim, logged."""
    clock, allocator = Clock(), FakeAllocator(free=4 * MIB)
    trimmer = MemoryTrimmer(60, 16 * MIB, reactor=clock, allocator=allocator)
    trimmer.resident = lambda: 60 * MIB
    trimmer.startService()
    clock.advance(60)
    assert allocator.trims == 0
    allocator.free = 40 * MIB
    with captured_events() as events:
        clock.advance(60)
    assert allocator.trims == 1
    [line] = [formatEvent(e) for e in events if "memory:" in formatEvent(e)]
    assert "40.0 MiB free of 50.0 MiB; 10.0 MiB in use" in line
    trimmer.stopService()


def test_trimmer_does_not_trim_again_until_memory_was_faulted_in_again() -> None:
    """Free bytes stay in malloc's books after a trim; only a fresh rise in resident memory
    makes another trim worth it."""
    clock, allocator = Clock(), FakeAllocator(free=40 * MIB)
    trimmer = MemoryTrimmer(60, 16 * MIB, reactor=clock, allocator=allocator)
    resident = [80 * MIB]
    trimmer.resident = lambda: resident[0]
    trimmer.startService()  # checks at once
    assert allocator.trims == 1
    clock.advance(60)
    assert allocator.trims == 1
    resident[0] += 5 * MIB
    clock.advance(60)
    assert allocator.trims == 2
    trimmer.stopService()


def test_without_glibc_the_trimmer_does_nothing() -> None:
    clock = Clock()
    trimmer = MemoryTrimmer(60, reactor=clock, allocator=None)
    trimmer.allocator = None
    trimmer.startService()
    assert clock.getDelayedCalls() == []


def test_glibc_figures_are_read() -> None:
    """On this (glibc) system the real allocator answers with plausible figures."""
    allocator = glibc()
    assert allocator is not None
    info = allocator.info()
    assert info.heap >= info.in_use > 0
    allocator.trim()
