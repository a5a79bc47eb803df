"""A pool of connections to one next hop, so that messages do not pay a connection each.

At most ``max_size`` connections exist at once (busy or idle). :meth:`ConnectionPool.acquire`
hands out an idle connection, opens a new one while under the limit, or waits (up to
``wait_timeout``) for one to come back. An idle connection is closed after ``idle_timeout``
seconds, or as soon as it is found closed by the other side.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

__all__ = ["ConnectionPool", "PoolClosed", "PoolTimeout", "Poolable"]


class PoolTimeout(Exception):
    """No connection became free in time."""


class PoolClosed(Exception):
    """The pool was closed while waiting."""


class Poolable(Protocol):
    @property
    def usable(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Poolable)


class ConnectionPool(Generic[C]):
    """Connections made by ``connect()`` (a Deferred), reused until they fail or idle out.

    :param clock: an ``IReactorTime`` provider; usually the reactor, when not testing.
    """

    def __init__(
        self,
        connect: Callable[[], Deferred[C]],
        clock: IReactorTime,
        max_size: int = 10,
        idle_timeout: float = 30.0,
        wait_timeout: float = 60.0,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._connect = connect
        self.clock = clock
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.wait_timeout = wait_timeout
        self.size = 0
        self.opened = 0
        self.closing = False
        self._idle: list[tuple[C, IDelayedCall]] = []
        self._waiters: deque[Deferred[C | None]] = deque()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire(self) -> Deferred[C]:
        """A connection for one transaction; give it back with :meth:`release`."""
        while self._idle:
            conn, timer = self._idle.pop()
            timer.cancel()
            if conn.usable:
                return succeed(conn)
            self._discard(conn)
        if self.size < self.max_size:
            return self._open()
        waiter: Deferred[C | None] = Deferred()
        self._waiters.append(waiter)
        waiter.addTimeout(self.wait_timeout, self.clock)

        def granted(conn: C | None) -> C | Deferred[C]:
            # None: a slot was freed, not a connection; open one in it.
            return conn if conn is not None else self._open(counted=True)

        def timed_out(failure: Failure) -> Failure:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if failure.check(CancelledError, TimeoutError):
                return Failure(PoolTimeout(f"no free connection in {self.wait_timeout}s"))
            return failure

        return waiter.addCallbacks(granted, timed_out)

    def release(self, conn: C, reusable: bool = True) -> None:
        """Give a connection back; ``reusable=False`` closes it (after a failure)."""
        if not reusable or not conn.usable or self.closing:
            self._discard(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(conn)
                return
        timer = self.clock.callLater(self.idle_timeout, self._idle_out, conn)
        self._idle.append((conn, timer))

    def close(self) -> None:
        """Close idle connections now and busy ones when released; waiters fail."""
        self.closing = True
        idle, self._idle = self._idle, []
        for conn, timer in idle:
            timer.cancel()
            self._discard(conn)
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(PoolClosed("the relay is shutting down"))

    # -- internals ------------------------------------------------------------------------

    def _open(self, counted: bool = False) -> Deferred[C]:
        if self.closing:
            if counted:
                self._slot_freed()
            return fail(PoolClosed("the relay is shutting down"))
        if not counted:
            self.size += 1
        self.opened += 1

        def failed(failure: Failure) -> Failure:
            self._slot_freed()
            return failure

        return self._connect().addErrback(failed)

    def _idle_out(self, conn: C) -> None:
        self._idle = [(c, t) for c, t in self._idle if c is not conn]
        self._discard(conn)

    def _discard(self, conn: C) -> None:
        conn.close()
        self._slot_freed()

    def _slot_freed(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(None)  # the waiter opens a connection in this slot
                return
        self.size -= 1
