"""One worker of ``twistd slimta --workers N`` (started by :mod:`slimta_tx.workers`, not by hand).

It reads one JSON line from stdin (its slot, the ``twistd slimta`` arguments, its listeners as
inherited descriptors, the reactor to install), builds the same service a single process
builds (``slimta_tx.tap.makeService``), and runs it until SIGTERM/SIGINT (drain, as twistd
does) or until stdin ends (the parent is gone: drain too, rather than serve on unsupervised).
Its log events go to stdout as JSON lines for the parent to re-emit.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="slimta_tx.worker")

#: Exit status when the options do not build a service (the parent counts it as a failure).
EXIT_CONFIG = 78  # EX_CONFIG of sysexits.h


class Drain:
    """Stops the reactor once (which drains the service), whatever asks first: SIGTERM, SIGINT
    or the parent's end. A second signal (systemd's control-group stop signals every process
    and the parent signals its workers too) is not an error."""

    def __init__(self, reactor: Any, slot: int) -> None:
        self.reactor = reactor
        self.slot = slot
        self.started = False

    def now(self, why: str) -> None:
        if self.started or not self.reactor.running:
            return
        self.started = True
        log.info("worker {worker}: {why}; draining", worker=self.slot, why=why)
        self.reactor.stop()

    def on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        self.reactor.callFromThread(self.now, name)

    def install(self) -> None:
        """Replace the reactor's SIGTERM/SIGINT handlers (call once it runs)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)


class ParentWatch:
    """Reads the worker's stdin; end of file (the parent exited or was killed) drains the
    service as SIGTERM would."""

    def __init__(self, drain: Drain, fd: int = 0) -> None:
        self.reactor = drain.reactor
        self.drain = drain
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "ParentWatch"

    def doRead(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            self.parent_gone()

    def connectionLost(self, reason: Any) -> None:
        # epoll reports a pipe whose writer closed as a hang-up, without a read.
        self.parent_gone()

    def parent_gone(self) -> None:
        self.drain.now("the parent process is gone")


def install_reactor(module: str | None) -> Any:
    if module and "twisted.internet.reactor" not in sys.modules:
        try:
            installer = getattr(importlib.import_module(module), "install", None)
        except ImportError:
            installer = None
        if callable(installer):
            installer()
    from twisted.internet import reactor

    return reactor


def main() -> int:
    # SIGHUP reloads only what the options made reloadable; a worker with nothing to reload
    # must not die of it (the parent forwards every SIGHUP).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    spec = json.loads(sys.stdin.buffer.readline() or b"{}")
    slot = int(spec.get("slot", 0))
    reactor = install_reactor(spec.get("reactor"))

    from twisted.logger import globalLogBeginner

    from slimta_tx.worker_log import Switch, line_observer, shared_stdout_observer

    text = None
    if spec.get("log") == "stdout":
        text = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
        # Until the options are read: twistd's text format, every level.
        observer = Switch(shared_stdout_observer(text, slot), slot)
    else:
        out = os.fdopen(1, "wb", buffering=65536, closefd=False)
        observer = Switch(line_observer(out), slot)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from twisted.python import usage

    from slimta_tx.tap import Options, makeService

    config = Options()
    try:
        config.parseOptions(spec["argv"])
    except (usage.UsageError, KeyError) as e:
        log.critical("worker {worker}: bad options: {error}", worker=slot, error=e)
        return EXIT_CONFIG
    config["workers"] = 1
    observer.honour(config["log-level"], config["log-format"], reactor, text)
    for option, descriptions in spec.get("listeners", {}).items():
        config[option] = list(descriptions)
    try:
        service: Any = makeService(config, reactor)
        service.privilegedStartService()
        service.startService()
    except BaseException:
        log.failure("worker {worker}: the service did not start", worker=slot)
        return EXIT_CONFIG
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    drain = Drain(reactor, slot)
    reactor.addReader(ParentWatch(drain))

    def running() -> None:
        drain.install()
        log.info("worker {worker} ready (pid {pid})", worker=slot, pid=os.getpid())

    reactor.callWhenRunning(running)
    reactor.run()
    # Drained. A second SIGTERM (systemd's KillMode=control-group signals every process, and
    # the parent signals its workers) must not turn a clean exit into "killed by signal".
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
