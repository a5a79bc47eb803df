"""Clients and counts for the pool test (tests/test_pool.py): many SMTP clients through HAProxy,
each message retried until it gets a 250, and the queue's copies set against what the clients
saw.

A message is identified by a token, in its ``Message-ID`` and an ``X-Pool-Token`` header; every
attempt to send it carries its number in ``X-Pool-Attempt`` (a test instrument: a real MTA
resends the same bytes), so each copy in the queue is traced to the attempt that produced it and
to what that attempt's client saw:

- ``250``: the reply to the final dot was 250 (the queue id is kept);
- ``4xx after the dot``: a 4xx reply to the final dot (the edge may still have published it:
  a confirm that came too late, a connection to the broker lost after the publish);
- ``no reply after the dot``: the connection broke after the final dot was sent and before the
  reply (an edge killed while the message was in flight);
- ``4xx before the dot`` and ``cut before the dot``: refused or broken before the end of data
  (no edge can have published that attempt).

At least once means: every attempt that got a 250 is in the queue, exactly once, under the
queue id of its 250; every other copy comes from an attempt that sent its final dot and got no
250.
"""

from __future__ import annotations

import json
import random
import re
import smtplib
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACKED = "250"
REFUSED_AFTER_DOT = "4xx after the dot"
NO_REPLY = "no reply after the dot"
REFUSED_BEFORE_DOT = "4xx before the dot"
CUT = "cut before the dot"
#: Outcomes after which the edge may have published the attempt without the client knowing.
UNCERTAIN = (REFUSED_AFTER_DOT, NO_REPLY)

SENDER = "sender@client.test"
RECIPIENT = "inbox@example.com"


def message(token: str, attempt: int, size: int) -> bytes:
    """The message of ``token`` (the same on every attempt but for ``X-Pool-Attempt``)."""
    filler = (f"{token} " * (size // (len(token) + 1) + 1))[:size]
    lines = [filler[i : i + 76] for i in range(0, len(filler), 76)]
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: pool {token}\r\n"
        f"Message-ID: <{token}@pool.test>\r\nX-Pool-Token: {token}\r\n"
        f"X-Pool-Attempt: {attempt}\r\n\r\n"
    )
    return head.encode() + "\r\n".join(lines).encode() + b"\r\n"


@dataclass
class Attempt:
    number: int
    outcome: str
    edge: str | None = None  # the host name in the banner: which edge served it
    queue_id: str | None = None  # from the 250
    reply: str = ""
    began: float = 0.0  # time.monotonic() at the connect
    at: float = 0.0  # time.monotonic() when the outcome was known


@dataclass
class Clients:
    """``threads`` SMTP clients sending through ``port`` from ``source``, one connection per
    attempt, until :meth:`stop` or ``limit`` messages; each message is retried (a pause of
    0.1 s doubling to 1 s) until it gets a 250 or ``give_up_after`` seconds have passed."""

    host: str
    port: int
    source: str = "127.0.0.2"
    threads: int = 20
    limit: int = 20000
    size: int = 1024
    timeout: float = 60.0  # per socket operation: more than the edges' --amqp-timeout
    give_up_after: float = 150.0
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    started: int = 0
    acked: int = 0

    def stop(self) -> None:
        self.stopping.set()

    def _next(self) -> str | None:
        with self.lock:
            if self.stopping.is_set() or self.started >= self.limit:
                return None
            self.started += 1
            return f"m{self.started:06d}"

    def run(self, timeout: float = 600.0) -> None:
        """Run the clients until they finish (bounded by ``timeout`` seconds)."""
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.threads)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(thread.is_alive() for thread in threads)
        if alive:
            self.stop()
            with self.lock:
                self.failures.append(f"{alive} clients still sending after {timeout:.0f} s")

    def wait_for_acks(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < count:
            if self.failures or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.acked} of {count} messages acknowledged in {timeout:.0f} s; "
                    f"failures: {self.failures[:5]}"
                )
            time.sleep(0.02)  # polls the clients' progress (bounded by the deadline)

    def _client(self) -> None:
        rng = random.Random()
        while (token := self._next()) is not None:
            history: list[Attempt] = []
            with self.lock:
                self.attempts[token] = history
            deadline = time.monotonic() + self.give_up_after
            pause = 0.1
            while True:
                attempt = self.attempt(token, len(history) + 1)
                with self.lock:
                    history.append(attempt)
                    if attempt.outcome == ACKED:
                        self.acked += 1
                if attempt.outcome == ACKED:
                    break
                if attempt.outcome.startswith("5"):
                    with self.lock:
                        self.failures.append(f"{token}: {attempt.reply}")
                    break
                if time.monotonic() > deadline:
                    with self.lock:
                        self.failures.append(
                            f"{token}: no 250 in {len(history)} attempts over "
                            f"{self.give_up_after:.0f} s; last: {attempt.outcome} {attempt.reply}"
                        )
                    break
                time.sleep(pause * (0.5 + rng.random()))  # the client's retry pause
                pause = min(1.0, pause * 2)

    def attempt(self, token: str, number: int) -> Attempt:
        """One connection: EHLO, MAIL, RCPT, DATA; what the client saw."""
        smtp = smtplib.SMTP(timeout=self.timeout, source_address=(self.source, 0))
        edge: str | None = None
        dot_sent = False
        began = time.monotonic()

        def seen(outcome: str, reply: str = "", queue_id: str | None = None) -> Attempt:
            return Attempt(number, outcome, edge, queue_id, reply, began, time.monotonic())

        def refused(code: int, text: bytes) -> Attempt:
            reply = f"{code} {text.decode(errors='replace')}"
            if code >= 500:
                return seen(f"5xx ({'after' if dot_sent else 'before'} the dot)", reply)
            return seen(REFUSED_AFTER_DOT if dot_sent else REFUSED_BEFORE_DOT, reply)

        try:
            code, text = smtp.connect(self.host, self.port)
            if code != 220:
                return refused(code, text)
            edge = text.decode(errors="replace").split()[0]
            for command, want in (
                (lambda: smtp.ehlo("client.test"), 250),
                (lambda: smtp.mail(SENDER), 250),
                (lambda: smtp.rcpt(RECIPIENT), 250),
                (lambda: smtp.docmd("DATA"), 354),
            ):
                code, text = command()
                if code != want:
                    return refused(code, text)
            data = smtplib.quotedata(message(token, number, self.size).decode())
            smtp.send(data.encode() + b".\r\n")
            dot_sent = True
            code, text = smtp.getreply()
            if code != 250:
                return refused(code, text)
            reply = text.decode(errors="replace")
            acked = seen(ACKED, reply, reply.split()[-1])
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass  # the 250 is what counts
            return acked
        except (OSError, smtplib.SMTPServerDisconnected) as e:
            return seen(NO_REPLY if dot_sent else CUT, repr(e))
        finally:
            smtp.close()


