"""The servers under test, one per process: ``python bench/servers.py KIND [options]``.

KIND is one of :data:`KINDS`. The server binds 127.0.0.1 on a free port, prints ``READY
<port>`` on stdout and runs until SIGTERM or SIGINT. Only warnings and errors are logged (to
stderr), the same for every server. ``--profile FILE`` runs the server under cProfile and
writes the stats to FILE on exit. ``postfix`` (bench/postfix_server.py) is a private Postfix,
a tree of processes: it prints ``READY <port> <pid of Postfix's master>``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

KINDS = ("slimta-discard", "slimta-maildir", "twisted", "aiosmtpd", "slimta-haproxy", "postfix")
# The same message size limit for every server that has one (the 100 MiB scenario fits).
MAX_MESSAGE_SIZE = 256 * 1024 * 1024


def ready(port: int, *helpers: int) -> None:
    """``READY <port> [helper pids]``: run.py adds the helpers' CPU (HAProxy) to the row."""
    print(" ".join(["READY", str(port), *map(str, helpers)]), flush=True)


def twisted_runner(reactor: Any) -> Callable[[], None]:
    """``reactor.run`` with SIGTERM and SIGINT stopping the reactor (so profiles get written)."""

    def stop(signum: int, frame: object) -> None:
        reactor.callFromThread(reactor.stop)

    def run() -> None:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        reactor.run(installSignalHandlers=False)

    return run


def quiet_twisted_logging() -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def serve_slimta_haproxy() -> Callable[[], None]:
    """slimta_tx discard on a PROXY listener, HAProxy (send-proxy-v2) in front: the load goes
    through HAProxy, as behind a load balancer."""
    import tempfile

    import haproxy_front
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from slimta_tx.bus.simple import DiscardBus
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.policy import Policy

    quiet_twisted_logging()
    edge = SmtpEdge(DiscardBus(), Policy(max_message_size=MAX_MESSAGE_SIZE), reactor=reactor)
    scratch = tempfile.mkdtemp(prefix="bench-haproxy-")
    front: list[Any] = []

    def started(port: Any) -> None:
        proc, front_port = haproxy_front.start(port.getHost().port, scratch)
        front.append(proc)
        ready(front_port, proc.pid)

    def failed(failure: Any) -> None:
        print(f"FAILED {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    d = edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), proxy_protocol=True)
    d.addCallbacks(started, failed)
    run = twisted_runner(reactor)

    def run_then_stop_haproxy() -> None:
        try:
            run()
        finally:
            for proc in front:
                proc.terminate()
                proc.wait(10)
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)

    return run_then_stop_haproxy


def serve_slimta(bus_kind: str, maildir: str | None) -> Callable[[], None]:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from slimta_tx.bus.maildir import MaildirBus
    from slimta_tx.bus.simple import DiscardBus
    from slimta_tx.factory import SmtpEdge
    from slimta_tx.interfaces import IBus
    from slimta_tx.policy import Policy

    quiet_twisted_logging()
    bus: IBus
    if bus_kind == "maildir":
        if not maildir:
            raise SystemExit("--maildir is required for slimta-maildir")
        bus = MaildirBus(maildir, reactor=reactor, fsync=True)
    else:
        bus = DiscardBus()
    edge = SmtpEdge(bus, Policy(max_message_size=MAX_MESSAGE_SIZE), reactor=reactor)
    d = edge.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    d.addCallback(lambda port: ready(port.getHost().port))
    return twisted_runner(reactor)


def serve_twisted() -> Callable[[], None]:
    from twisted.internet import reactor
    from twisted_peer import DiscardESMTPFactory

    quiet_twisted_logging()
    port = reactor.listenTCP(0, DiscardESMTPFactory(), interface="127.0.0.1")
    ready(port.getHost().port)
    return twisted_runner(reactor)


class DiscardHandler:
    """aiosmtpd handler: accept the message, keep nothing."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK discarded"


def serve_aiosmtpd() -> Callable[[], None]:
    from aiosmtpd.smtp import SMTP

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = DiscardHandler()

    def factory() -> SMTP:
        return SMTP(handler, data_size_limit=MAX_MESSAGE_SIZE, hostname="localhost")

    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    ready(server.sockets[0].getsockname()[1])
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)

    def run() -> None:
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.close()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--maildir", help="Maildir directory for slimta-maildir")
    parser.add_argument("--dir", help="postfix: its queue goes in a new directory under this")
    parser.add_argument("--profile", help="write cProfile stats here on exit")
    args = parser.parse_args()
    if args.kind == "postfix":  # a process tree of its own: bench/postfix_server.py
        from postfix_server import serve

        serve(args.dir or ".", MAX_MESSAGE_SIZE)
        return
    if args.kind == "slimta-discard":
        run = serve_slimta("discard", None)
    elif args.kind == "slimta-maildir":
        run = serve_slimta("maildir", args.maildir)
    elif args.kind == "slimta-haproxy":
        run = serve_slimta_haproxy()
    elif args.kind == "twisted":
        run = serve_twisted()
    else:
        run = serve_aiosmtpd()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run()
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        run()


if __name__ == "__main__":
    main()
