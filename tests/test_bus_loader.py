"""--bus dotted.path: what may be named, what it is called with, and the bus lifecycle."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.python import usage

from slimta_tx.bus.loader import BusLoadError, BusService, load_bus, resolve
from slimta_tx.tap import Options, makeService

PLUGIN = textwrap.dedent(
    """
    from twisted.internet.defer import succeed
    from slimta_tx.reply import Reply

    class NoArgs:
        def send(self, envelope):
            return succeed(Reply("250", "no args", "2.0.0"))

    class WithConfig:
        def __init__(self, config, reactor):
            self.config = config
            self.reactor = reactor

        def send(self, envelope):
            return Reply("250", "config", "2.0.0")

    def factory(config, reactor):
        return WithConfig(config, reactor)

    ready = NoArgs()

    class NeedsThree:
        def __init__(self, a, b, c):
            pass

        def send(self, envelope):
            pass

    def not_a_bus():
        return object()

    NUMBER = 3
    """
)


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[str]:
    name = f"userbus_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_class_with_no_arguments(plugin: str) -> None:
    """A class taking no arguments is instantiated with none."""
    bus = load_bus(f"{plugin}:NoArgs")
    assert type(bus).__name__ == "NoArgs"


def test_class_or_factory_taking_config_and_reactor(plugin: str) -> None:
    """A class or factory taking (config, reactor) gets the options and the reactor."""
    config, reactor = {"maildir": "/x"}, object()
    for path in (f"{plugin}:WithConfig", f"{plugin}.factory"):
        bus = load_bus(path, config, reactor)
        assert bus.config is config and bus.reactor is reactor


def test_ready_instance_is_used_as_is(plugin: str) -> None:
    """An object that already has send() is the bus."""
    module = sys.modules.get(plugin) or __import__(plugin)
    assert load_bus(f"{plugin}:ready") is module.ready


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (":Missing", "has no attribute"),
        (":NeedsThree", "(config, reactor) or no arguments"),
        (":not_a_bus", "no send(envelope) method"),
        (":NUMBER", "neither a bus"),
    ],
)
def test_wrong_targets_say_what_is_wrong(plugin: str, suffix: str, message: str) -> None:
    """Each mistake gets a one-line explanation, not a traceback."""
    with pytest.raises(BusLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_bus(plugin + suffix)


def test_unimportable_module_and_bad_paths() -> None:
    """A module that does not import, or a path without an attribute, is a BusLoadError."""
    with pytest.raises(BusLoadError, match="cannot import"):
        resolve("no_such_module_here:Bus")
    with pytest.raises(BusLoadError, match="dotted path"):
        resolve("justaname")


@pytest.fixture
def clean_import_state() -> Iterator[None]:
    """sys.path and sys.modules as they were: the loader may append a directory."""
    path, modules = list(sys.path), set(sys.modules)
    try:
        yield
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            del sys.modules[name]


def test_a_module_in_the_current_directory_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_import_state: None
) -> None:
    """--bus mybus:Class from the directory holding mybus.py works without PYTHONPATH (as
    twistd runs, the current directory is not on sys.path); the directory goes at the end of
    sys.path, so it never hides an installed module."""
    name = f"cwdbus_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    for entry in ("", str(tmp_path)):
        while entry in sys.path:
            sys.path.remove(entry)
    bus = load_bus(f"{name}:NoArgs")
    assert type(bus).__name__ == "NoArgs"
    assert sys.path[-1] == str(tmp_path)


def test_a_module_found_nowhere_says_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_import_state: None
) -> None:
    monkeypatch.chdir(tmp_path)
    for entry in ("", str(tmp_path)):
        while entry in sys.path:
            sys.path.remove(entry)
    with pytest.raises(BusLoadError, match=f"not on sys.path nor in {tmp_path}"):
        resolve("no_such_module_here:Bus")
    assert str(tmp_path) not in sys.path


def test_a_missing_dependency_of_the_module_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_import_state: None
) -> None:
    """The module exists but imports something missing: that is the error, not the module."""
    (tmp_path / "needsdep.py").write_text("import no_such_dependency_here\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BusLoadError, match="No module named 'no_such_dependency_here'"):
        resolve("needsdep:Bus")


def test_a_file_path_loads_that_file(tmp_path: Path, clean_import_state: None) -> None:
    """--bus path/to/file.py:Class loads the file, wherever the server runs from; modules
    beside it can be imported by it."""
    (tmp_path / "helper_beside.py").write_text("REPLY_TEXT = 'from beside'\n")
    (tmp_path / "filebus.py").write_text(PLUGIN + "\nfrom helper_beside import REPLY_TEXT\n")
    bus = load_bus(f"{tmp_path / 'filebus.py'}:NoArgs")
    assert type(bus).__name__ == "NoArgs"
    with pytest.raises(BusLoadError, match="no such file"):
        resolve(f"{tmp_path / 'missing.py'}:NoArgs")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(BusLoadError, match="RuntimeError: boom"):
        resolve(f"{tmp_path / 'broken.py'}:Bus")


def test_twistd_bus_option_builds_the_user_bus(plugin: str) -> None:
    """twistd slimta --bus pkg.mod:Class: the edge sends to that bus."""
    config = Options()
    config.parseOptions(["--bus", f"{plugin}:WithConfig"])
    service: Any = makeService(config, reactor=_FakeReactor())
    assert type(service.edge.bus).__name__ == "WithConfig"
    assert service.edge.bus.config["bus"] == f"{plugin}:WithConfig"


def test_twistd_bus_option_is_checked_when_parsing() -> None:
    """A --bus that cannot be imported is a usage error at start-up."""
    with pytest.raises(usage.UsageError, match="--bus: cannot import"):
        Options().parseOptions(["--bus", "no_such_module_here:Bus"])


def test_choose_one_bus() -> None:
    """--bus and --amqp together are refused."""
    with pytest.raises(usage.UsageError, match="choose one bus"):
        Options().parseOptions(
            [
                "--bus",
                "slimta_tx.bus.simple:DiscardBus",
                "--amqp",
                "amqp://h/",
                "--amqp-queue",
                "q",
            ]
        )


def test_also_maildir_wraps_the_bus_in_a_chain(tmp_path: Path) -> None:
    """--also-maildir PATH: a Maildir copy first, then the chosen bus."""
    from slimta_tx.bus.compose import ChainBus
    from slimta_tx.bus.maildir import MaildirBus
    from slimta_tx.bus.simple import DiscardBus

    config = Options()
    config.parseOptions(
        ["--bus", "slimta_tx.bus.simple:DiscardBus", "--also-maildir", str(tmp_path / "copy")]
    )
    service: Any = makeService(config, reactor=_FakeReactor())
    bus = service.edge.bus
    assert isinstance(bus, ChainBus)
    assert [type(m.bus) for m in bus.members] == [MaildirBus, DiscardBus]


class _FakeReactor:
    """Enough of a reactor for building (not running) the service."""

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing should be scheduled while building")

    def getThreadPool(self) -> Any:
        return None


class _Edge:
    def __init__(self) -> None:
        self.closing: Deferred[None] = Deferred()

    def close(self) -> Deferred[None]:
        return self.closing


def test_bus_service_starts_the_bus_and_stops_it_after_the_edge_drained() -> None:
    """start() with the service; stop() only once the edge's sessions are gone."""
    calls: list[str] = []

    class Bus:
        def send(self, envelope: Any) -> Any:
            return None

        def start(self) -> None:
            calls.append("start")

        def stop(self) -> Deferred[None]:
            calls.append("stop")
            return succeed(None)

    edge = _Edge()
    service = BusService(Bus(), edge)
    service.startService()
    assert calls == ["start"]
    stopped = service.stopService()
    assert calls == ["start"] and not stopped.called
    edge.closing.callback(None)
    assert calls == ["start", "stop"] and stopped.called


def test_bus_service_works_with_buses_without_lifecycle() -> None:
    """A plain bus (no start/stop) is fine."""

    class Bus:
        def send(self, envelope: Any) -> Any:
            return None

    service = BusService(Bus(), None)
    service.startService()
    assert service.stopService().called
