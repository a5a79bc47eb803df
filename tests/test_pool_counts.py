"""The pool test's accounting (tests/support/pool.py): what the clients saw set against the
queue's copies, so that a loss or a duplicate at-least-once does not allow cannot pass as a
clean run."""

from __future__ import annotations

from types import SimpleNamespace

from tests.support.pool import (
    ACKED,
    CUT,
    NO_REPLY,
    REFUSED_AFTER_DOT,
    Attempt,
    Copy,
    copy_of,
    count,
    message,
)

MX1, MX2, CLIENT = "mx1.example.com", "mx2.example.com", "127.0.0.2"


def copy(token: str, attempt: int, queue_id: str, edge: str = MX2, ip: str = CLIENT) -> Copy:
    return Copy(token, attempt, queue_id, edge, ip)


def test_a_clean_run_counts_what_was_sent() -> None:
    attempts = {
        "a": [Attempt(1, ACKED, MX1, "Q1")],
        "b": [Attempt(1, CUT, MX1), Attempt(2, ACKED, MX2, "Q2")],
    }
    counts = count(attempts, [copy("a", 1, "Q1", MX1), copy("b", 2, "Q2")], MX1, CLIENT)
    assert (counts.messages, counts.acknowledged, counts.attempts) == (2, 2, 3)
    assert (counts.in_queue, counts.distinct_in_queue) == (2, 2)
    assert counts.by_edge == {MX1: 1, MX2: 1}
    assert (counts.duplicates, counts.duplicates_of_acknowledged, counts.lost) == (0, 0, 0)
    assert counts.attempts_by_outcome == {ACKED: 2, CUT: 1}


def test_a_250_whose_copy_is_missing_is_lost() -> None:
    """Even when another attempt of the same message is in the queue."""
    attempts = {"a": [Attempt(1, NO_REPLY, MX1), Attempt(2, ACKED, MX2, "Q2")]}
    counts = count(attempts, [copy("a", 1, "Q1", MX1)], MX1, CLIENT)
    assert counts.lost == 1


def test_a_copy_of_an_attempt_without_a_250_is_an_allowed_duplicate() -> None:
    attempts = {
        "a": [Attempt(1, NO_REPLY, MX1), Attempt(2, ACKED, MX2, "Q2")],
        "b": [Attempt(1, REFUSED_AFTER_DOT, MX2), Attempt(2, ACKED, MX2, "Q4")],
    }
    copies = [copy("a", 1, "Q1", MX1), copy("a", 2, "Q2"), copy("b", 1, "Q3"), copy("b", 2, "Q4")]
    counts = count(attempts, copies, MX1, CLIENT)
    assert (counts.duplicates, counts.duplicates_without_250) == (2, 2)
    assert (counts.duplicates_of_acknowledged, counts.lost) == (0, 0)
    assert (counts.in_flight_at_kill, counts.in_flight_at_kill_in_queue) == (1, 1)


def test_duplicates_at_least_once_does_not_allow() -> None:
    """Two copies of the attempt that got the 250; a copy of an attempt cut before its final
    dot; a copy of an attempt no client made."""
    attempts = {
        "a": [Attempt(1, ACKED, MX1, "Q1")],
        "b": [Attempt(1, CUT, MX1), Attempt(2, ACKED, MX2, "Q3")],
    }
    copies = [
        copy("a", 1, "Q1"),
        copy("a", 1, "Q1"),
        copy("b", 1, "Q2"),
        copy("b", 2, "Q3"),
        copy("b", 7, "Q9"),
    ]
    counts = count(attempts, copies, MX1, CLIENT)
    assert counts.duplicates_of_acknowledged == 3
    assert counts.duplicates == 3 and counts.duplicates_without_250 == 0


def test_a_copy_that_names_another_client_address_is_counted() -> None:
    attempts = {"a": [Attempt(1, ACKED, MX1, "Q1")]}
    counts = count(attempts, [copy("a", 1, "Q1", ip="127.0.0.1")], MX1, CLIENT)
    assert counts.not_from_client == 1


def test_a_queued_message_is_traced_to_its_token_attempt_and_edge() -> None:
    """What the edge publishes: its Received: header, then the client's message."""
    body = b"Received: from client.test\r\n\tby mx1.example.com (slimta_tx)\r\n" + message(
        "m000042", 3, 100
    )
    properties = SimpleNamespace(
        message_id="QID",
        headers={"slimta-envelope": f'{{"receiver": "{MX1}", "client": {{"ip": "{CLIENT}"}}}}'},
    )
    assert copy_of(properties, body) == Copy("m000042", 3, "QID", MX1, CLIENT)
