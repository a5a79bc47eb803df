"""Run twistd, but SIGKILL the process just before a named step of a Maildir commit.

Usage: ``python killpoint.py STEP[#N] [--gate K FILE] twistd-arguments...`` where STEP is one of
:data:`tests.support.faults.DELIVERY_STEPS` and ``#N`` picks its N-th occurrence (default the
first). The kill is deterministic: it happens in the writer thread at exactly that step, as a
power cut or OOM kill would, but reproducibly.

``--gate K FILE`` holds the first batch at its first step until K messages have been handed
to the bus, and creates FILE when it starts holding: a test sends one message, waits for FILE,
then sends K - 1 more, which form the next batch (a kill "mid-batch" then hits a batch of
several messages, whatever the timing of the clients).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

GATE_TIMEOUT = 30.0


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from slimta_tx.bus.maildir import MaildirBus
    from tests.support.faults import DELIVERY_STEPS, StepSpy

    target, *rest = sys.argv[1:]
    step, _, nth = target.partition("#")
    occurrence = int(nth or "1")
    if step not in DELIVERY_STEPS:
        raise SystemExit(f"unknown step {step!r}; steps: {DELIVERY_STEPS}")
    gate, gate_file = 0, ""
    if rest[:1] == ["--gate"]:
        gate, gate_file, rest = int(rest[1]), rest[2], rest[3:]

    handed = [0]
    opened = threading.Event()
    original_send = MaildirBus.send

    def counting_send(self: MaildirBus, envelope: object) -> object:
        handed[0] += 1
        if handed[0] >= gate:
            opened.set()
        return original_send(self, envelope)  # type: ignore[arg-type]

    MaildirBus.send = counting_send  # type: ignore[method-assign]
    seen = {label: 0 for label in DELIVERY_STEPS}

    def action(label: str) -> None:
        seen[label] += 1
        if gate and not opened.is_set():
            Path(gate_file).touch()
            if not opened.wait(GATE_TIMEOUT):
                raise SystemExit(f"killpoint: only {handed[0]} of {gate} messages arrived")
        if label == step and seen[label] == occurrence:
            os.kill(os.getpid(), signal.SIGKILL)

    StepSpy(action).install()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *rest]
    run()


if __name__ == "__main__":
    main()
