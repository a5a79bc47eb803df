"""``twistd slimta`` policy options: parsing, what they install, SIGHUP reloading lists."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from slimta_tx.cli.policies import parse_rate
from slimta_tx.policies import (
    AddressList,
    ConnectionLimits,
    DnsblPolicy,
    EarlyTalkerPolicy,
    ReverseDnsPolicy,
)
from slimta_tx.service import EdgeService, SighupReload
from slimta_tx.tap import Options, makeService
from tests.support.process import running_twistd, twistd_argv
from tests.support.wire import WireClient


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["--maildir", "/nonexistent/unused", *argv])
    return options


def build(tmp_path: Path, *argv: str) -> EdgeService:
    config = parse("--maildir", str(tmp_path / "md"), *argv)
    service = makeService(config, reactor=Clock())
    assert isinstance(service, EdgeService)
    return service


def owners(checks: list[Any]) -> list[type]:
    return [type(getattr(check, "__self__", None)) for check in checks]


def test_no_policy_options_install_nothing(tmp_path: Path) -> None:
    """By default no policy check runs (the relay rule is the core's)."""
    edge = build(tmp_path).edge
    for hook in ("BANNER", "MAIL", "RCPT"):
        assert edge.validators.checks(hook) == []
    assert edge.policy.shutdown_grace == 30.0


def test_every_policy_option_installs_its_policy(tmp_path: Path) -> None:
    """Each option turns on its policy, in the order limits, DNSBL, rDNS, greeting delay."""
    senders, recipients = tmp_path / "s", tmp_path / "r"
    senders.write_text("spam@x.test REJECT\n")
    recipients.write_text("* REJECT\n")
    service = build(
        tmp_path,
        "--max-connections-per-ip=5",
        "--max-connection-rate=30/60",
        "--dnsbl=zen.example.org",
        "--dnsbl=bl.example.net",
        "--dnswl=wl.example.org",
        "--dns-timeout=2.5",
        "--rdns",
        "--greeting-delay=3",
        "--sender-list",
        str(senders),
        "--recipient-list",
        str(recipients),
        "--shutdown-grace=7",
    )
    edge = service.edge
    banner = owners(edge.validators.checks("BANNER"))
    assert banner == [
        EarlyTalkerPolicy,
        ConnectionLimits,
        DnsblPolicy,
        ReverseDnsPolicy,
        EarlyTalkerPolicy,
    ]
    limits = edge.validators.checks("BANNER")[1].__self__
    assert (limits.max_connections, limits.max_rate) == (5, (30, 60.0))
    dnsbl = edge.validators.checks("BANNER")[2].__self__
    assert dnsbl.blocklists == ["zen.example.org", "bl.example.net"]
    assert dnsbl.allowlists == ["wl.example.org"] and dnsbl.timeout == 2.5
    assert edge.validators.checks("BANNER")[0].__self__.delay == 3.0
    [mail] = edge.validators.checks("MAIL")
    [rcpt] = edge.validators.checks("RCPT")
    assert mail.__self__.addresses.match("spam@x.test") is not None
    assert rcpt.__self__.addresses.match("anyone@y.test") is not None
    assert edge.policy.shutdown_grace == 7.0
    assert service.reloads is not None and len(service.reloads.callbacks) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-connection-rate=30"], "N/SECONDS"),
        (["--max-connection-rate=0/60"], "N/SECONDS"),
        (["--max-connection-rate=a/b"], "N/SECONDS"),
        (["--max-connections-per-ip=0"], "at least 1"),
        (["--greeting-delay=0"], "more than 0"),
        (["--shutdown-grace=-1"], "more than 0"),
        (["--dnsbl=nodots"], "not a DNS zone"),
        (["--dnswl=wl.example.org"], "--dnswl only matters"),
        (["--sender-list=/nonexistent/list"], "--sender-list: /nonexistent/list: cannot read"),
    ],
)
def test_bad_values_are_one_line_usage_errors(argv: list[str], message: str) -> None:
    """Mistakes in policy options stop start-up with a one-line message."""
    with pytest.raises(usage.UsageError, match=re.escape(message)):
        parse(*argv)


