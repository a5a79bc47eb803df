"""twistd plugin for slimta_tx: ``twistd slimta``.

This file must stay tiny: it imports only ServiceMaker and names the tap module as a string, so
that a stale plugin cache or ``--reactor`` selection never breaks (see docs/running.md,
"Packaging notes").
"""

from twisted.application.service import ServiceMaker

slimta = ServiceMaker(
    "slimta_tx",
    "slimta_tx.tap",
    "An ESMTP edge listener that stores or forwards accepted mail.",
    "slimta",
)
