"""Run twistd, but SIGKILL the process just before a named step of a Maildir delivery.

Usage: ``python killpoint.py MAILDIR STEP twistd-arguments...`` where STEP is one of
:data:`tests.support.faults.DELIVERY_STEPS`. The kill is deterministic: it happens in the
delivery thread at exactly that step, as a power cut or OOM kill would, but reproducibly.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.faults import DELIVERY_STEPS, StepSpy

    root, step, *twistd_args = sys.argv[1:]
    if step not in DELIVERY_STEPS:
        raise SystemExit(f"unknown step {step!r}; steps: {DELIVERY_STEPS}")

    def action(label: str) -> None:
        if label == step:
            os.kill(os.getpid(), signal.SIGKILL)

    StepSpy(root, action).install()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *twistd_args]
    run()


if __name__ == "__main__":
    main()
