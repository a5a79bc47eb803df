"""``twistd slimta --workers N``: one parent binds every listener, N worker processes serve them.

How it works (docs/deployment.md says why it is done this way):

- The parent binds each ``--listen``, ``--tls-listen`` and ``--lmtp-listen`` endpoint itself,
  before twistd drops privileges (``--uid``/``--gid``, ports below 1024) and with the
  fail-fast rules of a single process: a port that cannot be bound stops start-up. It never
  accepts a connection: its ports are bound, listening and not read.
- Each worker is a fresh Python process (``spawnProcess``, not ``fork``: the parent runs
  threads and a reactor) that inherits the listening sockets as descriptors 3, 4, ... exactly
  as systemd socket activation hands them over (``LISTEN_FDS``/``LISTEN_PID``/
  ``LISTEN_FDNAMES``). Its listeners are the same descriptions with the bound part replaced by
  ``systemd:domain=...:index=...`` (``haproxy:tcp:25`` becomes ``haproxy:systemd:...``), so
  every option builds the same service as in one process. All workers share one accept queue
  per port: an idle worker takes the next connection.
- The worker reads its options from its stdin (one JSON line: the ``twistd slimta`` arguments,
  its listeners, the reactor) and keeps stdin open: when the parent dies, the worker sees end of
  file and drains itself instead of serving on alone.
- Under ``twistd -n`` logging to stdout, workers write their own lines to that stdout; with
  ``--logfile``, ``--syslog`` or ``--logger`` they log through the parent: each event as a JSON
  line, re-emitted there with ``worker=N``, so rotation stays the parent's business
  (:mod:`slimta_tx.worker_log`). Either way lines say ``worker-N`` in their system prefix.
- The parent supervises (:class:`WorkerPool`, with the rules of :mod:`slimta_tx.supervise`),
  forwards SIGHUP to every worker, and on SIGTERM closes its listening sockets, sends SIGTERM
  to every worker (each drains as a single process does) and waits for them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError, ProcessTerminated
from twisted.internet.interfaces import IListeningPort, IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from slimta_tx import capacity
from slimta_tx.service import SighupReload, offer_log_observer
from slimta_tx.supervise import STOP_MARGIN, RestartLimits, WorkerPool

__all__ = [
    "LISTENER_OPTIONS",
    "LISTEN_BACKLOG",
    "SUPPORTED_LISTENERS",
    "WorkerPool",
    "WorkersService",
    "split_listener",
    "worker_description",
]

#: The options whose listeners the parent binds and the workers share.
LISTENER_OPTIONS = ("listen", "tls-listen", "lmtp-listen")

#: The listen backlog of sockets the parent binds (``backlog=`` in a description wins): the
#: same as a single process's (:data:`slimta_tx.capacity.DEFAULT_LISTEN_BACKLOG`), so that a
#: burst of connections waits in the kernel while every worker is busy instead of being
#: refused; the kernel caps it at ``net.core.somaxconn``.
LISTEN_BACKLOG = capacity.DEFAULT_LISTEN_BACKLOG

#: Endpoint types the parent can bind and hand over; ``haproxy:`` may wrap any of them.
SUPPORTED_LISTENERS = ("tcp", "tcp6", "unix", "systemd")
WRAPPERS = ("haproxy",)

_DOMAINS = ((IPv6Address, "INET6"), (IPv4Address, "INET"), (UNIXAddress, "UNIX"))


def split_listener(description: str) -> tuple[str, str]:
    """``"haproxy:tcp:25"`` -> ``("haproxy:", "tcp:25")``; ValueError for what workers cannot
    share (one line, naming the description)."""
    prefix, rest = "", description
    while True:
        kind = rest.split(":", 1)[0].strip().lower()
        if kind in WRAPPERS and ":" in rest:
            head, rest = rest.split(":", 1)
            prefix += head + ":"
            continue
        if kind in SUPPORTED_LISTENERS:
            return prefix, rest
        raise ValueError(
            f"--workers: cannot share the listener {description!r} between workers; "
            f"use {', '.join(t + ':' for t in SUPPORTED_LISTENERS)} (also behind haproxy:)"
        )


def with_backlog(leaf: str) -> str:
    """Add ``backlog=LISTEN_BACKLOG`` to a tcp/tcp6/unix description that names none
    (:func:`slimta_tx.capacity.with_backlog`, as a single process does); systemd's socket unit
    sets its own (``Backlog=``)."""
    return capacity.with_backlog(leaf, LISTEN_BACKLOG)


def worker_description(prefix: str, domain: str, index: int) -> str:
    """What a worker listens on: the inherited descriptor ``index`` (systemd's numbering)."""
    return f"{prefix}systemd:domain={domain}:index={index}"


class SharedListener(Factory):
    """The parent's placeholder factory: its ports are never read, so it builds nothing."""

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass
class Bound:
    """A socket the parent bound for the workers."""

    description: str
    option: str  # the option that named it: "listen", "tls-listen" or "lmtp-listen"
    port: IListeningPort
    worker_description: str

    def fileno(self) -> int:
        return int(cast(Any, self.port).fileno())


def bind(reactor: Any, description: str, option: str, index: int) -> Bound:
    """Bind ``description`` now (raises CannotListenError as twistd's listeners do)."""
    from twisted.internet.endpoints import serverFromString

    prefix, leaf = split_listener(description)
    outcome: list[Any] = []
    serverFromString(reactor, with_backlog(leaf)).listen(SharedListener()).addBoth(outcome.append)
    if not outcome:  # pragma: no cover - tcp, unix and systemd endpoints listen at once
        raise RuntimeError(f"{description}: the endpoint did not listen synchronously")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    port: IListeningPort = outcome[0]
    # The workers accept; the parent only keeps the socket open (never reads it).
    cast(Any, port).stopReading()
    host = port.getHost()
    domain = next((name for kind, name in _DOMAINS if isinstance(host, kind)), None)
    if domain is None:  # pragma: no cover - only the types above are accepted
        raise ValueError(f"--workers: {description!r} is not a stream socket")
    return Bound(description, option, port, worker_description(prefix, domain, index))


# -- the worker processes ------------------------------------------------------------------------


class WorkerProcess(ProcessProtocol):
    """The parent's end of one worker: its options in, its log events out, its exit."""

    log = Logger(namespace="slimta_tx.workers")

    def __init__(self, slot: int, pool: WorkerPool, spec: bytes) -> None:
        self.slot = slot
        self.pool = pool
        self.spec = spec
        self.pid: int | None = None
        #: Called with the pid when the process ended (``--metrics``: slimta_tx.metrics.workers).
        self.exit_hooks: list[Callable[[int], object]] = []
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        transport = cast(IProcessTransport, self.transport)
        self.pid = transport.pid
        # Stays open: the worker drains itself when it reads end of file (the parent is gone).
        transport.write(self.spec)

    def signal(self, signum: int) -> None:
        cast(IProcessTransport, self.transport).signalProcess(signum)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._buffers[childFD] = rest[-65536:]  # a line never ends: keep memory bounded
        for line in lines:
            self._line(childFD, line)

    def _line(self, fd: int, line: bytes) -> None:
        if fd == 1:
            from slimta_tx.worker_log import decode_event

            event = decode_event(line, self.slot)
            if event is not None:
                # Complete already (its own time, namespace, level): handed on as it is, to
                # the observer Logger.emit would call (the global publisher if it has none).
                observer = getattr(self.log, "observer", None) or globalLogPublisher
                observer(event)
                return
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:
            self.log.warn("worker {worker}: {text}", worker=self.slot, text=text)

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            if self._buffers.get(fd):
                self._line(fd, self._buffers[fd])
                self._buffers[fd] = b""
        if self.pid is not None:
            for hook in self.exit_hooks:
                hook(self.pid)
        value = reason.value
        if isinstance(value, ProcessTerminated):
            self.pool.exited(self.slot, value.exitCode, value.signal)
        else:
            self.pool.exited(self.slot, 0, None)


def reactor_module(reactor: Any) -> str:
    """The module whose ``install()`` gives a worker the parent's kind of reactor."""
    return str(type(reactor).__module__)


# The child sets LISTEN_PID to its own pid before anything imports Twisted's endpoints (which
# read the systemd variables once, at import).
BOOTSTRAP = (
    "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "from slimta_tx.worker import main; sys.exit(main())"
)


class WorkersService(MultiService):
    """The parent of ``twistd slimta --workers N``.

    :param argv: the ``twistd slimta`` arguments; each worker parses them again.
    :param listeners: the descriptions to bind, by the option that named them (``listen``,
        ``tls-listen``, ``lmtp-listen``); each worker gets its copies under the same options.
    :param grace: ``--shutdown-grace``: workers get this long plus :data:`STOP_MARGIN` to drain.
    """

    log = Logger(namespace="slimta_tx.workers")
    #: As for EdgeService: under ``twistd -n`` a port that cannot be bound is one line, exit 1.
    exit_on_listen_error = False
    #: As for EdgeService: the log observer twistd installs (slimta_tx/cli/logs.py).
    log_observer_factory: Callable[[], object] | None = None

    def __init__(
        self,
        argv: Sequence[str],
        listeners: dict[str, Sequence[str]],
        count: int,
        reactor: Any,
        limits: RestartLimits | None = None,
        grace: float = 30.0,
        log_to_stdout: bool = False,
    ) -> None:
        super().__init__()
        self.argv = list(argv)
        self.log_to_stdout = log_to_stdout
        self.listeners = [(d, option) for option, ds in listeners.items() for d in ds]
        self.reactor = reactor
        self.bound: list[Bound] = []
        self.pool = WorkerPool(
            count,
            self._spawn,
            reactor,
            limits=limits,
            stop_timeout=grace + STOP_MARGIN,
            on_give_up=self._give_up,
        )
        #: More environment for the workers, and what to call with a worker's pid when it
        #: ends (``--metrics``: slimta_tx.metrics.workers).
        self.worker_env: dict[str, str] = {}
        self.exit_hooks: list[Callable[[int], object]] = []
        self.reloads = SighupReload(reactor)
        self.reloads.add(self.reload)
        self.reloads.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        offer_log_observer(parent, self.log_observer_factory)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            for index, (description, option) in enumerate(self.listeners):
                self.bound.append(bind(self.reactor, description, option, index))
        except CannotListenError as e:
            self._close_bound()
            if not self.exit_on_listen_error:
                raise
            raise SystemExit(f"slimta: {e}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "starting {count} workers on {listeners}",
            count=self.pool.count,
            listeners=", ".join(b.description for b in self.bound),
        )
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        self._close_bound()
        d: Deferred[Any] = super().stopService()
        return d.addCallback(lambda _: self.pool.stop())

    def reload(self) -> None:
        """SIGHUP: every worker reloads its certificates and lists."""
        sent = self.pool.signal_all(signal.SIGHUP)
        self.log.info("SIGHUP sent to {count} workers", count=sent)

    def spec(self, slot: int) -> bytes:
        listeners: dict[str, list[str]] = {option: [] for _, option in self.listeners}
        for bound in self.bound:
            listeners[bound.option].append(bound.worker_description)
        record = {
            "slot": slot,
            "argv": self.argv,
            "listeners": listeners,
            "reactor": reactor_module(self.reactor),
            "log": "stdout" if self.log_to_stdout else "parent",
        }
        return json.dumps(record).encode("utf-8") + b"\n"

    def _spawn(self, slot: int) -> WorkerProcess:
        process = WorkerProcess(slot, self.pool, self.spec(slot))
        process.exit_hooks = self.exit_hooks
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env["LISTEN_FDS"] = str(len(self.bound))
        env["LISTEN_FDNAMES"] = ":".join(f"slimta{i}" for i in range(len(self.bound)))
        # Which worker this is, for code of the user's own (a bus, a per-worker metrics
        # directory for issue 13's aggregation, ...).
        env["SLIMTA_TX_WORKER"] = str(slot)
        env.update(self.worker_env)
        # Shared stdout/stderr, or pipes the parent reads (see slimta_tx.worker_log).
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        if self.log_to_stdout:
            child_fds.update({1: 1, 2: 2})
        for index, bound in enumerate(self.bound):
            child_fds[3 + index] = bound.fileno()
        self.reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, "-c", BOOTSTRAP, f"slimta-worker-{slot}"],
            env=env,
            childFDs=child_fds,
        )
        return process

    def _close_bound(self) -> None:
        bound, self.bound = self.bound, []
        for b in bound:
            b.port.stopListening()

    def _give_up(self, reason: str) -> None:
        """A crash loop: stop everything; twistd then exits with status 1 and the reason."""
        _exit_status.fail(reason)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)


