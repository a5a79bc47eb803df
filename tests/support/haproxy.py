"""A private HAProxy in front of SMTP backends, for end-to-end tests (Debian ``haproxy``).

Each :class:`HAProxy` runs from its own generated configuration in a fresh temporary directory,
in the foreground (``-db``), with TCP frontends on free loopback ports, one backend of the given
servers, PROXY headers (``send-proxy`` or ``send-proxy-v2``) and ``option smtpchk`` health checks
every ``check_interval`` seconds. An admin socket in that directory answers ``show stat``, which
:meth:`HAProxy.status` and :meth:`HAProxy.wait_status` read (bounded waits). Its log goes to
``haproxy.log`` there. :func:`running_haproxy` always stops it (SIGTERM, then SIGKILL).

A configuration of your own (the one a docs page prints, say) runs the same way: pass
``config``, a function of the admin socket's path and the frontends' ``(host, port)`` that
returns the text (it must have that ``stats socket`` and bind those frontends), and ``backend``,
the name of the backend whose servers :meth:`HAProxy.status` reports.

Missing ``haproxy`` fails the test under ``CI=true`` and skips it elsewhere, saying how to get
it (``.ci/services`` installs it). Root is not needed.

Reuse::

    with running_haproxy([Server("a", port_a), Server("b", port_b)], tmp_path) as proxy:
        smtplib.SMTP("127.0.0.1", proxy.port)
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 20.0
HOW = "run .ci/services (as root) to install haproxy"


def require_haproxy() -> str:
    """The path of ``haproxy``, else fail (CI) or skip with a how-to."""
    path = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )
    if path is None:
        problem = f"haproxy is not installed; {HOW}"
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    """One backend server: an SMTP listener expecting PROXY headers (``haproxy:...``)."""

    name: str
    port: int
    host: str = "127.0.0.1"


CONFIG = """\
global
    maxconn 1000
    stats socket {admin} mode 600 level admin
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    retries 3
    option redispatch

{frontends}
backend smtp
    balance {balance}
    option smtpchk EHLO haproxy.test
{servers}
"""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def haproxy_config(
    admin: Path,
    frontends: Sequence[tuple[str, int]],
    servers: Sequence[Server],
    send_proxy: str = "v2",
    check_interval: float = 0.2,
    balance: str = "roundrobin",
) -> str:
    """The configuration :class:`HAProxy` runs (``send_proxy``: "v1", "v2" or "none")."""
    option = {"v1": " send-proxy", "v2": " send-proxy-v2", "none": ""}[send_proxy]
    interval = f"{int(check_interval * 1000)}ms"
    bind = "".join(
        f"frontend in{i}\n    bind {_address(host, port)}\n    default_backend smtp\n\n"
        for i, (host, port) in enumerate(frontends)
    )
    lines = "".join(
        f"    server {s.name} {_address(s.host, s.port)}{option} check inter {interval} "
        f"fastinter {interval} downinter {interval} fall 2 rise 1\n"
        for s in servers
    )
    return CONFIG.format(admin=admin, frontends=bind, servers=lines, balance=balance)


#: ``(admin socket path, frontends) -> configuration text``
ConfigMaker = Callable[[Path, Sequence[tuple[str, int]]], str]


class HAProxy:
    """One running HAProxy; use :func:`running_haproxy` to get one."""

    def __init__(
        self,
        servers: Sequence[Server],
        directory: Path,
        send_proxy: str = "v2",
        check_interval: float = 0.2,
        frontend_hosts: Sequence[str] = ("127.0.0.1",),
        balance: str = "roundrobin",
        config: ConfigMaker | None = None,
        backend: str = "smtp",
    ) -> None:
        binary = require_haproxy()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.admin = directory / "admin.sock"
        self.log_path = directory / "haproxy.log"
        self.frontends = [(host, free_port(host)) for host in frontend_hosts]
        self.servers = list(servers)
        self.backend = backend
        self.config_path = directory / "haproxy.cfg"
        if config is None:
            text = haproxy_config(
                self.admin, self.frontends, self.servers, send_proxy, check_interval, balance
            )
        else:
            text = config(self.admin, self.frontends)
        self.config_path.write_text(text)
        check = subprocess.run(
            [binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise AssertionError(f"haproxy refused its configuration:\n{check.stderr}")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def port(self) -> int:
        """The first frontend's port."""
        return self.frontends[0][1]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self, line: str, timeout: float = 5) -> str:
        """One admin socket command (``show stat``, ``disable server smtp/a``, ...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.admin))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks).decode()
                chunks.append(chunk)

    def stat(self, column: str) -> dict[str, str]:
        """One ``show stat`` column for each of the backend's servers (``status``, ``stot``:
        sessions so far, ``scur``: current sessions, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row[column]
            for row in rows
            if row["pxname"] == self.backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def status(self) -> dict[str, str]:
        """``{server name: "UP" | "DOWN" | ...}`` for the backend's servers."""
        return {name: value.split()[0] for name, value in self.stat("status").items()}

    def wait_status(self, wanted: dict[str, str], timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait (bounded) until each named server has the wanted status."""
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited:\n{self.log_text()[-3000:]}")
            try:
                status = self.status()
            except OSError:
                status = {}
            if all(status.get(name) == state for name, state in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"haproxy servers {status}, wanted {wanted}:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)  # poll interval of the bounded wait

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Every server UP (the health checks pass) and every frontend accepting."""
        self.wait_status({s.name: "UP" for s in self.servers}, timeout)
        for host, port in self.frontends:
            socket.create_connection((host, port), timeout=timeout).close()

    def stop(self) -> None:
        """Always safe: SIGTERM, then SIGKILL if it lingers; then reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@contextmanager
def running_haproxy(
    servers: Sequence[Server],
    directory: Path,
    send_proxy: str = "v2",
    check_interval: float = 0.2,
    frontend_hosts: Sequence[str] = ("127.0.0.1",),
    balance: str = "roundrobin",
    wait: bool = True,
    config: ConfigMaker | None = None,
    backend: str = "smtp",
) -> Iterator[HAProxy]:
    """Start HAProxy, wait until its servers are UP (``wait``), and always stop it."""
    proxy = HAProxy(
        servers, directory, send_proxy, check_interval, frontend_hosts, balance, config, backend
    )
    try:
        if wait:
            proxy.wait_ready()
        yield proxy
    finally:
        proxy.stop()
