"""SMTP replies: a code, an enhanced status code (RFC 3463) and text, rendered for the wire.

A :class:`Reply` is mutable on purpose: validators receive the reply the server proposes and
reject or rewrite it in place, as python-slimta's validators did. The module-level templates are
never handed out directly; :func:`Reply.copy` or the helper constructors make fresh ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Reply"]

_ESC = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_CODE = re.compile(r"^[2-5][0-9][0-9]$")


@dataclass(init=False)
class Reply:
    """One SMTP reply.

    :ivar code: the three-digit reply code as a string, e.g. ``"250"``.
    :ivar message: the human-readable text; ``\\n`` separates the lines of a multi-line reply.
    :ivar enhanced_status_code: ``"x.y.z"`` (RFC 3463), or ``None`` for replies that carry
        none (the greeting, EHLO/HELO replies, 3xx intermediate replies). When ``None`` on a
        2xx/4xx/5xx reply that should carry one, :meth:`render` derives ``"<class>.0.0"``.
    """

    code: str = "250"
    message: str = ""
    enhanced_status_code: str | None = None

    def __init__(
        self, code: str = "250", message: str = "", enhanced_status_code: str | None = None
    ) -> None:
        # Written out (not generated with a __post_init__): a few replies are made per message.
        self.code = code if type(code) is str else str(code)
        self.message = message
        self.enhanced_status_code = enhanced_status_code

    # -- classification ---------------------------------------------------------------------

    @property
    def is_positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return self.code[:1] in ("2", "3")

    @property
    def is_error(self) -> bool:
        """True for 4xx and 5xx replies."""
        return self.code[:1] in ("4", "5")

    @property
    def closes_connection(self) -> bool:
        """A 421 or 221 reply ends the session once written (RFC 5321 section 3.8)."""
        return self.code in ("421", "221")

    def copy(self) -> Reply:
        return Reply(self.code, self.message, self.enhanced_status_code)

    def set(self, code: str, message: str, enhanced_status_code: str | None = None) -> Reply:
        """Change the reply in place (the usual way for a validator to reject); returns self."""
        self.code = str(code)
        self.message = message
        self.enhanced_status_code = enhanced_status_code
        return self

    # -- rendering ------------------------------------------------------------------------

    def effective_enhanced_code(self, with_enhanced: bool = True) -> str | None:
        """The x.y.z that goes on the wire for this reply, or None."""
        if not with_enhanced:
            return None
        code = self.code
        if code in _VALID_CODES:  # the usual case, without regular expressions
            if code[0] == "3":
                return None
            esc = self.enhanced_status_code
            if esc is not None and esc[:1] == code[0] and (esc in _FAST_ESC or _ESC.match(esc)):
                return esc
            return f"{code[0]}.0.0"
        if not _CODE.match(self.code):
            return "4.0.0"  # an invalid code is rendered as 451
        if self.code[:1] not in ("2", "4", "5"):
            return None
        esc = self.enhanced_status_code
        if esc is not None and _ESC.match(esc) and esc[0] == self.code[0]:
            return esc
        return f"{self.code[0]}.0.0"

    def render(self, with_enhanced: bool = True) -> bytes:
        """The reply as CRLF-terminated wire lines.

        Text is sanitised: CR, LF and other control characters never reach the wire from a
        message, so a validator cannot inject a reply line by accident.
        """
        message = self.message or ""
        if (
            self.code in _VALID_CODES
            and message.isprintable()
            and message == message.strip()
            and (not with_enhanced or self.enhanced_status_code in _FAST_ESC)
        ):
            # The common case (one clean line, a usual code): no regular expressions.
            esc = self.enhanced_status_code if with_enhanced else None
            if esc is not None and esc[0] == self.code[0]:
                if message:  # no trailing space to strip (message == message.strip())
                    return f"{self.code} {esc} {message}\r\n".encode()
                return f"{self.code} {esc}\r\n".encode()
            if not with_enhanced or self.code[0] == "3":
                if message:
                    return f"{self.code} {message}\r\n".encode()
                return f"{self.code}\r\n".encode()
        elif not with_enhanced and self.code in _VALID_CODES and "\n" in message:
            # A clean multi-line reply without enhanced codes (EHLO's): no regular expressions.
            # The lines after the first (EHLO's keywords: the same for every session of an
            # edge) are checked and rendered once, then taken from a small cache.
            code = self.code
            head, _, tail = message.partition("\n")
            rendered = _TAILS.get((code, tail))
            if rendered is None:
                lines = tail.split("\n")
                if all(line and line.isprintable() and line == line.strip() for line in lines):
                    final = lines.pop()
                    rendered = (
                        "".join([f"{code}-{line}\r\n" for line in lines]) + f"{code} {final}\r\n"
                    ).encode()
                    if len(_TAILS) >= _TAILS_KEPT:
                        _TAILS.clear()
                    _TAILS[code, tail] = rendered
            if rendered is not None and head and head.isprintable() and head == head.strip():
                return f"{code}-{head}\r\n".encode() + rendered
        code = self.code if _CODE.match(self.code) else "451"
        esc = self.effective_enhanced_code(with_enhanced)
        lines = [_clean(line) for line in (self.message or "").split("\n")] or [""]
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            parts = [p for p in (esc, line) if p]
            out.append(f"{code}{sep}{' '.join(parts)}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")  # a lone surrogate becomes "?"

    def __str__(self) -> str:
        return self.render().decode("utf-8").rstrip("\r\n")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# (code, the lines after the first of a clean multi-line reply) -> those lines on the wire.
_TAILS: dict[tuple[str, str], bytes] = {}
_TAILS_KEPT = 64  # the cache is emptied when it holds this many (validators' texts vary)
_VALID_CODES = frozenset(f"{n}" for n in range(200, 600))
# Enhanced codes the fast path may print as they are (None: 3xx replies carry none).
_FAST_ESC = frozenset(
    {None} | {f"{c}.{s}.{d}" for c in "245" for s in range(8) for d in range(10)}
)


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()
