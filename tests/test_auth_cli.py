"""``twistd slimta`` AUTH options: parsing, one-line errors, and the edge they configure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_auth_helpers import CHEAP, Driver, b64
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from slimta_tx.auth import Auth
from slimta_tx.auth.passwd import set_password
from slimta_tx.service import EdgeService
from slimta_tx.tap import Options, makeService


def build(tmp_path: Path, *args: str) -> Any:
    config = Options()
    config.parseOptions(["--maildir", str(tmp_path / "md"), *args])
    service = makeService(config, reactor=MemoryReactorClock())
    assert isinstance(service, EdgeService)
    return config, service.edge


def test_no_auth_options_no_auth(tmp_path: Path) -> None:
    """By default AUTH is not enabled at all."""
    _, edge = build(tmp_path)
    assert "AUTH" not in edge.extra_commands
    assert getattr(edge, "auth", None) is None


def test_auth_options_configure_the_edge(tmp_path: Path) -> None:
    """--auth, --auth-passwd, --auth-mechanisms, the flags and limits reach the Auth."""
    passwd = tmp_path / "passwd"
    set_password(str(passwd), "alice", "pw", CHEAP)
    _, edge = build(
        tmp_path,
        "--auth",
        "memory:bob:pw2",
        "--auth-passwd",
        str(passwd),
        "--auth-mechanisms",
        "plain,login",
        "--allow-insecure-auth",
        "--require-auth",
        "--auth-max-failures",
        "5",
        "--auth-max-address-failures",
        "50",
        "--auth-failure-delay",
        "0.5",
    )
    auth = edge.auth
    assert isinstance(auth, Auth)
    assert auth.offered == ("PLAIN", "LOGIN")
    assert auth.allow_insecure and auth.require_auth
    assert auth.limits.max_failures_per_connection == 5
    assert auth.limits.max_failures_per_address == 50
    assert auth.limits.failure_delay == 0.5
    d = Driver(None, tls=False, edge=edge)
    assert "AUTH PLAIN LOGIN" in d.ehlo()
    assert d.one("MAIL FROM:<a@example.org>")[0] == "530"
    assert d.one(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'pw')}")[0] == "235"
    d2 = Driver(None, tls=False, edge=edge)
    d2.ehlo()
    assert d2.one(f"AUTH PLAIN {b64(chr(0) + 'bob' + chr(0) + 'pw2')}")[0] == "235"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--require-auth"], "--require-auth needs --auth or --auth-passwd"),
        (["--allow-insecure-auth"], "--allow-insecure-auth needs --auth or --auth-passwd"),
        (["--auth", "nosuch:x"], "--auth: unknown auth type in 'nosuch'"),
        (["--auth", "memory:a:b", "--auth-mechanisms", "PLAIN,NTLM"], "unknown SASL mechanism"),
        (["--auth-passwd", "/nonexistent/passwd"], "--auth-passwd: cannot read password file"),
        (["--auth", "file:/nonexistent/users"], "--auth file: cannot read /nonexistent/users"),
        (["--auth", "memory:a:b", "--auth-failure-delay", "-1"], "must be 0 or more"),
    ],
)
def test_bad_auth_options_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    """Each mistake is one UsageError saying what is wrong."""
    with pytest.raises(usage.UsageError, match=message.replace("(", r"\(")):
        build(tmp_path, *args)


def test_usage_error_never_shows_a_memory_password(tmp_path: Path) -> None:
    """A malformed memory: string is refused without repeating the passwords in it."""
    with pytest.raises(usage.UsageError) as info:
        build(tmp_path, "--auth", "memory:alice:hunter2:bob")
    assert "hunter2" not in str(info.value)
    assert "memory" in str(info.value)


def test_password_file_format_is_checked(tmp_path: Path) -> None:
    """A password file with a plaintext entry is refused at start-up, naming the line."""
    bad = tmp_path / "passwd"
    bad.write_text("alice:plaintext\n")
    with pytest.raises(usage.UsageError, match="line 1"):
        build(tmp_path, "--auth-passwd", str(bad))
