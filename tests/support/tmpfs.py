"""A small, really full filesystem for tests: a tmpfs of a few hundred KiB in a temp directory.

Mounting needs root (``CAP_SYS_ADMIN``). Where it is impossible the tests that need it skip,
saying why; under ``CI=true`` they fail instead, so a CI runner that lost the privilege does not
silently stop testing a full disk. A runner that can never mount (an unprivileged container)
says so explicitly with ``SLIMTA_TX_NO_MOUNT=1``, and then they skip there too. The injected
``OSError`` tests cover the same code paths without any privilege.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _cannot(problem: str) -> None:
    if os.environ.get("CI") == "true" and not os.environ.get("SLIMTA_TX_NO_MOUNT"):
        pytest.fail(f"{problem} (set SLIMTA_TX_NO_MOUNT=1 if this runner can never mount)")
    pytest.skip(problem)


@contextmanager
def small_tmpfs(size_kib: int = 512) -> Iterator[Path]:
    """Mount a ``size_kib`` KiB tmpfs on a fresh temporary directory; unmount and remove it."""
    mount = shutil.which("mount") or "/bin/mount"
    if os.geteuid() != 0:
        _cannot("mounting a tmpfs needs root; run the tests as root")
    directory = Path(tempfile.mkdtemp(prefix="slimta-tmpfs-"))
    try:
        done = subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "slimta-test", directory],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode != 0:
            _cannot(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
        try:
            yield directory
        finally:
            subprocess.run(
                ["umount", "-l", str(directory)], capture_output=True, timeout=10, check=False
            )
    finally:
        directory.rmdir()


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``path`` up to ``leave`` free bytes (or as close as it gets)."""
    filler = path / "filler"
    with open(filler, "wb") as out:
        chunk = b"\0" * 4096
        try:
            while free_bytes(path) > leave + len(chunk):
                out.write(chunk)
                out.flush()
        except OSError:
            pass
    return filler
