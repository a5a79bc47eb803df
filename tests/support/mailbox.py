"""Read back what MaildirBus stored: trace headers, message bytes and envelope record."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimta_tx.bus.maildir import read_envelopes


@dataclass
class Stored:
    name: str
    trace: bytes  # Return-Path: and Received: as written by the edge
    body: bytes  # exactly what the client sent (after dot-unstuffing)
    envelope: dict[str, Any] | None  # its record in the envelope journal, or None when missing

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def split_trace(content: bytes) -> tuple[bytes, bytes]:
    """(Return-Path + Received header, the rest) of a delivered file."""
    assert content.startswith(b"Return-Path: <"), content[:80]
    end = content.index(b"\r\n") + 2
    assert content[end:].startswith(b"Received: "), content[:300]
    end = content.index(b"\r\n", end) + 2
    while content[end : end + 1] == b"\t":
        end = content.index(b"\r\n", end) + 2
    return content[:end], content[end:]


def stored_messages(maildir: str | os.PathLike[str]) -> list[Stored]:
    """Messages in ``new/``, oldest first, each with its envelope record."""
    root = Path(maildir)
    envelopes = read_envelopes(root)
    found = []
    for name in os.listdir(root / "new"):
        trace, body = split_trace((root / "new" / name).read_bytes())
        found.append(Stored(name, trace, body, envelopes.get(name)))
    return sorted(found, key=lambda s: (s.envelope or {}).get("received_at", 0.0))


def file_sha256(path: str | os.PathLike[str], skip: int = 0) -> str:
    """Hash a (large) file from byte ``skip`` on without reading it all into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
