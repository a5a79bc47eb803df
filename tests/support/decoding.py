"""Decode a chunked body with a given DATA decoder set-up: what a user could notice of it.

Shared by the differential tests of the C accelerator (tests/test_data_accel.py) and the
fuzz harness (tests/fuzz/fuzz_decoder.py), which both compare the accelerated decoder with the
pure-Python one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimta_tx.data import DataDecoder, Scan


@dataclass(frozen=True)
class Outcome:
    stored: bytes
    result: str
    size: int
    raw_size: int
    done: bool
    rest: bytes | None  # what followed the end of data (DATA only)


def decode(chunks: list[bytes], accelerator: Scan | None, bdat: bool, **options: Any) -> Outcome:
    """Feed ``chunks`` as DATA (``feed``) or as BDAT content (``feed_chunk`` then ``finish``)."""
    writes: list[bytes] = []
    decoder = DataDecoder(writes.append, accelerator=accelerator, unstuff=not bdat, **options)
    rest: bytes | None = None
    for i, chunk in enumerate(chunks):
        if bdat:
            decoder.feed_chunk(chunk)
            continue
        got = decoder.feed(chunk)
        if got is not None:
            rest = got + b"".join(chunks[i + 1 :])
            break
    if bdat:
        decoder.finish()
    return Outcome(
        b"".join(writes),
        decoder.result.value,
        decoder.size,
        decoder.raw_size,
        decoder.done,
        rest,
    )