class _ExitStatus:
    """twistd has no way to set its exit status; after it has cleaned up (pid file, logs),
    this turns a crash loop into exit status 1 with the reason on stderr."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def fail(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            atexit.register(self._exit)

    def _exit(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream
                stream.flush()
        os.write(2, f"slimta: stopped: {self.reason}\n".encode("utf-8", "replace"))
        os._exit(1)


_exit_status = _ExitStatus()


def make_service(config: Any, reactor: Any) -> WorkersService:
    """The parent service for ``config`` (parsed ``twistd slimta`` options)."""
    parent = getattr(config, "parent", None)
    # twistd -n with no --logfile/--syslog/--logger writes text to its stdout: so can workers.
    log_to_stdout = (
        parent is not None
        and bool(parent.get("nodaemon"))
        and parent.get("logfile") in (None, "", "-")
        and not parent.get("syslog")
        and not parent.get("logger")
    )
    service = WorkersService(
        config["workers-argv"],
        {option: config.get(option, []) for option in LISTENER_OPTIONS},
        config["workers"],
        reactor,
        limits=config["worker-restarts"],
        grace=config["policy"].shutdown_grace,
        log_to_stdout=log_to_stdout,
    )
    service.exit_on_listen_error = parent is not None and bool(parent.get("nodaemon"))
    if config.get("metrics"):
        from slimta_tx.metrics.workers import serve_for_workers

        serve_for_workers(service, config["metrics"], reactor)
    if parent is not None:
        # The parent's own lines and what it re-emits of its workers' honour --log-level and
        # --log-format as one process's do (workers sharing stdout apply them themselves).
        from slimta_tx.cli.logs import observer_factory
        from slimta_tx.events import level_named

        service.log_observer_factory = observer_factory(
            parent, level_named(config["log-level"]), config["log-format"], reactor
        )
    return service
