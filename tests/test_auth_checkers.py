"""Credential checkers: the Argon2id password file and its command, strcred strings, the
secret_func style, and chaining."""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_auth_helpers import CHEAP
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin

from slimta_tx.auth import Auth, PasswordFileChecker, SecretChecker, from_strcred
from slimta_tx.auth.checkers import PasswordFileError, read_password_file
from slimta_tx.auth.mechanisms import CramMD5Credentials, PasswordCredentials
from slimta_tx.auth.passwd import delete_user, main, set_password


def login(auth: Auth, user: str, password: str) -> Any:
    """The identity, or the failure's exception type."""
    results: list[Any] = []
    d = auth.login(PasswordCredentials(user, password))
    d.addCallbacks(results.append, lambda f: results.append(f.type))
    assert results, "checker did not answer synchronously"
    return results[0]


def test_password_file_accepts_right_password_only(tmp_path: Path) -> None:
    """Entries made by set_password verify; wrong passwords and unknown users fail."""
    path = str(tmp_path / "passwd")
    assert set_password(path, "alice", "correct horse", CHEAP)
    assert set_password(path, "bob@example.org", "pw2", CHEAP)
    auth = Auth([PasswordFileChecker(path, hasher=CHEAP)])
    assert login(auth, "alice", "correct horse") == "alice"
    assert login(auth, "bob@example.org", "pw2") == "bob@example.org"
    assert login(auth, "alice", "correct horsE") is UnauthorizedLogin
    assert login(auth, "nobody", "correct horse") is UnauthorizedLogin


def test_password_file_is_salted_argon2id_and_private(tmp_path: Path) -> None:
    """Two users with the same password get different Argon2id hashes; the file is 0600 and
    never holds the password."""
    path = tmp_path / "passwd"
    set_password(str(path), "a", "same", CHEAP)
    set_password(str(path), "b", "same", CHEAP)
    entries = read_password_file(str(path))
    assert entries["a"].startswith("$argon2id$")
    assert entries["a"] != entries["b"]
    assert b"same" not in path.read_bytes()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_password_file_changes_apply_without_restart(tmp_path: Path) -> None:
    """A password changed or a user deleted in the file applies to the next login; a broken
    edit keeps the last good entries."""
    path = str(tmp_path / "passwd")
    set_password(path, "alice", "old", CHEAP)
    auth = Auth([PasswordFileChecker(path, hasher=CHEAP)])
    assert login(auth, "alice", "old") == "alice"
    assert not set_password(path, "alice", "new-one", CHEAP)
    assert login(auth, "alice", "old") is UnauthorizedLogin
    assert login(auth, "alice", "new-one") == "alice"
    Path(path).write_text(Path(path).read_text() + "garbage line without hash\n")
    assert login(auth, "alice", "new-one") == "alice"
    set_password(str(tmp_path / "other"), "x", "y", CHEAP)
    os.replace(tmp_path / "other", path)
    assert login(auth, "alice", "new-one") is UnauthorizedLogin
    assert delete_user(path, "x")
    assert not delete_user(path, "x")
    assert login(auth, "x", "y") is UnauthorizedLogin


def test_password_file_errors(tmp_path: Path) -> None:
    """An unreadable or malformed file is a PasswordFileError saying which line."""
    with pytest.raises(PasswordFileError, match="cannot read"):
        read_password_file(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("# comment\n\nalice:plaintext\n")
    with pytest.raises(PasswordFileError, match="line 3"):
        read_password_file(str(bad))


def test_passwd_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """python -m slimta_tx.auth.passwd adds, changes and deletes users; it refuses names
    with ':' and says so on stderr."""
    path = str(tmp_path / "passwd")
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw-one\n"))
    assert main([path, "alice", "--password-stdin"]) == 0
    assert "alice: added" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw-two\n"))
    assert main([path, "alice", "--password-stdin"]) == 0
    assert "password changed" in capsys.readouterr().out
    auth = Auth([PasswordFileChecker(path)])
    assert login(auth, "alice", "pw-two") == "alice"
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    assert main([path, "a:b", "--password-stdin"]) == 2
    assert "':'" in capsys.readouterr().err
    assert main([path, "alice", "--delete"]) == 0
    assert main([path, "alice", "--delete"]) == 1


def test_passwd_command_prompts_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Without --password-stdin it asks twice and refuses a mismatch."""
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert main([str(tmp_path / "p"), "alice"]) == 2
    assert "differ" in capsys.readouterr().err


def test_strcred_memory_and_file(tmp_path: Path) -> None:
    """--auth memory:... and file:... (Twisted's plaintext format) check PLAIN and CRAM-MD5."""
    plain_file = tmp_path / "users"
    plain_file.write_bytes(b"carol:pw3\n")
    auth = Auth([from_strcred("memory:alice:pw1"), from_strcred(f"file:{plain_file}")])
    assert login(auth, "alice", "pw1") == "alice"
    assert login(auth, "carol", "pw3") == "carol"
    assert login(auth, "carol", "pw1") is UnauthorizedLogin
    import hashlib
    import hmac

    challenge = b"<1.2@mx.test>"
    digest = hmac.new(b"pw3", challenge, hashlib.md5).hexdigest().encode()
    results: list[Any] = []
    auth.login(CramMD5Credentials("carol", challenge, digest)).addBoth(results.append)
    assert results == ["carol"]


def test_strcred_unix_checks_passwords_only() -> None:
    """--auth unix can only check clear passwords: only PLAIN and LOGIN are offered."""
    auth = Auth([from_strcred("unix")])
    assert auth.credential_interfaces() == [IUsernamePassword]
    assert [s.name for s in auth.available()] == ["PLAIN", "LOGIN"]


def test_strcred_errors_never_show_the_argument() -> None:
    """A bad --auth string is a ValueError naming only its type (memory: holds passwords)."""
    with pytest.raises(ValueError, match="unknown auth type") as info:
        from_strcred("nosuch:secret-value")
    assert "secret-value" not in str(info.value)
    with pytest.raises(ValueError) as info:
        from_strcred("memory:alice:hunter2:bob")
    assert "hunter2" not in str(info.value)


def test_checkers_are_tried_in_order() -> None:
    """With two checkers for one interface, a user known to the second still logs in."""
    auth = Auth([from_strcred("memory:alice:a"), SecretChecker({"bob": "b"}.get)])
    assert login(auth, "alice", "a") == "alice"
    assert login(auth, "bob", "b") == "bob"
    assert login(auth, "bob", "a") is UnauthorizedLogin
    assert set(auth.credential_interfaces()) == {IUsernamePassword, IUsernameHashedPassword}


@pytest_twisted.inlineCallbacks
def test_password_file_checks_in_a_thread(tmp_path: Path) -> Any:
    """With a real reactor the slow hash runs in the thread pool, not on the reactor."""
    import threading

    from twisted.internet import reactor

    path = str(tmp_path / "passwd")
    set_password(path, "alice", "pw", CHEAP)
    checker = PasswordFileChecker(path, reactor, hasher=CHEAP)
    threads: list[str] = []
    original = checker._verify

    def spy(hashed: str | None, password: str) -> bool:
        threads.append(threading.current_thread().name)
        return original(hashed, password)

    checker._verify = spy  # type: ignore[method-assign]
    identity = yield Auth([checker]).login(PasswordCredentials("alice", "pw"))
    assert identity == "alice"
    assert threads and threads[0] != threading.main_thread().name
