"""Run ``twistd -n slimta`` in a subprocess on a free 127.0.0.1 port and talk to it.

The listener is ``tcp:0``: the kernel picks the port, which twistd logs ("SmtpEdge starting on
N"); a thread drains the output (so a chatty server never blocks on a full pipe) and the port
is taken from it. Readiness means: a connection gets the 220 banner.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
STARTUP_TIMEOUT = 20.0
_PORT_LINE = re.compile(r"SmtpEdge starting on (\d+)")


class Twistd:
    """One ``twistd -n slimta`` process; use :func:`running_twistd` to get one."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: str | None = None,
        new_session: bool = False,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """``new_session``: in a process group of its own (its pid is the group's id), so that
        it and its workers can be signalled together with ``os.killpg``. ``preexec_fn``: run in
        the child before twistd (e.g. resource limits for the child only)."""
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=new_session,
            preexec_fn=preexec_fn,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.port = 0

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = STARTUP_TIMEOUT) -> str:
        """The first output line matching ``pattern`` (waits for it; fails on exit/timeout)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if pattern.search(line):
                        return line
                    if line == "<EOF>":
                        raise AssertionError(
                            f"twistd exited before {pattern.pattern!r}:\n{self.output_unlocked()}"
                        )
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {pattern.pattern!r} from twistd:\n{self.output_unlocked()}"
                    )
                self._changed.wait(left)

    def output_unlocked(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Learn the port from the log, then connect until a 220 banner arrives."""
        match = _PORT_LINE.search(self.wait_for_line(_PORT_LINE, timeout))
        assert match is not None
        self.port = int(match.group(1))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    banner = sock.recv(1024)
                    if banner.startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"twistd never greeted on {self.port}:\n{self.output}")
            time.sleep(0.02)  # retry interval of the bounded connect loop

    def rss(self) -> tuple[int, int]:
        """(current, peak) resident memory of the process in bytes, from /proc."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def open_fds(self) -> list[str]:
        """Where the process's open file descriptors point (``readlink /proc/pid/fd/*``)."""
        targets = []
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for entry in fd_dir.iterdir():
            try:
                targets.append(os.readlink(entry))
            except OSError:
                continue
        return targets

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """Always safe: SIGKILL if still running, then reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        finally:
            self._reader.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def twistd_argv(
    maildir: str | os.PathLike[str], *extra: str, prefix: Sequence[str] = ()
) -> list[str]:
    """``twistd -n --pidfile= slimta --listen tcp:0:interface=127.0.0.1 --maildir M ...``.

    ``prefix`` replaces the ``twistd`` executable (e.g. a launcher script that runs twistd).
    """
    return [
        *(prefix or [TWISTD]),
        "-n",
        "--pidfile=",
        "slimta",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--maildir",
        str(maildir),
        "--hostname",
        "mx.test",
        *extra,
    ]


@contextmanager
def running_twistd(argv: Sequence[str], cwd: str | None = None) -> Iterator[Twistd]:
    """Start twistd, wait for its banner, and always kill it afterwards."""
    process = Twistd(argv, cwd=cwd)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def free_port() -> int:
    """A port nothing listens on right now (for tests that need to pick one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
