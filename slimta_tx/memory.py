"""Give freed heap memory back to the system after a burst (glibc only).

What bench/soak.py found under hostile input: the live Python objects do not grow
(``tracemalloc`` between rounds) and nothing of a closed connection stays reachable (no session,
timer, Deferred or TLS object survives it). Resident memory grew because glibc's ``malloc``
keeps freed memory in its heap, and the heap fragmented: each socket read is a 64 KiB
allocation shrunk to what arrived, and a chunk kept alive between reads split the space the
next read needed (:mod:`slimta_tx.lines` now lets go of it). What remains is the allocator
settling; but after a burst (a thousand connections reading at once) the heap keeps the
peak's free memory resident for good.

:class:`MemoryTrimmer` looks every ``interval`` seconds at how much free memory the heap
holds (``mallinfo2``) and, past ``threshold`` bytes, calls ``malloc_trim(0)``, which hands the
free pages back (well under a millisecond). Below the threshold, or when resident memory has
grown by less than a quarter of it since the last trim, it does nothing: trimming a few MiB
only makes the allocator fault the same pages in again. Where the C library is not glibc it
does nothing at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["DEFAULT_TRIM_INTERVAL", "DEFAULT_TRIM_THRESHOLD", "HeapInfo", "MemoryTrimmer"]

#: Seconds between two looks at the heap.
DEFAULT_TRIM_INTERVAL = 60.0
#: Free heap bytes that make a trim worth it.
DEFAULT_TRIM_THRESHOLD = 16 * 1024 * 1024
_MIB = 1024 * 1024


@dataclass(frozen=True)
class HeapInfo:
    """``mallinfo2``: bytes the heap holds (main arena), of them in use and free."""

    heap: int
    in_use: int
    free: int


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]  # fmt: skip


def resident_bytes() -> int:
    """This process's resident memory (Linux), or 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Glibc:
    """``mallinfo2`` and ``malloc_trim`` of the running C library."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._trim = libc.malloc_trim
        self._trim.argtypes = [ctypes.c_size_t]
        self._trim.restype = ctypes.c_int
        self._info = libc.mallinfo2
        self._info.restype = _Mallinfo2

    def info(self) -> HeapInfo:
        raw = self._info()
        return HeapInfo(int(raw.arena), int(raw.uordblks), int(raw.fordblks))

    def trim(self) -> None:
        self._trim(0)


def glibc() -> Glibc | None:
    """The C library's allocator functions, or None where they are missing (not glibc 2.33+)."""
    try:
        return Glibc()
    except (OSError, AttributeError):
        return None


class MemoryTrimmer(TimerService):
    """Every ``interval`` seconds, trim the heap if it holds ``threshold`` free bytes or more.

    :param allocator: ``info()`` and ``trim()`` (default: glibc's, if any).
    """

    log = Logger()

    def __init__(
        self,
        interval: float = DEFAULT_TRIM_INTERVAL,
        threshold: int = DEFAULT_TRIM_THRESHOLD,
        reactor: IReactorTime | None = None,
        allocator: Any = None,
    ) -> None:
        super().__init__(interval, self.check)
        if reactor is not None:
            self.clock = reactor
        self.threshold = threshold
        self.allocator = allocator if allocator is not None else glibc()
        self.trims = 0
        self.on_trim: Callable[[HeapInfo, HeapInfo], object] | None = None
        self.resident: Callable[[], int] = resident_bytes
        self._resident_after = 0  # after the last trim

    def startService(self) -> None:
        if self.allocator is None:
            self.log.info("memory: no glibc malloc_trim here; freed heap memory stays with malloc")
            return
        super().startService()

    def check(self) -> None:
        allocator = self.allocator
        if allocator is None:
            return
        before = allocator.info()
        if before.free < self.threshold:
            return
        if self.resident() < self._resident_after + self.threshold // 4:
            return  # trimmed already, and little has been faulted in again since
        allocator.trim()
        after = allocator.info()
        self._resident_after = self.resident()
        self.trims += 1
        self.log.info(
            "memory: returned the heap's free memory to the system ({free:.1f} MiB free of "
            "{heap:.1f} MiB; {in_use:.1f} MiB in use)",
            free=before.free / _MIB,
            heap=before.heap / _MIB,
            in_use=after.in_use / _MIB,
        )
        if self.on_trim is not None:
            self.on_trim(before, after)
