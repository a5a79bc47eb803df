"""Name each file-system step of a Maildir commit and act before it (raise, or SIGKILL).

:class:`StepSpy` wraps the functions of :mod:`slimta_tx.bus.maildir.fsops` (the store calls
them through that module, one function per step) and gives each call a label such as
``"sync data"`` or ``"publish message"``. Root can run the tests, so permissions cannot make
the disk fail; an injected ``OSError(ENOSPC)`` can, at any step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from slimta_tx.bus.maildir import fsops

# fsops function -> step label.
STEP_FUNCTIONS = {
    "create_message": "open message",
    "write_message": "write message",
    "start_writeback": "start writeback",
    "create_journal": "open envelope",
    "sync_journal_dir": "sync envelope/",
    "append_journal": "write envelope",
    "sync_data": "sync data",
    "publish_message": "publish message",
    "sync_new": "sync new/",
}

# The steps of the first delivery of a small message into a new Maildir (sync mode
# per-file), in the order MaildirStore takes them. A later batch is the same without
# "open envelope" and "sync envelope/" (the segment exists); a message of 64 KiB or more, or
# any in sync mode journal, has "start writeback" after "write message".
DELIVERY_STEPS = (
    "open message",
    "write message",
    "open envelope",
    "sync envelope/",
    "write envelope",
    "sync data",
    "publish message",
    "sync new/",
)


class StepSpy:
    """Label the Maildir's file-system steps; ``action(label)`` runs before each one.

    ``calls`` keeps ``(label, args)`` of every step, e.g. the file descriptors one
    ``sync data`` covered.
    """

    def __init__(self, action: Callable[[str], None] | None = None) -> None:
        self.action = action or (lambda label: None)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.originals = {name: getattr(fsops, name) for name in STEP_FUNCTIONS}

    @property
    def steps(self) -> list[str]:
        return [label for label, _ in self.calls]

    def count(self, label: str) -> int:
        return self.steps.count(label)

    def _wrap(self, name: str) -> Callable[..., Any]:
        label = STEP_FUNCTIONS[name]
        original = self.originals[name]

        def step(*args: Any) -> Any:
            self.calls.append((label, args))
            self.action(label)
            return original(*args)

        return step

    def install(self, setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
        """Patch :mod:`fsops` (pass ``monkeypatch.setattr`` in pytest)."""
        for name in STEP_FUNCTIONS:
            setattr_(fsops, name, self._wrap(name))


def fail_at(step: str, error: int, occurrence: int = 1) -> Callable[[str], None]:
    """An action raising ``OSError(error)`` the ``occurrence``-th time ``step`` is reached."""
    seen = [0]

    def action(label: str) -> None:
        if label == step:
            seen[0] += 1
            if seen[0] == occurrence:
                raise OSError(error, os.strerror(error))

    return action