@dataclass(frozen=True)
class Copy:
    """One message found in the queue."""

    token: str
    attempt: int
    queue_id: str
    receiver: str
    client_ip: str


def copy_of(properties: Any, body: bytes) -> Copy:
    """The token, attempt and edge of one queued message (its body and AMQP properties)."""
    headers: dict[str, str] = {}
    for line in body.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.decode(errors="replace").partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    envelope = json.loads(properties.headers["slimta-envelope"])
    return Copy(
        headers["x-pool-token"],
        int(headers["x-pool-attempt"]),
        str(properties.message_id),
        envelope["receiver"],
        envelope["client"]["ip"],
    )


@dataclass
class Counts:
    """What the clients saw against what the queue holds (see the module docstring)."""

    messages: int = 0  # messages the clients sent (each until its 250)
    acknowledged: int = 0  # messages that got a 250
    attempts: int = 0
    attempts_by_outcome: dict[str, int] = field(default_factory=dict)
    in_queue: int = 0  # copies in the queue
    distinct_in_queue: int = 0
    by_edge: dict[str, int] = field(default_factory=dict)  # copies per edge (Received: by)
    duplicates: int = 0  # copies beyond one per message
    duplicates_without_250: int = 0  # of those, copies of attempts that sent the dot, no 250
    duplicates_of_acknowledged: int = 0  # copies at-least-once does not allow: must be 0
    lost: int = 0  # 250s whose copy is not in the queue: must be 0
    not_from_client: int = 0  # copies whose client address is not the clients': must be 0
    in_flight_at_kill: int = 0  # attempts on the killed edge: final dot sent, no reply
    in_flight_at_kill_in_queue: int = 0  # of those, in the queue anyway (then duplicates)
    examples: list[str] = field(default_factory=list)  # offending copies, for the report
    without_250: dict[str, int] = field(default_factory=dict)  # "outcome on edge: reply" -> n
    slowest: float = 0.0  # seconds from a message's first connect to its 250, the longest
    over_1s: int = 0  # messages that took more than a second to get their 250

    def summary(self) -> str:
        outcomes = ", ".join(f"{n} {k}" for k, n in sorted(self.attempts_by_outcome.items()))
        edges = ", ".join(f"{k} {n}" for k, n in sorted(self.by_edge.items()))
        seen = "; ".join(f"{n} x {k}" for k, n in sorted(self.without_250.items()))
        return (
            f"{self.messages} messages, {self.acknowledged} acknowledged (250), "
            f"{self.attempts} attempts ({outcomes}); in the queue {self.in_queue} copies of "
            f"{self.distinct_in_queue} messages ({edges}); duplicates {self.duplicates} "
            f"(from attempts without a 250: {self.duplicates_without_250}; of acknowledged "
            f"attempts: {self.duplicates_of_acknowledged}); lost {self.lost}; in flight on the "
            f"killed edge {self.in_flight_at_kill} (in the queue: "
            f"{self.in_flight_at_kill_in_queue}); slowest message {self.slowest:.2f} s to its "
            f"250, {self.over_1s} over 1 s\n  attempts without a 250: {seen or 'none'}"
        )


