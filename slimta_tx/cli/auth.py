"""AUTH options of ``twistd slimta`` (see slimta_tx/cli/__init__.py for the contract).

``--auth`` takes Twisted's credential strings (``memory:user:pass``, ``file:PATH``, ``unix``);
``--auth-passwd`` an Argon2id password file made with ``python -m slimta_tx.auth.passwd``.
Without either, AUTH is not offered. Error messages never repeat an ``--auth`` argument past
its type, since ``memory:`` strings hold passwords.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from slimta_tx.cli.coerce import whole_number


def _delay(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--auth-failure-delay takes seconds, not {value!r}") from None
    if number < 0:
        raise ValueError("--auth-failure-delay must be 0 or more")
    return number


_delay.coerceDoc = "(seconds, 0 = no delay)"  # type: ignore[attr-defined]


class OptionGroup:
    optParameters: list[list[Any]] = [
        [
            "auth-passwd",
            None,
            None,
            "AUTH password file of Argon2id hashes "
            "(make entries with: python -m slimta_tx.auth.passwd FILE USER).",
        ],
        [
            "auth-mechanisms",
            None,
            None,
            "SASL mechanisms to offer, comma-separated, in order "
            "(default: SCRAM-SHA-256,CRAM-MD5,PLAIN,LOGIN; only those the checkers support).",
        ],
        [
            "auth-max-failures",
            None,
            5,
            "Failed AUTH attempts per connection before 421 and close.",
            whole_number("auth-max-failures", 1),
        ],
        [
            "auth-max-address-failures",
            None,
            10,
            "Failed AUTH attempts per client address in 15 minutes before its AUTH gets 421.",
            whole_number("auth-max-address-failures", 1),
        ],
        [
            "auth-failure-delay",
            None,
            1.0,
            "Seconds the first 535 is held back; doubles per failure, up to 16.",
            _delay,
        ],
    ]
    optFlags: list[list[Any]] = [
        [
            "allow-insecure-auth",
            None,
            "Offer and accept PLAIN/LOGIN without TLS (testing on loopback only).",
        ],
        ["require-auth", None, "MAIL needs a successful AUTH first (530 5.7.0): submission."],
    ]

    def opt_auth(self, description: str) -> None:
        """Credential checker, Twisted strcred syntax: memory:USER:PASS, file:PATH, unix
        (repeatable; tried in order)"""
        self["auth"].append(description)  # type: ignore[index]


def defaults(config: Any) -> None:
    config["auth"] = []


def validate(config: Any) -> None:
    from slimta_tx.auth import Auth
    from slimta_tx.auth.checkers import PasswordFileError, from_strcred, read_password_file

    checkers = []
    for description in config["auth"]:
        kind, _, argument = description.partition(":")
        if kind == "file" and argument:
            try:
                with open(argument, "rb"):
                    pass
            except OSError as e:
                raise usage.UsageError(f"--auth file: cannot read {argument}: {e}") from None
        try:
            checkers.append(from_strcred(description))
        except ValueError as e:
            raise usage.UsageError(f"--auth: {e}") from None
    config["auth-checkers"] = checkers
    if config["auth-passwd"]:
        try:
            read_password_file(config["auth-passwd"])
        except PasswordFileError as e:
            raise usage.UsageError(f"--auth-passwd: {e}") from None
    configured = bool(checkers or config["auth-passwd"])
    for option in ("require-auth", "allow-insecure-auth", "auth-mechanisms"):
        if config[option] and not configured:
            raise usage.UsageError(f"--{option} needs --auth or --auth-passwd")
    if config["auth-mechanisms"]:
        try:
            Auth().offer(config["auth-mechanisms"].split(","))
        except ValueError as e:
            raise usage.UsageError(f"--auth-mechanisms: {e}") from None


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    from slimta_tx.auth import Auth, AuthLimits, PasswordFileChecker

    checkers = list(config["auth-checkers"])
    if config["auth-passwd"]:
        checkers.insert(0, PasswordFileChecker(config["auth-passwd"], reactor))
    if not checkers:
        return
    mechanisms = config["auth-mechanisms"].split(",") if config["auth-mechanisms"] else None
    limits = AuthLimits(
        failure_delay=config["auth-failure-delay"],
        max_failures_per_connection=config["auth-max-failures"],
        max_failures_per_address=config["auth-max-address-failures"],
    )
    auth = Auth(
        checkers,
        mechanisms=mechanisms,
        allow_insecure=bool(config["allow-insecure-auth"]),
        require_auth=bool(config["require-auth"]),
        limits=limits,
    )
    edge.enable_authentication(auth)
