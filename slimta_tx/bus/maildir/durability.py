"""Which way of making a batch durable is right for the file system a Maildir is on.

``journal`` needs what only a journalling ext4 gives: one journal, committed in order, so that
a commit carrying a batch's renames also carries every earlier change (each file's size and
block map). It is chosen only when the Maildir's file system is ext4 and its options (read
from ``/proc/fs/ext4/<device>/options``) say ``data=ordered`` or ``data=writeback``. Anything
else (no journal, ``data=journal``, another file system, no ``/proc``) gets ``per-file``,
which relies on nothing beyond ``fdatasync`` and ``fsync`` of a directory.
"""

from __future__ import annotations

import os

__all__ = ["MODES", "detect", "ext4_journal_mode"]

MODES = ("auto", "per-file", "journal")


def detect(path: str) -> str:
    """``journal`` or ``per-file`` for the directory ``path`` (see the module docstring)."""
    try:
        data_mode = ext4_journal_mode(path)
    except OSError:
        return "per-file"
    return "journal" if data_mode in ("ordered", "writeback") else "per-file"


def ext4_journal_mode(path: str, proc: str = "/proc", sys: str = "/sys") -> str | None:
    """The ``data=`` mode of the ext4 file system holding ``path``, or None (not ext4, or
    ext4 without a journal). Raises OSError when it cannot tell."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    with open(os.path.join(proc, "self", "mountinfo"), encoding="utf-8") as f:
        fstype = mount_fstype(f.read(), device)
    if fstype != "ext4":
        return None
    # /proc/fs/ext4/ is named by the block device (sda1, dm-0, nvme0n1p2, loop0).
    name = os.path.basename(os.path.realpath(os.path.join(sys, "dev", "block", device)))
    with open(os.path.join(proc, "fs", "ext4", name, "options"), encoding="utf-8") as f:
        return data_mode(f.read())


def mount_fstype(mountinfo: str, device: str) -> str | None:
    """The file system type of the mount of ``device`` (``major:minor``) in a mountinfo."""
    for line in mountinfo.splitlines():
        fields = line.split()
        # id parent major:minor root mountpoint options [optional...] - fstype source super
        if len(fields) > 2 and fields[2] == device and "-" in fields:
            return fields[fields.index("-") + 1]
    return None


def data_mode(options: str) -> str | None:
    """``ordered``/``writeback``/``journal`` from an ext4 options listing; None without a
    journal (ext4 lists ``data=`` only when it has one)."""
    for option in options.split():
        if option.startswith("data="):
            return option[len("data=") :]
    return None
