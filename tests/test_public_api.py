"""The public facade: the names users import, and that importing installs no reactor."""

from __future__ import annotations

import subprocess
import sys

import slimta_tx


def test_exported_names_are_pinned() -> None:
    """Adding or removing a public name is a deliberate change to this list."""
    assert sorted(slimta_tx.__all__) == sorted(
        [
            "Auth",
            "AuthLimits",
            "BareNewlinePolicy",
            "DiscardBus",
            "Envelope",
            "IBus",
            "MaildirBus",
            "Policy",
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
