"""``twistd slimta``: parsed options, the service they build, and what a user sees on errors."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.data import BareNewlinePolicy
from slimta_tx.policy import Policy
from slimta_tx.service import EdgeService
from slimta_tx.tap import Options, makeService
from tests.support.process import TWISTD

CORE_KEYS = (
    "listen",
    "hostname",
    "banner",
    "max-size",
    "max-recipients",
    "max-bad-commands",
    "timeout",
    "data-timeout",
    "bare-newline",
    "spool-dir",
    "trusted-network",
    "accept-domain",
    "maildir",
)


def parse(*args: str) -> Options:
    config = Options()
    config.parseOptions(list(args))
    return config


def test_defaults() -> None:
    """With no options: loopback port 2525, ./var/maildir, the FQDN as hostname, and the
    default policy (25 MiB, 100 recipients, 300 s timeouts, relay for loopback only)."""
    config = parse()
    fqdn = socket.getfqdn()
    assert {key: config[key] for key in CORE_KEYS} == {
        "listen": ["tcp:2525:interface=127.0.0.1"],
        "hostname": fqdn,
        "banner": None,
        "max-size": 25 * 1024 * 1024,
        "max-recipients": 100,
        "max-bad-commands": 20,
        "timeout": 300.0,
        "data-timeout": 300.0,
        "bare-newline": "reject",
        "spool-dir": None,
        "trusted-network": [],
        "accept-domain": [],
        "maildir": "./var/maildir",
    }
    assert config["policy"] == Policy(hostname=fqdn)
    assert config["policy"].trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


@pytest.mark.parametrize(
    ("args", "policy_changes"),
    [
        (["--hostname", "mx.example.org"], {"hostname": "mx.example.org"}),
        (["--max-size", "1000"], {"max_message_size": 1000}),
        (["--max-size", "0"], {"max_message_size": 0}),
        (["--max-recipients", "5"], {"max_recipients": 5}),
        (["--max-bad-commands", "3"], {"max_bad_commands": 3}),
        (["--timeout", "12.5"], {"command_timeout": 12.5}),
        (["--data-timeout", "60"], {"data_timeout": 60.0}),
        (["--bare-newline", "normalize"], {"bare_newline": BareNewlinePolicy.NORMALIZE}),
        (["--spool-dir", "/"], {"spool_directory": "/"}),
        (
            ["--trusted-network", "192.0.2.0/24", "--trusted-network", "2001:db8::/32"],
            {
                "trusted_networks": (
                    ipaddress.ip_network("192.0.2.0/24"),
                    ipaddress.ip_network("2001:db8::/32"),
                )
            },
        ),
        (
            ["--accept-domain", "Example.COM", "--accept-domain", ".example.net"],
            {"accepted_domains": ("example.com", ".example.net")},
        ),
    ],
)
def test_each_option_sets_the_policy(args: list[str], policy_changes: dict[str, Any]) -> None:
    """Each limit, name and relay option lands in the Policy the edge runs with, and
    nothing else changes."""
    config = parse("--hostname", "mx.test", *args)
    expected = Policy(hostname="mx.test").evolve(**policy_changes)
    assert config["policy"] == expected


def test_listen_repeats_and_each_listener_becomes_a_service(tmp_path: Path) -> None:
    """--listen is repeatable (and replaces the default); the service gets one listener each,
    plus the banner and Maildir chosen."""
    config = parse(
        "--listen",
        "tcp:2525:interface=127.0.0.1",
        "--listen",
        "tcp6:2526:interface=\\:\\:1",
        "--banner",
        "Welcome to the test",
        "--maildir",
        str(tmp_path / "md"),
        "--hostname",
        "mx.test",
    )
    assert config["listen"] == ["tcp:2525:interface=127.0.0.1", "tcp6:2526:interface=\\:\\:1"]
    service = makeService(config, reactor=MemoryReactorClock())
    assert isinstance(service, EdgeService)
    listeners = [child for child in service if isinstance(child, StreamServerEndpointService)]
    assert len(listeners) == 2
    assert (
        service.edge.banner_reply().render(with_enhanced=False) == b"220 Welcome to the test\r\n"
    )
    assert isinstance(service.edge.bus, MaildirBus)
    assert service.edge.bus.path == str(tmp_path / "md")
    assert service.edge.policy == config["policy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-size", "abc"], "--max-size takes a whole number, not 'abc'"),
        (["--max-size", "-1"], "--max-size must be at least 0"),
        (["--max-recipients", "0"], "--max-recipients must be at least 1"),
        (["--timeout", "soon"], "--timeout takes a number of seconds, not 'soon'"),
        (["--data-timeout", "0"], "--data-timeout must be more than 0"),
        (["--bare-newline", "maybe"], "--bare-newline must be 'reject' or 'normalize'"),
        (["--trusted-network", "10.0.0.0/99"], "not a network in CIDR notation"),
        (["--accept-domain", "a b"], "--accept-domain: not a domain"),
        (["--spool-dir", "/no/such/dir"], "--spool-dir: no such directory"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_bad_values_are_one_line_usage_errors(args: list[str], message: str) -> None:
    """A bad value is a UsageError whose one-line message names the option and the problem."""
    with pytest.raises(usage.UsageError) as caught:
        parse(*args)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def run_twistd(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_twistd_bad_value_exits_1_with_one_line(tmp_path: Path) -> None:
    """`twistd slimta --max-size abc` prints exactly one line saying what is wrong and
    exits with status 1 (no usage dump, no traceback)."""
    result = run_twistd("slimta", "--max-size", "abc", cwd=tmp_path)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [
        "twistd slimta: --max-size takes a whole number, not 'abc' (see 'twistd slimta --help')"
    ]


@pytest.mark.slow
def test_twistd_port_in_use_stops_start_up(tmp_path: Path) -> None:
    """A listener that cannot bind stops start-up with exit status 1 and a line saying why
    (instead of running with no listener)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(
            "-n",
            "--pidfile=",
            "slimta",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--maildir",
            str(tmp_path / "md"),
            cwd=tmp_path,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"Couldn't listen on 127.0.0.1:{port}" in output
    assert "Address already in use" in output
    assert "Traceback" not in output


def all_long_options() -> set[str]:
    options = Options()
    names = {name for name in options.synonyms if len(name) > 1}
    return names - {"version"}


@pytest.mark.slow
def test_twistd_help_lists_every_option(tmp_path: Path) -> None:
    """`twistd slimta --help` exits 0 and documents every long option the parser accepts."""
    result = run_twistd("slimta", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^\s+(?:-\w, )?--([\w-]+)", result.stdout, re.MULTILINE))
    expected = all_long_options()
    assert {"listen", "maildir", "max-size", "trusted-network", "accept-domain"} <= expected
    assert expected - listed == set()
