"""slimta_tx.timers.move: later is a reset of the same timer, sooner a replacement."""

from __future__ import annotations

from twisted.internet.task import Clock

from slimta_tx.timers import move


def test_a_timer_moved_later_is_the_same_timer_reset() -> None:
    clock, fired = Clock(), list[str]()
    timer = clock.callLater(10, fired.append, "old")
    clock.advance(5)
    assert move(clock, timer, 30, lambda: fired.append("new")) is timer
    clock.advance(29)
    assert fired == []
    clock.advance(1)
    assert fired == ["old"]  # it keeps its own function


def test_a_timer_moved_sooner_is_replaced_and_the_new_one_calls_call() -> None:
    clock, fired = Clock(), list[str]()
    timer = clock.callLater(300, fired.append, "old")
    moved = move(clock, timer, 30, lambda: fired.append("new"))
    assert moved is not timer
    assert not timer.active()
    clock.advance(30)
    assert fired == ["new"]
    clock.advance(300)
    assert fired == ["new"]  # the old one never fires


def test_no_timer_or_a_spent_one_gives_a_new_timer() -> None:
    clock, fired = Clock(), list[str]()
    spent = clock.callLater(1, fired.append, "spent")
    clock.advance(1)
    for timer in (None, spent):
        move(clock, timer, 5, lambda: fired.append("new"))
    clock.advance(5)
    assert fired == ["spent", "new", "new"]


def test_a_closing_session_is_aborted_30_s_after_its_goodbye() -> None:
    """The idle timer (300 s) becomes the 30 s abort deadline of a client that never reads:
    moved sooner, so replaced, and the connection is aborted at 30 s."""
    from slimta_tx.bus.simple import DiscardBus
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.testing import connect

    clock = Clock()
    edge = SmtpEdge(DiscardBus(), reactor=clock)
    proto, transport = connect(edge)
    proto.dataReceived(b"QUIT\r\n")
    assert b"221 2.0.0" in transport.value()
    assert transport.disconnecting  # asked to close, but the client does not read
    clock.advance(29)
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected  # StringTransport.abortConnection
