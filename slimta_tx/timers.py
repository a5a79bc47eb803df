"""Moving a timer without a linear search of the reactor's timer heap.

``DelayedCall.reset`` to a *later* time is cheap (the reactor re-files the call when it comes
due), but to an *earlier* time it costs ``list.index`` over every pending call of the reactor
(``ReactorBase._moveCallLaterSooner``): with a few hundred sessions, each with its timers, that
was 6 % of a busy edge's CPU (py-spy, 50 connections, one message each), paid when a session's
deadline timer moves to its body's deadline and when a closing session's idle timer becomes
its 30 s abort deadline. A cancel (lazy in the reactor) and a new ``callLater`` (a heap push)
cost little whatever the heap's size, so :func:`move` resets a timer that moves later and
replaces one that moves sooner.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["move"]


def move(
    clock: IReactorTime, timer: IDelayedCall | None, seconds: float, call: Callable[[], object]
) -> IDelayedCall:
    """``timer`` moved to ``seconds`` from now, or a new timer calling ``call`` then.

    An active ``timer`` that moves later is reset (it keeps its own function); one that moves
    sooner is cancelled and replaced by ``clock.callLater(seconds, call)``, as is a ``timer``
    that is None or no longer active.
    """
    if timer is not None and timer.active():
        if clock.seconds() + seconds >= timer.getTime():
            timer.reset(seconds)
            return timer
        timer.cancel()
    return clock.callLater(seconds, call)