def count(
    attempts: dict[str, list[Attempt]], copies: list[Copy], killed: str, source: str
) -> Counts:
    """Set the queue's ``copies`` against the clients' ``attempts``; ``killed`` is the killed
    edge's host name, ``source`` the clients' address."""
    counts = Counts(messages=len(attempts))
    outcomes: Counter[str] = Counter()
    by_attempt: Counter[tuple[str, int]] = Counter((c.token, c.attempt) for c in copies)
    by_id = {(c.token, c.queue_id) for c in copies}
    tokens = Counter(c.token for c in copies)
    counts.in_queue = len(copies)
    counts.distinct_in_queue = len(tokens)
    counts.by_edge = dict(Counter(c.receiver for c in copies))
    counts.duplicates = sum(n - 1 for n in tokens.values())
    counts.not_from_client = sum(c.client_ip != source for c in copies)
    without_250: Counter[str] = Counter()
    for token, history in attempts.items():
        if history and history[-1].outcome == ACKED:
            took = history[-1].at - history[0].began
            counts.slowest = max(counts.slowest, took)
            counts.over_1s += took > 1.0
        for attempt in history:
            outcomes[attempt.outcome] += 1
            if attempt.outcome != ACKED:
                reply = re.sub(r"\d+", "N", attempt.reply)[:100]
                without_250[f"{attempt.outcome} on {attempt.edge}: {reply}"] += 1
            found = by_attempt.get((token, attempt.number), 0)
            if attempt.outcome == ACKED:
                counts.acknowledged += 1
                if (token, attempt.queue_id) not in by_id:
                    counts.lost += 1
                    counts.examples.append(f"lost: {token} attempt {attempt.number}")
                if found > 1:
                    counts.duplicates_of_acknowledged += found - 1
                    counts.examples.append(f"{found} copies of acknowledged {token}")
            elif attempt.outcome in UNCERTAIN:
                counts.duplicates_without_250 += found
                if attempt.outcome == NO_REPLY and attempt.edge == killed:
                    counts.in_flight_at_kill += 1
                    counts.in_flight_at_kill_in_queue += found > 0
            elif found:
                counts.duplicates_of_acknowledged += found
                counts.examples.append(f"{token} attempt {attempt.number} ({attempt.outcome})")
    # A copy of an attempt no client made.
    known = {(t, a.number) for t, history in attempts.items() for a in history}
    strays = sum(n for key, n in by_attempt.items() if key not in known)
    counts.duplicates_of_acknowledged += strays
    counts.without_250 = dict(without_250)
    counts.attempts = sum(outcomes.values())
    counts.attempts_by_outcome = dict(outcomes)
    return counts


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def source_address_works(source: str) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind((source, 0))
    except OSError:
        return False
    return True


class Relay:
    """A TCP relay from a free loopback port to ``target`` that can hold back what the target
    sends: between :meth:`hold` and :meth:`release`, the target's bytes (a broker's confirms)
    are kept, in order, instead of passed on; what the client sends always goes through."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.held_bytes = 0
        self._held = False
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, list[bytes]]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        with self._lock:
            self._held = True
            self.held_bytes = 0

    def release(self) -> None:
        with self._lock:
            self._held = False
            for client, _, kept in self._pairs:
                try:
                    client.sendall(b"".join(kept))
                except OSError:
                    pass  # that client is gone
                kept.clear()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for client, server, _ in self._pairs:
                client.close()
                server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
            kept: list[bytes] = []
            with self._lock:
                self._pairs.append((client, server, kept))
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, kept), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, kept: list[bytes] | None) -> None:
        """Copy ``source`` to ``sink``; into ``kept`` instead while held (``kept`` is None for
        the client's direction). An end of stream is passed on at once."""
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            with self._lock:
                keep = bool(data) and kept is not None and self._held
                if keep:
                    assert kept is not None
                    kept.append(data)
                    self.held_bytes += len(data)
            if keep:
                continue
            try:
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except OSError:
                return
