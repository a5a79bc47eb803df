"""The relay bus's connection pool: limits, reuse, waiting, idle timeout (Clock only)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from slimta_tx.bus.pool import ConnectionPool, PoolClosed, PoolTimeout


class Conn:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    @property
    def usable(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def make_pool(**kwargs: float) -> tuple[ConnectionPool[Conn], Clock, list[Conn]]:
    clock = Clock()
    made: list[Conn] = []

    def connect() -> Deferred[Conn]:
        made.append(Conn(len(made)))
        return succeed(made[-1])

    return ConnectionPool(connect, clock, **kwargs), clock, made  # type: ignore[arg-type]


def got(d: Deferred[Conn]) -> Conn:
    assert d.called
    return d.result  # type: ignore[attr-defined, no-any-return]


def test_released_connection_is_reused() -> None:
    """A connection given back is handed to the next acquire; no second connect."""
    pool, _, made = make_pool()
    conn = got(pool.acquire())
    pool.release(conn)
    assert got(pool.acquire()) is conn
    assert len(made) == 1


def test_at_most_max_size_then_waiters_are_served_in_order() -> None:
    """Past max_size, acquires wait; a release serves the oldest waiter."""
    pool, _, made = make_pool(max_size=2)
    a, b = got(pool.acquire()), got(pool.acquire())
    first, second = pool.acquire(), pool.acquire()
    assert not first.called and len(made) == 2
    pool.release(b)
    assert got(first) is b and not second.called
    pool.release(a, reusable=False)  # a broken connection frees a slot: a new one is made
    assert got(second).number == 2 and a.closed


def test_waiting_too_long_fails() -> None:
    """A waiter not served within wait_timeout fails with PoolTimeout and leaves the queue."""
    pool, clock, _ = make_pool(max_size=1, wait_timeout=5)
    conn = got(pool.acquire())
    waiting = pool.acquire()
    clock.advance(5)
    errors: list[object] = []
    waiting.addErrback(errors.append)
    assert errors and errors[0].check(PoolTimeout)  # type: ignore[attr-defined]
    pool.release(conn)
    assert pool.idle == 1


def test_idle_connections_close_after_idle_timeout() -> None:
    """An unused connection is closed after idle_timeout and its slot freed."""
    pool, clock, _ = make_pool(idle_timeout=30)
    conn = got(pool.acquire())
    pool.release(conn)
    clock.advance(29)
    assert not conn.closed
    clock.advance(1)
    assert conn.closed and pool.size == 0 and pool.idle == 0


def test_connection_closed_by_peer_is_not_handed_out() -> None:
    """An idle connection found closed is discarded and a fresh one made."""
    pool, _, _made = make_pool()
    conn = got(pool.acquire())
    pool.release(conn)
    conn.closed = True
    assert got(pool.acquire()).number == 1
    assert pool.size == 1


def test_failed_connect_frees_its_slot() -> None:
    """A connect that fails does not use up the pool."""
    clock = Clock()
    pool: ConnectionPool[Conn] = ConnectionPool(
        lambda: fail(ConnectionError("down")), clock, max_size=1
    )
    pool.acquire().addErrback(lambda f: None)
    assert pool.size == 0


def test_close_quits_idle_and_fails_waiters() -> None:
    """close(): idle connections close now, busy ones on release, waiters fail."""
    pool, _, _ = make_pool(max_size=2)
    a, b = got(pool.acquire()), got(pool.acquire())
    pool.release(a)
    waiting = pool.acquire()
    assert got(waiting) is a
    waiting2 = pool.acquire()
    pool.close()
    errors: list[object] = []
    waiting2.addErrback(errors.append)
    assert errors[0].check(PoolClosed)  # type: ignore[attr-defined]
    pool.release(b)
    assert b.closed
