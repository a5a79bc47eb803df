"""Differential fuzzing of the DATA decoder's C accelerator (run by hand, not by pytest).

Each input is decoded twice, with the accelerator and without it, and everything a user could
notice must agree: the stored bytes, the verdict, the sizes, the end of data and what follows
it. ``run_sanitized.sh`` builds the accelerator with AddressSanitizer and UBSan and runs this
under atheris (libFuzzer for Python); any out-of-bounds read or write aborts with a report.

    tests/fuzz/run_sanitized.sh 300        # seconds

The module under test is loaded from ``SLIMTA_TX_SPEEDUPS`` (a path to a built
``_speedups*.so``), or is the installed one.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from slimta_tx.data import BareNewlinePolicy, DataDecoder, NulPolicy
from tests.support.decoding import decode

for method in ("_decode", "_emit", "_account", "_keep", "_end", "_flush_partial_line", "finish"):
    atheris.instrument_func(getattr(DataDecoder, method))


def load_scan():  # type: ignore[no-untyped-def]
    path = os.environ.get("SLIMTA_TX_SPEEDUPS")
    if not path:
        from slimta_tx._speedups import scan

        return scan
    spec = importlib.util.spec_from_file_location("slimta_tx._speedups", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.scan


SCAN = load_scan()
POLICIES = list(BareNewlinePolicy)
NULS = list(NulPolicy)
LINE_LIMITS = [0, 1, 2, 3, 4, 5, 9, 1000]
SIZE_LIMITS = [0, 1, 5, 30, 1000]


def one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    options = {
        "bare_newline": POLICIES[fdp.ConsumeIntInRange(0, len(POLICIES) - 1)],
        "max_line_length": LINE_LIMITS[fdp.ConsumeIntInRange(0, len(LINE_LIMITS) - 1)],
        "max_size": SIZE_LIMITS[fdp.ConsumeIntInRange(0, len(SIZE_LIMITS) - 1)],
        "nul": NULS[fdp.ConsumeIntInRange(0, len(NULS) - 1)],
    }
    bdat = fdp.ConsumeBool()
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 6)))
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    edges = [0, *(min(c, len(data)) for c in cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(edges) if b > a] or [b""]
    fast = decode(chunks, SCAN, bdat, **options)
    slow = decode(chunks, None, bdat, **options)
    if fast != slow:
        raise AssertionError(f"decoders differ on {chunks!r} {options} bdat={bdat}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
