"""The DATA body decoder, without I/O.

Bytes go in as they arrive; unstuffed message bytes come out to a sink; the decoder says when
the end of data was seen and hands back whatever followed it (pipelined commands).

The rules, each of which some SMTP server has got wrong:

- The end of data is ``CRLF "." CRLF`` and nothing else: the ``.`` line must start after a real
  CRLF (the DATA command's own line ending counts) and end with a real CRLF. ``\\n.\\n``,
  ``\\n.\\r\\n``, ``\\r.\\r``, ``\\r\\n.\\n``, ``\\r\\n.\\r\\r\\n`` and their kin are
  message content (SMTP smuggling, 2023).
- Bare CR or LF (one not part of CRLF) is either refused (policy ``reject``: the message is
  drained to its real end and then refused) or, for bare LF, treated as a line ending and
  stored as CRLF (policy ``normalize``, Postfix's ``smtpd_forbid_bare_newline = normalize``).
  Neither policy lets a bare LF end the data.
- Dot-unstuffing (RFC 5321 4.5.2) removes one leading dot from every line.
- Over the size limit or with an over-long line, the decoder keeps reading to the real end of
  data and stores nothing more; the caller reports the failure after the end, so the session
  stays in step with the client.
- The line limit (RFC 5321 4.5.3.1.6: 1000 octets, CRLF included, "not counting the leading
  dot duplicated for transparency") applies to each line as it is stored: after unstuffing,
  and after a bare LF became CRLF under ``normalize``. BDAT content has no stuffing, so there
  the stored line is the line sent; a last line without CRLF counts as if it had one (whoever
  passes the message on adds it).
- Memory is bounded: at most one partial line (capped) is kept between calls.
- NUL octets (:class:`NulPolicy`): accepted, refused after the end, or stripped from what is
  stored (after the end of data and the line lengths were decided, so stripping never makes
  an end marker or changes a verdict).
- BINARYMIME content (RFC 3030, ``binary=True``) is octets, not lines: only the size counts.

The hot path works on whole chunks, never one Python call per line. When the optional C
accelerator (:mod:`slimta_tx._speedups`, built with the wheel) is present, clean input (every CR
and LF in a CRLF pair) is checked, unstuffed and searched for the end in one pass over the bytes;
it hands anything else back to the pure-Python code below, which owns every rule and runs alone
where the accelerator is missing (or with ``SLIMTA_TX_PURE_PYTHON=1`` in the environment).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from enum import Enum

__all__ = ["BareNewlinePolicy", "DataDecoder", "DataResult", "NulPolicy"]

_END = b"\r\n.\r\n"
# Keep a partial line of up to this many bytes when lines are unlimited.
_FLUSH_UNLIMITED = 64 * 1024
_BARE_LF = re.compile(rb"(?<!\r)\n")
_NOT_CR_OR_LF = bytes(b for b in range(256) if b not in (10, 13))

Scan = Callable[[bytes, int, bool, bool, int], "tuple[bytes, int, bool, bool] | None"]


def _load_accelerator() -> Scan | None:
    if os.environ.get("SLIMTA_TX_PURE_PYTHON"):
        return None
    try:
        from slimta_tx._speedups import scan
    except ImportError:
        return None
    return scan


#: The C scanner in use, or None when the pure-Python decoder runs alone.
ACCELERATOR: Scan | None = _load_accelerator()


def _has_long_line(body: bytes, limit: int) -> bool:
    """True if ``body`` holds a run of ``limit`` or more bytes without LF.

    Each step jumps to the last LF inside the next ``limit`` bytes, so a run of ``limit``
    LF-free bytes is found where a window holds no LF; two steps always advance at least
    ``limit`` bytes, so this costs a few Python steps per kilobyte, not one per line.
    """
    pos, end = 0, len(body)
    while end - pos >= limit:
        last = body.rfind(b"\n", pos, pos + limit)
        if last < 0:
            return True
        pos = last + 1
    return False


class BareNewlinePolicy(str, Enum):
    REJECT = "reject"
    NORMALIZE = "normalize"


class NulPolicy(str, Enum):
    """NUL octets in a text body (RFC 5322 and RFC 6152 allow none; BINARYMIME is exempt)."""

    ACCEPT = "accept"  # stored as sent
    REJECT = "reject"  # the message is refused after its end (550 5.6.0)
    STRIP = "strip"  # removed from what is stored


_NUL_ACCEPT, _NUL_STRIP = NulPolicy.ACCEPT, NulPolicy.STRIP


class DataResult(str, Enum):
    """Why a finished message cannot be accepted (``OK`` when it can)."""

    OK = "ok"
    TOO_BIG = "too-big"
    LINE_TOO_LONG = "line-too-long"
    BARE_NEWLINE = "bare-newline"
    NUL = "nul"


class DataDecoder:
    """Incremental decoder of one DATA body.

    :param sink: called with each run of decoded message bytes, in order.
    :param max_size: largest acceptable message in bytes (after unstuffing); 0 for no limit.
    :param max_line_length: longest acceptable line in bytes as stored: CRLF included, a
        stuffed dot not (RFC 5321 4.5.3.1.6 says 1000); 0 for no limit.
    :param bare_newline: a :class:`BareNewlinePolicy`.
    :param unstuff: remove the leading dot of each line (DATA); False for BDAT chunks, which
        carry the message as it is (RFC 3030) and are fed with :meth:`feed_chunk`.
    :param accelerator: the C scanner (the built one by default); None for pure Python.
    :param nul: a :class:`NulPolicy` for NUL octets in the stored text.
    :param binary: BDAT content of a ``BODY=BINARYMIME`` message (RFC 3030): any octets, no
        lines; only the size limit applies (fed with :meth:`feed_chunk`).
    """

    def __init__(
        self,
        sink: Callable[[bytes], object],
        max_size: int = 0,
        max_line_length: int = 1000,
        bare_newline: BareNewlinePolicy | str = BareNewlinePolicy.REJECT,
        unstuff: bool = True,
        accelerator: Scan | None = ACCELERATOR,
        nul: NulPolicy | str = NulPolicy.ACCEPT,
        binary: bool = False,
    ) -> None:
        self._sink = sink
        self._scan = accelerator
        self.unstuff = unstuff
        # (An Enum call costs a few microseconds; a decoder is made per message.)
        self.nul_policy = nul if type(nul) is NulPolicy else NulPolicy(nul)
        self.binary = binary
        self.nul = False  # a NUL was seen under NulPolicy.REJECT
        self.max_size = max_size
        self.max_line_length = max_line_length
        self.policy = (
            bare_newline
            if type(bare_newline) is BareNewlinePolicy
            else BareNewlinePolicy(bare_newline)
        )
        # What preceded the pending bytes: b"\r\n" (line start after CRLF; the DATA line's own
        # CRLF at first), b"\n" (line start after a bare LF) or b"" (inside a line).
        self._head = b"\r\n"
        self._pending = b""
        self.size = 0
        self.raw_size = 0
        self.too_big = False
        self.line_too_long = False
        self.bare_newline = False
        self.done = False
        # A partial line this long is refused (and flushed): p bytes without LF make a stored
        # line of at least p + 1 octets (p if they start with a dot to unstuff and end with
        # the CR of the CRLF), so flushing at max (max + 1 when unstuffing) never refuses a
        # line that fits. Never flush a possible ".\r" of the end marker (limits < 3).
        if max_line_length:
            self._flush_at = max(max_line_length + (1 if unstuff else 0), 3)
        else:
            self._flush_at = _FLUSH_UNLIMITED

    @property
    def result(self) -> DataResult:
        if self.too_big:
            return DataResult.TOO_BIG
        if self.bare_newline:
            return DataResult.BARE_NEWLINE
        if self.line_too_long:
            return DataResult.LINE_TOO_LONG
        if self.nul:
            return DataResult.NUL
        return DataResult.OK

    def feed(self, data: bytes) -> bytes | None:
        """Decode ``data``; return None while the body goes on, else the bytes after its end."""
        if self.done:
            raise RuntimeError("feed() after the end of data")
        return self._decode(data, data_mode=True)

    def feed_chunk(self, data: bytes) -> None:
        """BDAT: ``data`` is message content as it is: no end marker, no dot-unstuffing.

        The same bare CR/LF, line length and size rules apply as for DATA, so that a message
        taken by BDAT cannot carry a fake end of data to a next hop that speaks DATA.
        """
        if self.done:
            raise RuntimeError("feed_chunk() after the end of the message")
        if self.binary:
            # BINARYMIME: octets, not lines; stored exactly as sent.
            self.raw_size += len(data)
            self.size += len(data)
            if self.max_size and self.size > self.max_size:
                self.too_big = True
            if not self.too_big and data:
                self._sink(data)
            return
        self._decode(data, data_mode=False)

    def _decode(self, data: bytes, data_mode: bool) -> bytes | None:
        """Decode the complete lines of what has arrived; keep the partial last line.

        ``data_mode``: DATA (look for the end marker; unstuff if ``self.unstuff``); else BDAT
        content (neither). Returns the bytes after the end marker once it is found.
        """
        self.raw_size += len(data)
        head = self._head
        head_len = len(head)
        work = head + self._pending + data
        if self._scan is not None and head != b"\n":
            scanned = self._scan(
                work, head_len, data_mode, data_mode and self.unstuff, self.max_line_length
            )
            if scanned is not None:
                # Clean lines (see slimta_tx._speedups): decoded already, and they end in CRLF.
                out, stop, ended, long_line = scanned
                if out:  # empty exactly when no complete line followed the head
                    self._account(out, long_line)
                if ended:
                    return self._end(work, stop)
                self._keep(work, stop, head_len, b"\r\n")
                return None
        dot = -1
        if data_mode:
            # Every end marker and every line to unstuff starts with CRLF "."; most chunks hold
            # none, and then one search answers both questions.
            dot = work.find(b"\r\n.")
            if dot >= 0:
                end = work.find(_END, dot)
                if end >= 0:
                    self._emit(work[: end + 2], head_len)
                    return self._end(work, end + 5)
        cut = work.rfind(b"\n") + 1
        if cut > head_len:
            region = work[:cut]
            self._emit(region, head_len, dots=0 <= dot < cut)
            self._keep(work, cut, head_len, b"\r\n" if region.endswith(b"\r\n") else b"\n")
        else:
            self._keep(work, cut, head_len, head)
        return None

    def _end(self, work: bytes, after: int) -> bytes:
        """The end marker was seen; ``work[after:]`` follows it (pipelined commands)."""
        self.done = True
        self._pending = b""
        return work[after:]

    def _keep(self, work: bytes, cut: int, head_len: int, head: bytes) -> None:
        """Keep what follows the decoded lines (``work[:cut]``, ending with ``head``)."""
        if cut > head_len:
            self._head = head
            self._pending = work[cut:]
        else:
            self._pending = work[head_len:]
        if len(self._pending) >= self._flush_at:
            self._flush_partial_line()

    def finish(self) -> None:
        """BDAT LAST: the message ends here. A last line without CRLF is kept as it is (a
        final bare CR counts as one); its length counts the CRLF a next hop will add."""
        pending = self._pending
        if pending:
            if self.max_line_length and len(pending) + 2 > self.max_line_length:
                self.line_too_long = True
            self._emit(self._head + pending, len(self._head), complete_lines=False)
            self._pending = b""
        self.done = True

    def _flush_partial_line(self) -> None:
        """A partial line too long to keep: account for it and keep only its last byte.

        The pending bytes hold no LF, so nothing in them can start or end the end-of-data
        sequence except a final CR, which is kept.
        """
        if self.max_line_length:
            self.line_too_long = True
        pending = self._pending
        keep = 1 if pending.endswith(b"\r") else 0
        chunk = pending[: len(pending) - keep]
        self._emit(self._head + chunk, len(self._head), complete_lines=False)
        self._head = b""
        self._pending = pending[len(pending) - keep :]

    def _emit(
        self, region: bytes, head_len: int, complete_lines: bool = True, dots: bool = True
    ) -> None:
        """Check and unstuff ``region``, which starts with the ``head_len``-byte head.

        ``dots=False`` says the caller knows ``region`` holds no CRLF "." (nothing to unstuff).
        """
        body = region[head_len:]
        if not body:
            return
        normalize = self.policy is BareNewlinePolicy.NORMALIZE
        if normalize and head_len == 1:
            # A line start reached by a bare LF is a line start like any other here.
            region, head_len, dots = b"\r\n" + body, 2, True
        # Clean when the real CRLF pairs account for every CR and LF byte. ``translate`` keeps
        # only CR and LF in one C pass (cheaper than counting each of them separately).
        marks = body.translate(None, _NOT_CR_OR_LF)
        crlf = body.count(b"\r\n")
        if crlf * 2 != len(marks):
            bare_lf = marks.count(b"\n") != crlf
            if not normalize:
                self.bare_newline = True
            elif bare_lf:
                # Bare CR stays content under "normalize", as in Postfix; bare LF becomes CRLF.
                region = _BARE_LF.sub(b"\r\n", region)
                dots = True  # a bare LF "." is now CRLF "."
        # split + join unstuffs about twice as fast as bytes.replace when there is a dot line.
        unstuff = dots and self.unstuff
        out = (b"\r\n".join(region.split(b"\r\n.")) if unstuff else region)[head_len:]
        # The limit is on lines as stored: a stuffed dot does not count (RFC 5321 4.5.3.1.6).
        long_line = bool(
            complete_lines and self.max_line_length and _has_long_line(out, self.max_line_length)
        )
        self._account(out, long_line)

    def _account(self, out: bytes, long_line: bool) -> None:
        """Count ``out`` (decoded bytes) and store it unless the message is refused."""
        if long_line:
            self.line_too_long = True
        if self.nul_policy is not _NUL_ACCEPT and b"\0" in out:
            if self.nul_policy is _NUL_STRIP:
                out = out.replace(b"\0", b"")
            else:
                self.nul = True
        # Count the same bytes whether or not the message is refused already, so that the
        # verdict (TOO_BIG first) does not depend on how the stream was chunked.
        self.size += len(out)
        if self.max_size and self.size > self.max_size:
            self.too_big = True
        if self.too_big or self.bare_newline or self.line_too_long or self.nul:
            return  # refused: keep counting, store nothing
        self._sink(out)
