"""Real next hops for the relay bus tests: a private Postfix (SMTP) and Dovecot (LMTP).

Each runs from its own configuration in a fresh temporary directory on a free 127.0.0.1 port,
with its own queue, data and mail directories; nothing touches the system's instance (none is
needed or started). Both deliver into Maildirs that the tests read back.

- Postfix: virtual mailboxes ``alice@example.test`` and ``bob@example.test`` (others: 550 5.1.1
  "User unknown"), ``busy@example.test`` answers 450 4.2.1; STARTTLS with a certificate the
  test passes in; SMTPUTF8 on; its own log in ``maillog``.
- Dovecot: LMTP users ``alice`` and ``bob`` (others: 550 5.1.1), on a TCP port and a unix
  socket.

Both need root (Postfix's master and Dovecot's drop privileges to their own users) and the
Debian packages ``postfix`` and ``dovecot-lmtpd`` (``.ci/services`` installs them). Missing
either fails the test under ``CI=true`` and skips it elsewhere, saying how to get them.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 30.0
HOW = "run .ci/services (as root) to install postfix and dovecot-lmtpd"


def require(binary: str) -> str:
    """The path of ``binary``, else fail (CI) or skip with a how-to."""
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    problem = None
    if path is None:
        problem = f"{binary} is not installed; {HOW}"
    elif os.geteuid() != 0:
        problem = f"a private {binary} instance needs root; {HOW} and run the tests as root"
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_banner(port: int, what: str, log: Path | None = None) -> None:
    """Poll until a connection to ``port`` gets a 220 (the process is ready)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log and log.exists() else "(no log)"
            raise AssertionError(f"{what} did not start on port {port}:\n{text[-3000:]}")
        time.sleep(0.05)


def _private_dir(prefix: str) -> Path:
    # Postfix and Dovecot switch to their own users: the directory must be traversable.
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


def maildir_messages(maildir: Path) -> list[bytes]:
    new = maildir / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
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
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
tlsmgr unix - - n 1000? 1 tlsmgr
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
myhostname = nexthop.test
mydomain = nexthop.test
myorigin = nexthop.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
  check_recipient_access inline:{{ {{busy@example.test=450 4.2.1 Mailbox busy, try later}} }}
virtual_mailbox_domains = example.test
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = inline:{{ {{alice@example.test=alice/}}, {{bob@example.test=bob/}} }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
smtputf8_enable = yes
biff = no
smtpd_tls_security_level = {tls_level}
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_received_header = yes
"""


class Postfix:
    """A private Postfix; see the module docstring. Use :func:`running_postfix`."""

    def __init__(self, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> None:
        self.binary = require("postfix")
        self.root = _private_dir("slimta-postfix-")
        self.port = free_port()
        self.conf = self.root / "conf"
        self.conf.mkdir()
        owner = pwd.getpwnam("postfix")
        (self.root / "queue").mkdir()  # root-owned; postfix creates its subdirectories
        for sub in ("data", "mail"):
            (self.root / sub).mkdir()
            os.chown(self.root / sub, owner.pw_uid, owner.pw_gid)
        cert = key = ""
        if cert_pem and key_pem:
            cert, key = str(self.root / "cert.pem"), str(self.root / "key.pem")
            Path(cert).write_bytes(cert_pem)
            Path(key).write_bytes(key_pem)
        (self.conf / "main.cf").write_text(
            MAIN_CF.format(
                root=self.root,
                uid=owner.pw_uid,
                gid=owner.pw_gid,
                cert=cert,
                key=key,
                tls_level="may" if cert else "none",
            )
        )
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [self.binary, "-c", str(self.conf), *args],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=STARTUP_TIMEOUT,
            check=False,
        )

    def start(self) -> None:
        done = self._postfix("start")
        if done.returncode != 0:
            raise AssertionError(
                f"postfix start failed ({done.returncode}): {done.stderr.decode()}\n{self.log}"
            )
        wait_for_banner(self.port, "postfix", self.root / "maillog")

    def stop(self) -> None:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        self._postfix("stop")
        if pid is not None:
            _wait_gone(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    def delivered(self, user: str) -> list[bytes]:
        return maildir_messages(self.root / "mail" / user)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@contextmanager
def running_postfix(
    cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> Iterator[Postfix]:
    server = Postfix(cert_pem, key_pem)
    try:
        server.start()
        yield server
    finally:
        server.stop()  # also after a failed start: no process or directory left behind


DOVECOT_CONF = """\
protocols = lmtp
base_dir = {root}/run
state_dir = {root}/state
instance_name = slimta-test-{port}
log_path = {root}/dovecot.log
ssl = no
listen = 127.0.0.1
mail_location = maildir:~/Maildir
auth_username_format = %Ln
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener {root}/lmtp.sock {{
    mode = 0666
  }}
}}
"""


class Dovecot:
    """A private Dovecot speaking LMTP only; see the module docstring."""

    def __init__(self) -> None:
        self.binary = require("dovecot")
        self.root = _private_dir("slimta-dovecot-")
        self.port = free_port()
        owner = pwd.getpwnam("postfix")  # any unprivileged user owns the test mailboxes
        (self.root / "mail").mkdir()
        os.chown(self.root / "mail", owner.pw_uid, owner.pw_gid)
        (self.root / "users").write_text(
            "".join(
                f"{user}:{{PLAIN}}x:{owner.pw_uid}:{owner.pw_gid}::{self.root}/mail/{user}\n"
                for user in ("alice", "bob")
            )
        )
        self.conf = self.root / "dovecot.conf"
        self.conf.write_text(DOVECOT_CONF.format(root=self.root, port=self.port))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> str:
        return str(self.root / "lmtp.sock")

    @property
    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_banner(self.port, "dovecot", self.root / "dovecot.log")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(STARTUP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def delivered(self, user: str) -> list[bytes]:
        return maildir_messages(self.root / "mail" / user / "Maildir")


@contextmanager
def running_dovecot() -> Iterator[Dovecot]:
    server = Dovecot()
    try:
        server.start()
        yield server
    finally:
        server.stop()  # also after a failed start: no process or directory left behind
