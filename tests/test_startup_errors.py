"""First-day mistakes are one line and exit status 1, never a traceback (issue 14).

Run as a new user would: ``twistd -n slimta ...`` as a process, asserting the whole output.
The tests run as root, whom file modes do not stop: a file in the way stands for the
directory that cannot be created or used, ``/proc`` for a file system that refuses, and
``os.access`` is patched for the unwritable cases (which is what the check asks).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.python import usage

from slimta_tx.cli import startup
from slimta_tx.tap import Options
from tests.test_tap import run_twistd

SEE = " (see 'twistd slimta --help')"


def one_line(tmp_path: Path, *args: str) -> str:
    """Run twistd slimta with ``args``; it must exit 1 printing exactly one line."""
    (tmp_path / "afile").write_text("not a directory\n")
    md = ["--maildir", str(tmp_path / "md")] if "--maildir" not in args else []
    result = run_twistd(
        "-n",
        "--pidfile=",
        "slimta",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        *md,
        *args,
        cwd=tmp_path,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    lines = output.splitlines()
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--maildir", "afile/md"],
            "twistd slimta: --maildir afile/md: cannot create it: {tmp}/afile is a file, "
            "not a directory" + SEE,
        ),
        (
            ["--maildir", "afile"],
            "twistd slimta: --maildir afile: exists and is not a directory" + SEE,
        ),
        (
            ["--maildir", "tmp-in-the-way"],
            "twistd slimta: --maildir tmp-in-the-way: {tmp}/tmp-in-the-way/tmp is in the way "
            "(not a directory)" + SEE,
        ),
        (
            ["--also-maildir", "afile"],
            "twistd slimta: --also-maildir afile: exists and is not a directory" + SEE,
        ),
        (
            ["--maildir", "/proc/no-such-process/md"],
            "twistd slimta: --maildir /proc/no-such-process/md: cannot create it: "
            "No such file or directory (/proc/no-such-process)",
        ),
        (
            ["--listen", "bogus:1234"],
            "twistd slimta: --listen bogus:1234: unknown endpoint type: 'bogus' "
            "(tcp:PORT, tcp6:PORT, unix:PATH, ssl:..., systemd:...)" + SEE,
        ),
        (
            ["--listen", "tcp:notaport"],
            "twistd slimta: --listen tcp:notaport: 'notaport' is not a number" + SEE,
        ),
        (
            ["--listen", "tcp:99999"],
            "twistd slimta: --listen tcp:99999: port 99999 is not between 0 and 65535" + SEE,
        ),
        (
            ["--listen", "tcp:2525:bogus=1"],
            "twistd slimta: --listen tcp:2525:bogus=1: unknown parameter 'bogus'" + SEE,
        ),
        (
            ["--listen", "haproxy:tcp:x"],
            "twistd slimta: --listen haproxy:tcp:x: 'x' is not a number" + SEE,
        ),
        (
            ["--listen", "unix:{tmp}/no/dir/smtp.sock"],
            "twistd slimta: --listen unix:{tmp}/no/dir/smtp.sock: no such directory: "
            "{tmp}/no/dir" + SEE,
        ),
        (
            ["--listen", "systemd:domain=INET:index=0"],
            "twistd slimta: --listen systemd:domain=INET:index=0: no such inherited socket" + SEE,
        ),
        (
            ["--lmtp-listen", "bogus:24"],
            "twistd slimta: --lmtp-listen bogus:24: unknown endpoint type: 'bogus' "
            "(tcp:PORT, tcp6:PORT, unix:PATH, ssl:..., systemd:...)" + SEE,
        ),
        # Checked before (each with a test of its own), here as a new user meets them:
        (
            ["--tls-cert", "missing.pem"],
            "twistd slimta: TLS: cannot read certificate missing.pem: No such file or "
            "directory" + SEE,
        ),
        (
            ["--auth-passwd", "."],
            "twistd slimta: --auth-passwd: cannot read password file .: [Errno 21] Is a "
            "directory: '.'" + SEE,
        ),
        (
            ["--relay", "mx.example:smtp"],
            "twistd slimta: --relay: not a port number: 'smtp'" + SEE,
        ),
        (
            ["--amqp", "amqp://u:p@127.0.0.1:notaport/", "--amqp-queue", "q"],
            "twistd slimta: --amqp: Port could not be cast to integer value as 'notaport'" + SEE,
        ),
        (
            ["--workers", "2", "--listen", "tcp:notaport"],
            "twistd slimta: --listen tcp:notaport: 'notaport' is not a number" + SEE,
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_first_day_mistakes_are_one_line_and_exit_1(
    tmp_path: Path, args: list[str], line: str
) -> None:
    (tmp_path / "tmp-in-the-way").mkdir()
    (tmp_path / "tmp-in-the-way" / "tmp").write_text("")
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert one_line(tmp_path, *args) == line.format(tmp=tmp_path)


def test_tls_listen_is_checked_too(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("mx.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    with pytest.raises(usage.UsageError, match=r"^--tls-listen tcp:x: 'x' is not a number"):
        Options().parseOptions(
            ["--tls-cert", str(pem), "--tls-listen", "tcp:x", "--maildir", str(tmp_path)]
        )


def test_an_unwritable_maildir_refuses_to_start_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: it started, then answered 451 to every message. ``os.access`` is what the
    check asks (it also answers False on a read-only file system, even for root)."""
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "md" / sub).mkdir(parents=True)
    new = str(tmp_path / "md" / "new")
    monkeypatch.setattr(os, "access", lambda path, mode: path != new)
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--maildir", str(tmp_path / "md")])
    assert str(caught.value) == (
        f"--maildir {tmp_path}/md: {new} is not writable (uid {os.getuid()}); "
        "every message would get 451" + SEE
    )


def test_a_maildir_under_an_unwritable_directory_cannot_be_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
    with pytest.raises(usage.UsageError) as caught:
        startup.check_maildir("maildir", str(tmp_path / "a" / "md"))
    assert str(caught.value) == (
        f"--maildir {tmp_path}/a/md: cannot create it: {tmp_path} is not writable "
        f"(uid {os.getuid()})"
    )


def test_a_maildir_that_is_not_the_bus_is_not_checked(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    config = Options()
    config.parseOptions(["--maildir", str(tmp_path / "afile"), "--relay", "127.0.0.1:25"])
    assert config["relay"] == "127.0.0.1:25"
