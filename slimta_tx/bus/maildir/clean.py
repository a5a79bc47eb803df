"""Housekeeping of a Maildir: what interrupted or failed deliveries leave behind.

None of it is visible to mail readers (they look in ``new/`` and ``cur/`` only); it only takes
space. :func:`clean` removes:

- files in ``tmp/`` older than ``older_than`` (the Maildir convention is 36 hours), and at once
  a ``tmp/`` name whose file is also in ``new/`` (a rename cut short on a file system without
  atomic renames, e.g. ext4 without a journal, leaves the file under both names);
- envelope journal segments that no writer appends to any more (untouched for
  ``2 * MAX_SEGMENT_AGE``; writers start a new segment every ``MAX_SEGMENT_AGE``) and whose
  messages are all gone from ``new/``, ``cur/`` and ``tmp/``;
- per-message envelope files of older releases (``<name>.json``, ``.<name>.json.tmp``) whose
  message is gone.
"""

from __future__ import annotations

import os
import time

from slimta_tx.bus.maildir.journal import (
    LEGACY_SUFFIX,
    MAX_SEGMENT_AGE,
    SEGMENT_SUFFIX,
    iter_segment,
    message_key,
)

__all__ = ["DEFAULT_TMP_AGE", "clean"]

DEFAULT_TMP_AGE = 36 * 3600.0
LEGACY_AGE = 60.0


def clean(
    path: str,
    older_than: float = DEFAULT_TMP_AGE,
    keep_segment: str | None = None,
    now: float | None = None,
) -> list[str]:
    """Remove leftovers under the Maildir ``path`` (see the module docstring); returns what
    went, as paths relative to ``path``. ``keep_segment`` is never removed (the caller's own)."""
    now = time.time() if now is None else now
    removed: list[str] = []
    tmp_dir = os.path.join(path, "tmp")
    env_dir = os.path.join(path, "envelope")
    # new/ before cur/: a message a reader moves from new/ to cur/ meanwhile is seen in one.
    in_new = set(os.listdir(os.path.join(path, "new")))
    present = in_new | {message_key(n) for n in os.listdir(os.path.join(path, "cur"))}

    in_tmp = set()
    for entry in os.scandir(tmp_dir):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # delivered (or removed) since the directory was read
        stale = st.st_mtime < now - older_than
        if not stale and entry.name in in_new:
            try:
                stale = os.stat(os.path.join(path, "new", entry.name)).st_ino == st.st_ino
            except OSError:
                stale = False
        if stale:
            _unlink(entry.path, f"tmp/{entry.name}", removed)
        else:
            in_tmp.add(entry.name)
    present |= in_tmp

    for entry in os.scandir(env_dir):
        name = entry.name
        if name == keep_segment:
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if name.endswith(SEGMENT_SUFFIX):
            if mtime >= now - 2 * MAX_SEGMENT_AGE:
                continue
            if any(r["maildir_name"] in present for r in iter_segment(entry.path)):
                continue
        elif name.endswith(LEGACY_SUFFIX) or name.endswith(LEGACY_SUFFIX + ".tmp"):
            base = name[1:].removesuffix(".json.tmp") if name.startswith(".") else name
            if base.removesuffix(LEGACY_SUFFIX) in present or mtime >= now - LEGACY_AGE:
                continue
        else:
            continue
        _unlink(entry.path, f"envelope/{name}", removed)
    return removed


def _unlink(path: str, label: str, removed: list[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    removed.append(label)
