"""Sender and recipient lists: accept or reject by exact address, domain or pattern.

A list file has one rule per line, ``PATTERN ACTION``, in the spirit of Postfix access maps::

    # comments and blank lines are ignored
    spammer@example.net        REJECT
    example.org                REJECT   No mail from example.org, sorry
    .example.org               REJECT                (any subdomain of example.org)
    friend@example.org         OK                    (more specific: wins over the domain)
    postmaster@                OK                    (this local part at any domain)
    /^bounce-[0-9]+@/          REJECT                (a Python regular expression)
    <>                         OK                    (the null sender, MAIL FROM:<>)
    *                          550 5.1.1 No such user here   (anything not matched above)

``ACTION`` is ``OK`` (or ``ACCEPT``): accepted by the list, no later rule applies; ``REJECT``
with optional text: the list's default refusal (``550 5.7.1``); or a reply of its own:
``CODE [X.Y.Z] text`` with a 4xx or 5xx code.

The most specific rule wins, whatever the order of the lines: the exact address, then its
domain, then each parent domain (``.example.org`` rules, nearest first), then ``local@``, then
the first matching ``/regex/`` in file order, then ``*``. Matching ignores case.

:meth:`AddressList.reload` reads the files again (``twistd slimta`` does it on SIGHUP); a file
with a mistake is reported in the log and the previous rules stay in force.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from slimta_tx.address import split_address
from slimta_tx.reply import Reply

if TYPE_CHECKING:  # pragma: no cover
    from slimta_tx.envelope import Session
    from slimta_tx.factory import SmtpEdge

__all__ = [
    "AddressList",
    "ListError",
    "ListPolicy",
    "Rule",
    "recipient_list",
    "sender_list",
]

_CODE = re.compile(r"^[45]\d\d$")
_ESC = re.compile(r"^[45]\.\d{1,3}\.\d{1,3}$")


class ListError(ValueError):
    """A list file that cannot be read or has a mistake (the message names file and line)."""


@dataclass(frozen=True)
class Rule:
    """One line of a list: its pattern, and None to accept or the refusal."""

    pattern: str
    refusal: Reply | None
    source: str = ""

    @property
    def accepts(self) -> bool:
        return self.refusal is None


class AddressList:
    """Rules read from ``paths`` (and/or given as ``text``), matched by specificity."""

    log = Logger()

    def __init__(
        self,
        paths: Sequence[str] = (),
        text: str = "",
        default_refusal: Reply | None = None,
    ) -> None:
        self.paths = list(paths)
        self.text = text
        self.default_refusal = default_refusal or Reply("550", "Access denied", "5.7.1")
        self._exact: dict[str, Rule] = {}
        self._domains: dict[str, Rule] = {}
        self._parents: dict[str, Rule] = {}
        self._locals: dict[str, Rule] = {}
        self._patterns: list[tuple[re.Pattern[str], Rule]] = []
        self._anything: Rule | None = None
        self._load()

    def __len__(self) -> int:
        return (
            len(self._exact)
            + len(self._domains)
            + len(self._parents)
            + len(self._locals)
            + len(self._patterns)
            + (self._anything is not None)
        )

    def reload(self) -> bool:
        """Read the files again; on a mistake, log it and keep the rules in force."""
        try:
            self._load()
        except ListError as e:
            self.log.error("list not reloaded, previous rules kept: {error}", error=str(e))
            return False
        self.log.info("reloaded {paths}: {count} rules", paths=self.paths, count=len(self))
        return True

    def match(self, address: str) -> Rule | None:
        """The rule for ``address`` (``""`` is the null sender), or None."""
        address = address.lower()
        rule = self._exact.get(address or "<>")
        if rule is not None or not address:
            return rule or self._anything
        local, domain = split_address(address)
        domain = domain.rstrip(".")
        if domain:
            rule = self._domains.get(domain)
            if rule is not None:
                return rule
            labels = domain.split(".")
            for i in range(1, len(labels)):
                rule = self._parents.get("." + ".".join(labels[i:]))
                if rule is not None:
                    return rule
        rule = self._locals.get(local + "@")
        if rule is not None:
            return rule
        for pattern, rule in self._patterns:
            if pattern.search(address):
                return rule
        return self._anything

    # -- parsing ---------------------------------------------------------------------------

    def _load(self) -> None:
        sources: list[tuple[str, str]] = []
        for path in self.paths:
            try:
                with open(path, encoding="utf-8") as f:
                    sources.append((path, f.read()))
            except (OSError, UnicodeDecodeError) as e:
                raise ListError(f"{path}: cannot read: {e}") from None
        if self.text:
            sources.append(("<text>", self.text))
        fresh = AddressList.__new__(AddressList)
        fresh._exact, fresh._domains, fresh._parents, fresh._locals = {}, {}, {}, {}
        fresh._patterns, fresh._anything = [], None
        for name, text in sources:
            for number, line in enumerate(text.splitlines(), 1):
                rule = self._parse(line, f"{name}:{number}")
                if rule is not None:
                    fresh._add(rule)
        # Swap in one go: a lookup never sees half a list.
        self._exact, self._domains, self._parents = fresh._exact, fresh._domains, fresh._parents
        self._locals, self._patterns, self._anything = (
            fresh._locals,
            fresh._patterns,
            fresh._anything,
        )

    def _parse(self, line: str, source: str) -> Rule | None:
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        if line.startswith("/"):
            end = line.rfind("/")
            if end == 0:
                raise ListError(f"{source}: a pattern needs a closing '/': {line!r}")
            pattern, rest = line[: end + 1], line[end + 1 :].strip()
        else:
            pattern, _, rest = line.partition(" ")
            pattern, rest = pattern.lower(), rest.strip()
        if not rest:
            raise ListError(f"{source}: no action after {pattern!r} (OK, REJECT or a reply)")
        return Rule(pattern, self._action(rest, source), source)

    def _action(self, text: str, source: str) -> Reply | None:
        word, _, rest = text.partition(" ")
        if word.upper() in ("OK", "ACCEPT"):
            return None
        if word.upper() == "REJECT":
            refusal = self.default_refusal.copy()
            if rest.strip():
                refusal.message = rest.strip()
            return refusal
        if _CODE.match(word):
            esc, _, message = rest.strip().partition(" ")
            if not _ESC.match(esc) or esc[0] != word[0]:
                esc, message = f"{word[0]}.7.1", rest.strip()
            return Reply(word, message or "Access denied", esc)
        raise ListError(f"{source}: unknown action {word!r} (OK, REJECT or a 4xx/5xx reply)")

    def _add(self, rule: Rule) -> None:
        pattern = rule.pattern
        if pattern.startswith("/"):
            try:
                compiled = re.compile(pattern[1:-1], re.IGNORECASE)
            except re.error as e:
                raise ListError(f"{rule.source}: bad pattern {pattern!r}: {e}") from None
            self._patterns.append((compiled, rule))
        elif pattern == "*":
            self._anything = rule
        elif pattern == "<>":
            self._exact["<>"] = rule
        elif pattern.endswith("@"):
            self._locals[pattern] = rule
        elif pattern.startswith("@"):
            self._domains[pattern[1:].rstrip(".")] = rule
        elif pattern.startswith("."):
            self._parents[pattern.rstrip(".")] = rule
        elif "@" in pattern:
            self._exact[pattern] = rule
        else:
            self._domains[pattern.rstrip(".")] = rule


class ListPolicy:
    """Apply an :class:`AddressList` to the sender (``MAIL``) or each recipient (``RCPT``)."""

    log = Logger()

    def __init__(self, addresses: AddressList, command: str) -> None:
        if command.upper() not in ("MAIL", "RCPT"):
            raise ValueError(f"lists apply to MAIL or RCPT, not {command!r}")
        self.addresses = addresses
        self.command = command.upper()
        self.edge: SmtpEdge | None = None

    def install(self, edge: SmtpEdge) -> None:
        self.edge = edge
        edge.validators.add_check(self.command, self.check)

    def check(self, session: Session, reply: Reply, address: str, *extra: Any) -> None:
        rule = self.addresses.match(address)
        if rule is None or rule.refusal is None:
            return
        what = "Sender" if self.command == "MAIL" else "Recipient"
        refusal = rule.refusal
        message = f"<{address}>: {what} address rejected: {refusal.message}"
        reply.set(refusal.code, message, refusal.enhanced_status_code)
        if self.edge is not None:
            self.edge.events.rejected(session, "lists", reply, detail=str(rule.source))


def sender_list(*paths: str, text: str = "") -> ListPolicy:
    """A sender list from files (and/or ``text``) for ``MAIL FROM``."""
    return ListPolicy(AddressList(paths, text), "MAIL")


def recipient_list(*paths: str, text: str = "") -> ListPolicy:
    """A recipient list from files (and/or ``text``) for ``RCPT TO``."""
    return ListPolicy(AddressList(paths, text), "RCPT")
