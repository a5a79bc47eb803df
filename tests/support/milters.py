"""Real milters for the tests, each a private instance on a free 127.0.0.1 port.

- OpenDKIM (``opendkim``, ``opendkim-genkey`` from opendkim-tools): signs mail from
  ``sender.test`` with a key made for the test (selector ``sel``); :func:`dkim_verify` checks a
  stored message with ``opendkim -t`` in verify mode, the public key read from a file
  (``TestPublicKeys``): no DNS.
- OpenDMARC: adds its ``Authentication-Results:`` (``dmarc=none``: no DNS here).
- Rspamd: only its proxy worker, in milter mode, scanning itself (``self_scan``), with a
  configuration generated here: no network (DNS points at a closed loopback port), a two-line
  TLD list (the stock one takes a minute to compile), its own run/db/log directories, and the
  ``milter_headers`` module adding ``X-Spamd-Result``, ``X-Rspamd-Server`` and
  ``X-Rspamd-Queue-Id`` (local clients included).

Every process runs in its own process group and is stopped (SIGTERM, then SIGKILL) by the
test that started it; waits are bounded. A missing binary fails the test under ``CI=true``
and skips it elsewhere, saying how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 60.0
HOW = "run .ci/services (as root) to install rspamd, opendkim, opendkim-tools and opendmarc"


def require(binary: str) -> str:
    path = shutil.which(binary) or next(
        (f"{d}/{binary}" for d in ("/usr/sbin", "/usr/bin") if os.path.exists(f"{d}/{binary}")),
        None,
    )
    if path is None:
        problem = f"{binary} is not installed; {HOW}"
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    port: int
    proc: subprocess.Popen[bytes]
    root: Path
    log: Path

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"


def _wait_listening(running: Running, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", running.port), timeout=2):
                return
        except OSError:
            pass
        if running.proc.poll() is not None or time.monotonic() > deadline:
            text = running.log.read_text(errors="replace") if running.log.exists() else ""
            raise AssertionError(f"{what} did not start on port {running.port}:\n{text[-3000:]}")
        time.sleep(0.05)  # retry interval of the bounded wait


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def _process(argv: list[str], root: Path, log: Path, port: int, what: str) -> Iterator[Running]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    running = Running(port, proc, root, log)
    try:
        _wait_listening(running, what)
        yield running
    finally:
        _stop(proc)


# -- OpenDKIM ----------------------------------------------------------------------------------

SIGN_CONF = """\
Syslog no
Mode s
KeyTable file:{root}/keytable
SigningTable file:{root}/signingtable
Socket inet:{port}@127.0.0.1
PidFile {root}/opendkim.pid
Background no
Canonicalization relaxed/relaxed
InternalHosts 127.0.0.1
RequireSafeKeys no
"""

VERIFY_CONF = """\
Syslog no
Mode v
TestPublicKeys {root}/public-keys
Background no
"""


@contextmanager
def opendkim(root: Path, domain: str = "sender.test", selector: str = "sel") -> Iterator[Running]:
    """OpenDKIM signing mail from ``domain`` (key in ``root``), listening on a free port."""
    binary = require("opendkim")
    genkey = require("opendkim-genkey")
    subprocess.run([genkey, "-D", str(root), "-d", domain, "-s", selector], check=True, timeout=60)
    txt = (root / f"{selector}.txt").read_text()
    public = "".join(re.findall(r'"([^"]*)"', txt))
    (root / "public-keys").write_text(f"{selector}._domainkey.{domain} {public}\n")
    (root / "keytable").write_text(
        f"{selector}._domainkey.{domain} {domain}:{selector}:{root}/{selector}.private\n"
    )
    (root / "signingtable").write_text(f"{domain} {selector}._domainkey.{domain}\n")
    port = free_port()
    (root / "sign.conf").write_text(SIGN_CONF.format(root=root, port=port))
    (root / "verify.conf").write_text(VERIFY_CONF.format(root=root))
    argv = [binary, "-f", "-x", str(root / "sign.conf")]
    with _process(argv, root, root / "opendkim.log", port, "opendkim") as running:
        yield running


def dkim_verify(root: Path, message: bytes) -> str:
    """``opendkim -t`` on ``message`` with the test key: its one-line verdict."""
    path = root / "check.eml"
    path.write_bytes(message)
    done = subprocess.run(
        [require("opendkim"), "-x", str(root / "verify.conf"), "-t", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return (done.stdout + done.stderr).decode(errors="replace").strip()


# -- OpenDMARC ----------------------------------------------------------------------------------

DMARC_CONF = """\
Socket inet:{port}@127.0.0.1
AuthservID {authserv_id}
TrustedAuthservIDs {authserv_id}
PidFile {root}/opendmarc.pid
Syslog false
Background false
SPFIgnoreResults true
SPFSelfValidate false
IgnoreHosts {root}/ignore-hosts
"""


@contextmanager
def opendmarc(root: Path, authserv_id: str = "mx.test") -> Iterator[Running]:
    """OpenDMARC adding its Authentication-Results (``IgnoreHosts`` empty, so mail from
    127.0.0.1 is checked too). Its policy lookups fail without DNS (``.test`` has none either):
    the verdict is ``dmarc=none``."""
    binary = require("opendmarc")
    (root / "ignore-hosts").write_text("")
    port = free_port()
    conf = root / "opendmarc.conf"
    conf.write_text(DMARC_CONF.format(root=root, port=port, authserv_id=authserv_id))
    argv = [binary, "-f", "-c", str(conf)]
    with _process(argv, root, root / "opendmarc.log", port, "opendmarc") as running:
        yield running


# -- Rspamd -----------------------------------------------------------------------------------

RSPAMD_CONF = """\
options {{
  pidfile = "{root}/run/rspamd.pid";
  dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.1s; retransmits = 0; }}
  filters = "";
  hs_cache_dir = "{root}/db";
  url_tld = "{root}/tld.dat";
}}
logging {{ type = "file"; filename = "{root}/log/rspamd.log"; level = "info"; }}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{port}";
  milter = yes;
  timeout = 60s;
  count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
modules {{ path = "${{PLUGINSDIR}}"; }}
milter_headers {{
  use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id"];
  skip_local = false;
  skip_authenticated = false;
}}
"""


@contextmanager
def rspamd(root: Path) -> Iterator[Running]:
    """Rspamd's proxy worker as a milter on a free port (see the module docstring)."""
    binary = require("rspamd")
    for sub in ("run", "db", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "tld.dat").write_text("com\nnet\norg\ntest\n")
    port = free_port()
    conf = root / "rspamd.conf"
    conf.write_text(RSPAMD_CONF.format(root=root, port=port, dns_port=free_port()))
    argv = [binary, "-f", "-i", "-c", str(conf)]
    for var in ("DBDIR=db", "RUNDIR=run", "LOGDIR=log"):
        name, sub = var.split("=")
        argv += ["--var", f"{name}={root / sub}"]
    with _process(argv, root, root / "rspamd.out", port, "rspamd") as running:
        yield running


GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
