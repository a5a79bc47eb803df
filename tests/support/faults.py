"""Name each file-system step of a Maildir delivery and act before it (raise, or SIGKILL).

:class:`StepSpy` wraps ``os.open``, ``os.fdopen`` (for writes), ``os.fsync`` and ``os.rename``
and gives every call that touches the Maildir at ``root`` a label such as ``"fsync message"``
or ``"rename envelope"``. Calls elsewhere pass straight through. Root can run the tests, so
permissions cannot make the disk fail; an injected ``OSError(ENOSPC)`` can, at any step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# The steps of one delivery, in the order MaildirBus.deliver takes them.
DELIVERY_STEPS = (
    "open message",
    "write message",
    "fsync message",
    "open envelope",
    "write envelope",
    "fsync envelope",
    "rename envelope",
    "open envelope/",
    "fsync envelope/",
    "rename message",
    "open new/",
    "fsync new/",
)


class _File:
    """A file object whose writes are announced first."""

    def __init__(self, real: Any, before: Callable[[], None], closed: Callable[[], None]) -> None:
        self._real = real
        self._before = before
        self._closed = closed

    def write(self, data: bytes) -> int:
        self._before()
        return int(self._real.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed()
        self._real.close()


class StepSpy:
    """Label the Maildir's file-system calls; ``action(label)`` runs before each one."""

    def __init__(self, root: str, action: Callable[[str], None] | None = None) -> None:
        self.root = os.path.abspath(root)
        self.action = action or (lambda label: None)
        self.steps: list[str] = []
        self._fds: dict[int, str] = {}
        self.originals = {
            name: getattr(os, name) for name in ("open", "fdopen", "fsync", "rename", "close")
        }

    def _target(self, path: Any) -> str | None:
        path = os.path.abspath(os.fsdecode(path))
        rel = os.path.relpath(path, self.root)
        if rel.startswith(".."):
            return None
        parts = rel.split(os.sep)
        if len(parts) == 1:
            return f"{parts[0]}/"
        if parts[0] == "envelope":
            return "envelope"
        return "message"

    def _step(self, label: str) -> None:
        self.steps.append(label)
        self.action(label)

    def open(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        target = self._target(path)
        if target is not None:
            self._step(f"open {target}")
        fd = int(self.originals["open"](path, flags, *args, **kwargs))
        if target is not None:
            self._fds[fd] = target
        return fd

    def fdopen(self, fd: int, *args: Any, **kwargs: Any) -> Any:
        real = self.originals["fdopen"](fd, *args, **kwargs)
        target = self._fds.get(fd)
        if target is None:
            return real
        return _File(real, lambda: self._step(f"write {target}"), lambda: self._fds.pop(fd, None))

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self.originals["close"](fd)

    def fsync(self, fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        target = self._fds.get(number)
        if target is not None:
            self._step(f"fsync {target}")
        self.originals["fsync"](fd)

    def rename(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        target = self._target(dst)
        if target is not None:
            self._step(f"rename {target}")
        self.originals["rename"](src, dst, *args, **kwargs)

    def install(self, setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
        """Patch the ``os`` module (pass ``monkeypatch.setattr`` in pytest)."""
        for name in self.originals:
            setattr_(os, name, getattr(self, name))


def fail_at(step: str, error: int) -> Callable[[str], None]:
    """An action raising ``OSError(error)`` the first time ``step`` is reached."""
    fired = []

    def action(label: str) -> None:
        if label == step and not fired:
            fired.append(label)
            raise OSError(error, os.strerror(error))

    return action
