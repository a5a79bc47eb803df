"""A private Postfix for the benchmark: ``python bench/servers.py postfix --dir DIR``.

Postfix as a mail admin would run it for a durable accept: its defaults, a queue of its own
in a fresh directory under DIR (the file system the Maildir runs use), listening on a free
127.0.0.1 port. Its ``250`` after the final dot comes once ``cleanup`` has written and
fsynced the queue file; delivery is ``discard:`` (the queue manager deletes each file), so
only the accept is measured, as for the slimta_tx servers. Settings beyond the defaults:

- the paths, the port, ``inet_interfaces`` and ``mynetworks`` (127.0.0.0/8 may relay);
- ``mydestination`` empty and ``default_transport``/``relay_transport`` = ``discard``;
- ``message_size_limit`` = the bench's limit for every server (256 MiB);
- logging is Postfix's default (syslog; the bench machine may have no syslog daemon, then
  the lines go nowhere, as the slimta_tx servers log warnings only);
- services run unchrooted (the ``n`` in master.cf), as tests/support/postfix.py does: a
  chroot needs copies of system files inside the queue directory.

Prints ``READY <port> <master pid>`` and runs until SIGTERM or SIGINT, then stops Postfix and
removes the directory. Needs root and the ``postfix`` package (``.ci/services``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

POSTFIX = "/usr/sbin/postfix"
TIMEOUT = 30.0

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
myhostname = postfix.bench
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
default_transport = discard
relay_transport = discard
message_size_limit = {max_size}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BenchPostfix:
    def __init__(self, parent: str, max_size: int) -> None:
        if not os.access(POSTFIX, os.X_OK):
            raise SystemExit(f"{POSTFIX} not found: run .ci/services to install postfix")
        if os.geteuid() != 0:
            raise SystemExit("a private Postfix needs root (its master drops privileges)")
        self.root = tempfile.mkdtemp(prefix="postfix-", dir=parent)
        os.chmod(self.root, 0o755)  # Postfix's daemons run as the postfix user
        self.port = free_port()
        owner = pwd.getpwnam("postfix")
        os.mkdir(os.path.join(self.root, "queue"))  # root-owned; postfix makes its subdirs
        os.mkdir(os.path.join(self.root, "data"))
        os.chown(os.path.join(self.root, "data"), owner.pw_uid, owner.pw_gid)
        self.conf = os.path.join(self.root, "conf")
        os.mkdir(self.conf)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(root=self.root, max_size=max_size))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=self.port))
        self.master_pid = 0

    def _postfix(self, command: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [POSTFIX, "-c", self.conf, command],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=TIMEOUT,
            check=False,
        )

    def start(self) -> None:
        done = self._postfix("start")
        if done.returncode != 0:
            raise SystemExit(f"postfix start failed: {done.stderr.decode(errors='replace')}")
        deadline = time.monotonic() + TIMEOUT
        pid_file = os.path.join(self.root, "queue", "pid", "master.pid")
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"postfix did not answer on port {self.port}")
            time.sleep(0.05)  # bounded start-up poll
        with open(pid_file) as f:
            self.master_pid = int(f.read().split()[0])

    def stop(self) -> None:
        if self.master_pid:
            self._postfix("stop")
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                try:
                    os.kill(self.master_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(self.master_pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def serve(parent: str, max_size: int) -> None:
    server = BenchPostfix(parent, max_size)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    try:
        server.start()
        # Blocked only now: Postfix's processes must not inherit a blocked SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        print(f"READY {server.port} {server.master_pid}", flush=True)
        if not stopping:
            signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        server.stop()
