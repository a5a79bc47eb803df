"""Create, update and delete entries of the AUTH password file.

Usage::

    python -m slimta_tx.auth.passwd /etc/slimta/passwd alice          # asks twice
    printf '%s\\n' "$PW" | python -m slimta_tx.auth.passwd FILE alice --password-stdin
    python -m slimta_tx.auth.passwd /etc/slimta/passwd alice --delete

Each line is ``user:$argon2id$...``: an Argon2id hash (RFC 9106) with its own random salt and
cost parameters, made by ``argon2-cffi``. The file is replaced atomically (written beside,
fsynced, renamed) and created readable by its owner only.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from collections.abc import Sequence

from argon2 import PasswordHasher

from slimta_tx.auth.checkers import PasswordFileError, read_password_file

__all__ = ["delete_user", "hash_password", "main", "set_password"]


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """An Argon2id PHC string for ``password`` (argon2-cffi's RFC 9106 low-memory profile)."""
    return (hasher or PasswordHasher()).hash(password)


def _check_user(user: str) -> None:
    if not user or user != user.strip() or user.startswith("#"):
        raise ValueError("a user name must be non-empty, without surrounding spaces or '#'")
    if ":" in user or any(ord(c) < 32 or ord(c) == 127 for c in user):
        raise ValueError("a user name must not contain ':' or control characters")


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    read_password_file(path)  # refuse to rewrite a file we cannot parse
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _write_lines(path: str, lines: list[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o600
    fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _user_of(line: str) -> str | None:
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    return line.partition(":")[0]


def set_password(
    path: str, user: str, password: str, hasher: PasswordHasher | None = None
) -> bool:
    """Add ``user`` or replace its hash; True if it was new."""
    _check_user(user)
    if not password:
        raise ValueError("the password must not be empty")
    entry = f"{user}:{hash_password(password, hasher)}"
    lines = _read_lines(path)
    for i, line in enumerate(lines):
        if _user_of(line) == user:
            lines[i] = entry
            _write_lines(path, lines)
            return False
    lines.append(entry)
    _write_lines(path, lines)
    return True


def delete_user(path: str, user: str) -> bool:
    """Remove ``user``; True if it was there."""
    lines = _read_lines(path)
    kept = [line for line in lines if _user_of(line) != user]
    if len(kept) == len(lines):
        return False
    _write_lines(path, kept)
    return True


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the passwords differ")
    return first


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slimta_tx.auth.passwd",
        description="Add, change or delete a user of the slimta_tx AUTH password file "
        "(Argon2id hashes; use with twistd slimta --auth-passwd FILE).",
    )
    parser.add_argument("file", help="the password file (created if missing, mode 0600)")
    parser.add_argument("user", help="the user name clients log in with")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    parser.add_argument("--delete", action="store_true", help="remove the user")
    args = parser.parse_args(argv)
    try:
        if args.delete:
            if not delete_user(args.file, args.user):
                print(f"{args.user}: no such user in {args.file}", file=sys.stderr)
                return 1
            print(f"{args.user}: deleted")
            return 0
        password = _read_password(args.password_stdin)
        created = set_password(args.file, args.user, password)
    except (ValueError, PasswordFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.user}: {'added' if created else 'password changed'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
