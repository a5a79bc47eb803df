"""The public facade: the names users import, and that importing installs no reactor."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import slimta_tx

ROOT = Path(__file__).resolve().parent.parent


def test_exported_names_are_pinned() -> None:
    """Adding or removing a public name is a deliberate change to this list."""
    assert sorted(slimta_tx.__all__) == sorted(
        [
            "AmqpBus",
            "Auth",
            "AuthLimits",
            "BareNewlinePolicy",
            "DiscardBus",
            "Envelope",
            "IBus",
            "MaildirBus",
            "Policy",
            "RelayBus",
            "Reply",
            "ServerTLS",
            "Session",
            "SmtpEdge",
            "SmtpValidators",
            "TLSConfigError",
            "TLSInfo",
            "__version__",
            "new",
        ]
    )
    for name in slimta_tx.__all__:
        assert getattr(slimta_tx, name) is not None


def test_import_installs_no_reactor() -> None:
    """`import slimta_tx` leaves reactor choice to the application (twistd --reactor)."""
    code = "import sys, slimta_tx, slimta_tx.tap; print('twisted.internet.reactor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bus_names() -> None:
    """Every bus a user may pick is importable from slimta_tx.bus (pika is loaded lazily)."""
    import slimta_tx.bus

    assert sorted(slimta_tx.bus.__all__) == [
        "AmqpBus",
        "ChainBus",
        "DiscardBus",
        "MaildirBus",
        "RelayBus",
        "TeeBus",
        "optional",
    ]


def test_buses_are_the_same_objects_everywhere() -> None:
    """`slimta_tx.RelayBus` is `slimta_tx.bus.RelayBus`, as for the Maildir and AMQP buses."""
    import slimta_tx.bus

    for name in ("AmqpBus", "MaildirBus", "RelayBus", "DiscardBus"):
        assert getattr(slimta_tx, name) is getattr(slimta_tx.bus, name)


def test_import_needs_no_pika() -> None:
    """Without the `amqp` extra, `import slimta_tx` works and `AmqpBus` is importable; making
    one that would connect says which extra is missing, in one line."""
    code = "\n".join(
        [
            "import sys",
            "sys.modules['pika'] = None  # as if pika were not installed",
            "import slimta_tx, slimta_tx.bus, slimta_tx.tap",
            "from slimta_tx import AmqpBus",
            "AmqpBus(queue='q', connect=lambda: None, reactor=object())  # a fake link: fine",
            "try:",
            "    AmqpBus(queue='q', reactor=object())",
            "except ImportError as e:",
            "    print(e)",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "AmqpBus needs pika: pip install 'slimta_tx[amqp]'\n"


def test_version_is_written_once() -> None:
    """`__version__` is the only place the version is written: the installed distribution's
    version is read from it (hatch's dynamic version), so the two cannot disagree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["hatch"]["version"] == {"path": "slimta_tx/__init__.py"}
    assert importlib.metadata.version("slimta_tx") == slimta_tx.__version__
