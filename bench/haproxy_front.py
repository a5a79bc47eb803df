"""HAProxy in front of one benchmark server, for the cost of the load-balancer hop.

``start(backend_port, directory)`` runs the Debian ``haproxy`` in the foreground on a free
127.0.0.1 port, TCP mode, one backend server with ``send-proxy-v2`` and ``option smtpchk``
health checks every 2 s (as docs/proxy.md configures it), one thread (``nbthread 1``: on a small
machine a second thread only contends with the servers for a core). It returns the process and
the port once the frontend accepts connections.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

CONFIG = """\
global
    maxconn 4000
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend smtp
    bind 127.0.0.1:{port}
    default_backend mx

backend mx
    option smtpchk EHLO haproxy.bench
    server slimta 127.0.0.1:{backend} send-proxy-v2 check inter 2s
"""


def binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )


def _die_with_parent() -> None:
    """In the child: SIGTERM when the server that started it dies, however it dies."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start(
    backend_port: int, directory: str, timeout: float = 20
) -> tuple[subprocess.Popen[bytes], int]:
    path = binary()
    if path is None:
        raise RuntimeError("haproxy is not installed (.ci/services installs it)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = os.path.join(directory, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(CONFIG.format(port=port, backend=backend_port))
    log = open(os.path.join(directory, "haproxy.log"), "wb")
    proc = subprocess.Popen(
        [path, "-db", "-f", config],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"haproxy did not start on {port}; see {directory}") from None
            time.sleep(0.02)  # retry interval of the bounded start-up wait
