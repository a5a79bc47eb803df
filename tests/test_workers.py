"""``--workers``: options, what the parent builds, how listeners are handed over and how worker
log events travel (no worker processes here; tests/test_workers_twistd.py runs real ones)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText
from twisted.python import usage
from twisted.python.failure import Failure

from slimta_tx.envelope import new_queue_id
from slimta_tx.service import EdgeService
from slimta_tx.supervise import RestartLimits
from slimta_tx.tap import Options, makeService
from slimta_tx.worker_log import decode_event, encode_event
from slimta_tx.workers import (
    LISTEN_BACKLOG,
    WorkersService,
    bind,
    split_listener,
    with_backlog,
    worker_description,
)
from tests.support.process import TWISTD


def parse(*args: str) -> Options:
    config = Options()
    config.parseOptions(list(args))
    return config


def test_one_worker_is_the_default_and_builds_todays_service(tmp_path: Path) -> None:
    config = parse("--maildir", str(tmp_path / "md"))
    assert config["workers"] == 1
    assert config["worker-restarts"] == RestartLimits(max_restarts=5, window=60.0)
    assert isinstance(makeService(config, global_reactor), EdgeService)


def test_workers_builds_the_parent_with_everything_it_needs(tmp_path: Path) -> None:
    """The parent keeps the exact arguments (each worker parses them again), both kinds of
    listener, the restart limits and the drain time; it builds no bus (no Maildir appears)."""
    args = [
        "--workers",
        "3",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen=haproxy:tcp6:0:interface=\\:\\:1",
        "--maildir",
        str(tmp_path / "md"),
        "--worker-restarts",
        "2/30",
        "--shutdown-grace",
        "7",
    ]
    config = parse(*args)
    service = makeService(config, global_reactor)
    assert isinstance(service, WorkersService)
    assert service.argv == args
    assert service.listeners == [
        ("tcp:0:interface=127.0.0.1", "listen"),
        ("haproxy:tcp6:0:interface=\\:\\:1", "listen"),
    ]
    assert service.pool.count == 3
    assert service.pool.tracker.limits == RestartLimits(max_restarts=2, window=30.0)
    assert service.pool.stop_timeout == 7 + 10
    assert not (tmp_path / "md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "many"], "--workers takes a whole number, not 'many'"),
        (["--workers", "1000"], "--workers must be at most 256"),
        (["--worker-restarts", "5"], "--worker-restarts takes N/SECONDS, e.g. 5/60, not '5'"),
        (["--worker-restarts", "5/0"], "--worker-restarts takes N/SECONDS, e.g. 5/60, not '5/0'"),
        (
            # (A valid description: --listen checks an ssl: key file exists first.)
            ["--workers", "2", "--listen", "stdio:"],
            "--workers: cannot share the listener 'stdio:' between workers; "
            "use tcp:, tcp6:, unix:, systemd: (also behind haproxy:)",
        ),
    ],
)
def test_bad_values_are_one_line(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse(*args)
    assert str(raised.value) == f"{message} (see 'twistd slimta --help')"


def test_any_listener_is_fine_with_one_worker() -> None:
    assert parse("--listen", "stdio:")["listen"] == ["stdio:"]


def test_listener_descriptions_for_the_workers() -> None:
    """The bound part of a description becomes an inherited descriptor; wrappers stay."""
    assert split_listener("tcp:25") == ("", "tcp:25")
    assert split_listener("haproxy:tcp6:25:interface=\\:\\:") == (
        "haproxy:",
        "tcp6:25:interface=\\:\\:",
    )
    assert split_listener("systemd:domain=INET:index=0") == ("", "systemd:domain=INET:index=0")
    assert worker_description("haproxy:", "INET6", 2) == "haproxy:systemd:domain=INET6:index=2"
    assert with_backlog("tcp:25") == f"tcp:25:backlog={LISTEN_BACKLOG}"
    assert with_backlog("tcp:25:backlog=10") == "tcp:25:backlog=10"
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
    with pytest.raises(ValueError):
        split_listener("txsni:certs:tcp:465")


def test_the_parent_binds_without_accepting() -> None:
    """The parent's socket listens with the large backlog and is not read by the parent (a
    connection waits in the kernel for a worker); the worker gets the family to adopt it."""
    bound = bind(global_reactor, "tcp:0:interface=127.0.0.1", "listen", 1)
    try:
        assert bound.worker_description == "systemd:domain=INET:index=1"
        sock = socket.socket(fileno=os.dup(bound.fileno()))
        with sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert bound.fileno() not in [
            r.fileno() for r in global_reactor.getReaders() if hasattr(r, "fileno")
        ]
    finally:
        bound.port.stopListening()
    six = bind(global_reactor, "haproxy:tcp6:0:interface=\\:\\:1", "tls-listen", 0)
    six.port.stopListening()
    assert six.worker_description == "haproxy:systemd:domain=INET6:index=0"


def test_a_port_in_use_is_cannot_listen() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(CannotListenError):
            bind(global_reactor, f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1", "listen", 0)


@pytest.mark.slow
def test_twistd_workers_port_in_use_stops_start_up(tmp_path: Path) -> None:
    """As with one process: the second listener cannot bind, so start-up stops with one line
    and exit status 1; no worker was started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "slimta",
                "--workers",
                "2",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--maildir",
                str(tmp_path / "md"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert (
        f"slimta: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
        in output
    )
    assert "Traceback" not in output
    assert "worker 1 started" not in output


def round_trip(event: dict[str, Any], worker: int = 2) -> dict[str, Any]:
    line = encode_event(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    decoded = decode_event(line[:-1], worker)
    assert decoded is not None
    return decoded


def test_a_transaction_event_keeps_its_fields() -> None:
    """The per-message line reaches the parent with every field (a JSON log sees them) and
    prints as the worker would have printed it, marked with the worker."""
    log = Logger(namespace="slimta_tx.factory.SmtpEdge")
    event = {
        "client": "192.0.2.7",
        "queue_id": "25U6CNCLVERPAOSS",
        "seconds": 0.0031,
        "log_logger": log,
        "log_level": LogLevel.info,
        "log_namespace": log.namespace,
        "log_source": None,
        "log_format": "{client} id={queue_id} {seconds:.3f}s",
        "log_time": 1_700_000_000.0,
    }
    decoded = round_trip(event)
    assert decoded["client"] == "192.0.2.7" and decoded["queue_id"] == "25U6CNCLVERPAOSS"
    assert decoded["worker"] == 2
    assert decoded["log_level"] is LogLevel.info
    text = formatEventAsClassicLogText(decoded)
    assert text is not None
    assert text.endswith(
        "[worker-2 slimta_tx.factory.SmtpEdge#info] 192.0.2.7 id=25U6CNCLVERPAOSS 0.003s\n"
    )


def test_events_with_objects_or_failures_travel_as_text() -> None:
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        failure = Failure()
    event = {
        "log_level": LogLevel.critical,
        "log_namespace": "slimta_tx.bus",
        "log_format": "delivery to {path!r} failed",
        "path": Path("/var/mail"),
        "log_failure": failure,
        "log_time": time.time(),
    }
    decoded = round_trip(event, worker=1)
    text = formatEventAsClassicLogText(decoded)
    assert text is not None
    assert "[worker-1 slimta_tx.bus#critical] delivery to PosixPath('/var/mail') failed" in text
    assert "RuntimeError: disk on fire" in text
    legacy = round_trip(
        {
            "log_format": "{log_text}",
            "log_text": "x starting on 25",
            "log_system": "-",
            "log_namespace": "log_legacy",
            "log_level": LogLevel.info,
            "log_time": 0.0,
        }
    )
    assert legacy["log_system"] == "worker-2"


def test_lines_that_are_not_events_are_refused() -> None:
    assert decode_event(b"Traceback (most recent call last):", 1) is None
    assert decode_event(b'["a list"]', 1) is None
    assert decode_event(json.dumps({"no": "namespace"}).encode(), 1) is None


def test_queue_ids_differ_across_forked_processes() -> None:
    """A forked child draws its own ids, never the batch its parent drew (workers are
    spawned, not forked, but an embedder may fork)."""
    new_queue_id()  # the parent now holds a batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, " ".join(new_queue_id() for _ in range(64)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = set(f.read().decode().split())
    os.waitpid(pid, 0)
    parent = {new_queue_id() for _ in range(64)}
    assert len(child) == 64 and not child & parent


@pytest.mark.parametrize(
    ("twistd_options", "to_stdout"),
    [
        ({"nodaemon": True, "logfile": None, "syslog": False, "logger": None}, True),
        ({"nodaemon": True, "logfile": "-", "syslog": False, "logger": None}, True),
        ({"nodaemon": True, "logfile": "/var/log/slimta.log", "syslog": False}, False),
        ({"nodaemon": True, "logfile": None, "syslog": True}, False),
        ({"nodaemon": True, "logfile": None, "logger": "my.observer"}, False),
        ({"nodaemon": False, "logfile": None, "syslog": False}, False),
    ],
)
def test_workers_write_to_stdout_only_where_twistd_does(
    tmp_path: Path, twistd_options: dict[str, Any], to_stdout: bool
) -> None:
    """Workers share the parent's stdout only when twistd itself logs plain text there;
    otherwise (a rotated file, syslog, a custom observer, a daemon) their events go through
    the parent."""
    config = Options()
    config.parent = twistd_options  # type: ignore[assignment]
    config.parseOptions(["--workers", "2", "--maildir", str(tmp_path / "md")])
    service = makeService(config, global_reactor)
    assert isinstance(service, WorkersService)
    assert service.log_to_stdout is to_stdout
    assert json.loads(service.spec(1))["log"] == ("stdout" if to_stdout else "parent")


def test_a_worker_logging_through_its_parent_drops_what_is_below_the_level() -> None:
    """Through the parent (-l FILE, a daemon), a worker forwards only events at --log-level
    or above: the parent's own sink formats them (as --log-format says)."""
    from twisted.logger import LogLevel

    from slimta_tx.worker_log import Switch

    seen: list[dict[str, object]] = []
    switch = Switch(seen.append, 2)
    switch({"log_level": LogLevel.debug, "log_namespace": "x"})  # before the options: all
    switch.honour("warn", "json", reactor=None, stdout=None)
    for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
        switch({"log_level": level, "log_namespace": "x"})
    assert [e["log_level"] for e in seen] == [LogLevel.debug, LogLevel.warn, LogLevel.error]


def test_listening_ports_have_stop_reading() -> None:
    """The parent keeps a bound port open without accepting: ``stopReading()``, a
    FileDescriptor method beyond IListeningPort (docs/architecture.md, private internals)."""
    from twisted.internet import tcp, unix

    assert callable(tcp.Port.stopReading) and callable(unix.Port.stopReading)


def test_a_worker_event_reaches_the_parents_observers_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent hands a worker's event on unchanged, to ``Logger.observer``, or to the
    global publisher when a Logger has none (docs/architecture.md, private internals)."""
    from types import SimpleNamespace

    from twisted.logger import Logger

    from slimta_tx.worker_log import encode_event
    from slimta_tx.workers import WorkerProcess
    from tests.support.logs import captured_events

    line = encode_event(
        {"log_namespace": "w", "log_level": None, "log_format": "hi", "log_time": 1.0}
    )
    for log in (Logger(namespace="slimta_tx.workers"), SimpleNamespace()):  # no observer
        monkeypatch.setattr(WorkerProcess, "log", log)
        process = WorkerProcess(3, None, b"")  # type: ignore[arg-type]
        with captured_events() as events:
            process.childDataReceived(1, line)
        (event,) = events
        assert (event["log_namespace"], event["log_time"], event["worker"]) == ("w", 1.0, 3)