def test_a_mistake_inside_a_list_file_names_the_line(tmp_path: Path) -> None:
    """A recipient list with a bad line fails at start-up, naming file and line."""
    path = tmp_path / "r"
    path.write_text("ok@x.test OK\nbad@x.test PERHAPS\n")
    with pytest.raises(usage.UsageError, match=f"{re.escape(str(path))}:2: unknown action"):
        parse("--recipient-list", str(path))


def test_rate_parser() -> None:
    """N/SECONDS with a fractional window."""
    assert parse_rate("10/0.5") == (10, 0.5)


class ImmediateReactor:
    """callWhenRunning and callFromThread run at once (the reactor is 'running')."""

    def callWhenRunning(self, f: Any, *a: Any) -> None:
        f(*a)

    def callFromThread(self, f: Any, *a: Any) -> None:
        f(*a)


def test_sighup_reloads_the_lists_and_chains_to_the_previous_handler(tmp_path: Path) -> None:
    """While the reload service runs, SIGHUP reads the lists again and still calls the handler
    it replaced (TLS reloads certificates on SIGHUP too); stopping restores that handler."""
    path = tmp_path / "senders"
    path.write_text("a@x.test REJECT\n")
    addresses = AddressList([str(path)])
    earlier: list[int] = []
    original = signal.signal(signal.SIGHUP, lambda signum, frame: earlier.append(signum))
    try:
        reloader = SighupReload(ImmediateReactor())
        reloader.add(addresses.reload)
        reloader.startService()
        path.write_text("b@x.test REJECT\n")
        os.kill(os.getpid(), signal.SIGHUP)
        assert addresses.match("b@x.test") is not None
        assert addresses.match("a@x.test") is None
        assert earlier == [signal.SIGHUP]
        reloader.stopService()
        path.write_text("c@x.test REJECT\n")
        os.kill(os.getpid(), signal.SIGHUP)
        assert addresses.match("c@x.test") is None
        assert earlier == [signal.SIGHUP, signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, original)


@pytest.mark.slow
def test_twistd_refuses_listed_senders_and_reloads_on_sighup(tmp_path: Path) -> None:
    """A real twistd with --sender-list and --max-connections-per-ip: the listed sender is
    refused, a second connection from the address gets 421 4.7.0, and after the file changes
    and SIGHUP the new rules apply to the open session."""
    senders = tmp_path / "senders"
    senders.write_text("spam@x.test REJECT\n")
    argv = twistd_argv(
        tmp_path / "md",
        "--sender-list",
        str(senders),
        "--max-connections-per-ip=1",
        "--trusted-network=10.9.9.0/24",  # so that 127.0.0.1 is limited like anyone
        "--accept-domain=example.com",
    )
    with running_twistd(argv) as server:
        client = greeted_client(server.port)
        assert client.command("EHLO c.test")[0] == "250"
        code, text = client.command("MAIL FROM:<spam@x.test>")
        assert (code, text) == (
            "550",
            "5.7.1 <spam@x.test>: Sender address rejected: Access denied",
        )
        with WireClient(server.port) as second:
            assert second.reply()[0] == "421"
        senders.write_text("other@x.test REJECT\n")
        server.kill(signal.SIGHUP)
        server.wait_for_line(re.compile(r"reloaded .*senders"))
        assert client.command("MAIL FROM:<spam@x.test>")[0] == "250"
        assert client.command("RSET")[0] == "250"
        assert client.command("MAIL FROM:<other@x.test>")[0] == "550"
        client.close()


def greeted_client(port: int) -> WireClient:
    """Connect until greeted: the readiness probe's connection may still be counted (on a
    loaded machine its end can take longer than 200 back-to-back attempts: bounded by time)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        client = WireClient(port)
        if client.reply()[0] == "220":
            return client
        client.close()
        time.sleep(0.01)  # retry interval of the bounded connect loop
    raise AssertionError("never greeted")
