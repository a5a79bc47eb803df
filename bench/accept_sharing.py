"""One shared listening socket or SO_REUSEPORT for ``--workers``? Both measured, side by side.

Usage::

    .venv/bin/python bench/accept_sharing.py

1. **Restart loss.** Two listening sockets on one port, as two workers would hold them; 40
   clients connect while neither accepts (a burst, or two busy workers); then one worker
   goes away (a restart, a crash, a drain) and the other accepts what it can. With one
   shared socket the queue belongs to the socket, not the worker: nothing is lost. With
   SO_REUSEPORT each socket has its own queue, and the kernel resets the connections queued
   on the one that closed.
2. **Balance and throughput.** Two processes serve 50 clients (``bench/load.py``, discarding
   bus, 2 KiB messages) from a shared socket (``adoptStreamPort``, what ``--workers`` does),
   the same accepting at most one connection per wake-up (``shared-one``: Twisted's port
   otherwise takes every queued connection at once), or one SO_REUSEPORT socket each; how the
   50 connections split and the msgs/s.

Everything runs on 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS = 40

SERVER = r"""
import os, socket, sys
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
from slimta_tx.bus.simple import DiscardBus
from slimta_tx.factory import SmtpEdge
from slimta_tx.policy import Policy
mode, port = sys.argv[1], int(sys.argv[2])
edge = SmtpEdge(DiscardBus(), Policy(hostname="bench.test"), reactor=reactor)
if mode.startswith("shared"):
    sock = socket.socket(fileno=3)
else:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
port = edge.adopt(sock)
if mode == "shared-one":
    read = port.doRead
    def one_at_a_time():
        port.numberAccepts = 1
        return read()
    port.doRead = one_at_a_time
connections = []
original = edge.connection_made
def counted(proto):
    connections.append(1)
    original(proto)
edge.connection_made = counted
def report(*_):
    print(json.dumps({"pid": os.getpid(), "connections": len(connections),
                      "messages": edge.bus.count}), flush=True)
    reactor.callFromThread(reactor.stop)
import json, signal
signal.signal(signal.SIGTERM, report)
print("READY", flush=True)
reactor.run(installSignalHandlers=False)
"""


def listeners(mode: str) -> list[socket.socket]:
    if mode == "shared":
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        first.listen(4096)
        return [first, socket.socket(fileno=os.dup(first.fileno()))]
    socks = []
    port = 0
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(4096)
        port = sock.getsockname()[1]
        socks.append(sock)
    return socks


def restart_loss(mode: str) -> tuple[int, int]:
    """(served, reset) of CLIENTS queued connections after one of the two sockets closed."""
    first, second = listeners(mode)
    port = first.getsockname()[1]
    clients = []
    for _ in range(CLIENTS):
        client = socket.socket()
        client.settimeout(5)
        client.connect(("127.0.0.1", port))
        clients.append(client)
    first.close()  # one worker goes away
    second.setblocking(False)
    served = 0
    while True:
        try:
            conn, _ = second.accept()
        except BlockingIOError:
            break
        conn.sendall(b"220 hello\r\n")
        conn.close()
        served += 1
    reset = 0
    for client in clients:
        try:
            data = client.recv(64)
            if not data.startswith(b"220"):
                reset += 1
        except OSError:
            reset += 1
        client.close()
    second.close()
    return served, reset


def serve_load(mode: str, connections: int = 50, messages: int = 20000) -> dict[str, object]:
    port = 0
    shared: socket.socket | None = None
    if mode.startswith("shared"):
        shared = socket.socket()
        shared.bind(("127.0.0.1", 0))
        shared.listen(4096)
        port = shared.getsockname()[1]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    servers = []
    for _ in range(2):
        pass_fds: tuple[int, ...] = ()
        preexec = None
        if shared is not None:
            fd = shared.fileno()

            def preexec(fd: int = fd) -> None:
                os.dup2(fd, 3)

            pass_fds = (fd,)
        servers.append(
            subprocess.Popen(
                [sys.executable, "-c", SERVER, mode, str(port)],
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=pass_fds,
                preexec_fn=preexec,
            )
        )
    try:
        for server in servers:
            assert server.stdout is not None
            ready, _, _ = select.select([server.stdout], [], [], 30)
            if not ready or server.stdout.readline().strip() != "READY":
                raise RuntimeError("server did not start")
        load = subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "load.py"),
                f"--port={port}",
                f"--connections={connections}",
                f"--messages={messages}",
                "--time-limit=6",
                "--hard-limit=30",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        figures = json.loads(load.stdout.strip().splitlines()[-1])
        per_server = []
        for server in servers:
            server.send_signal(signal.SIGTERM)
            assert server.stdout is not None
            per_server.append(json.loads(server.stdout.readline()))
        return {
            "msgs_per_s": round(figures["msgs_per_s"]),
            "connections": [s["connections"] for s in per_server],
            "messages": [s["messages"] for s in per_server],
        }
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
            server.wait(10)
        if shared is not None:
            shared.close()


def main() -> int:
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    print(f"1. {CLIENTS} connections queued on two listening sockets, then one closes:")
    for mode in ("shared", "reuseport"):
        served, reset = restart_loss(mode)
        print(f"   {mode:<10} served {served:>3}   reset {reset:>3}")
    print("2. two processes, 50 connections, 2 KiB, discarding bus (3 rounds each):")
    for _ in range(3):  # the modes interleaved
        for mode in ("shared", "shared-one", "reuseport"):
            result = serve_load(mode)
            print(
                f"   {mode:<10} {result['msgs_per_s']:>6} msgs/s   connections per process "
                f"{result['connections']}   messages {result['messages']}"
            )
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
