"""The label values of the edge's metrics: closed sets, never what a client sent.

Every function here maps a fact to one of a few known strings (anything else becomes
``"other"``), so a metric has a bounded number of series whatever clients, next hops or
plug-ins say. Plain functions, without prometheus_client: the sink and its tests use them.
"""

from __future__ import annotations

from slimta_tx.events import REJECTION_REASONS, TIME_LIMITS
from slimta_tx.state import State

__all__ = [
    "AUTH_MECHANISMS",
    "OTHER",
    "STATES",
    "TLS_VERSIONS",
    "auth_mechanism",
    "bus_kind",
    "rejection_reason",
    "reply_code",
    "state",
    "time_limit",
    "tls_version",
]

OTHER = "other"

#: The SASL mechanisms a label may name (IANA's registry, those an MX meets).
AUTH_MECHANISMS = frozenset(
    {
        "PLAIN",
        "LOGIN",
        "CRAM-MD5",
        "DIGEST-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
        "XOAUTH2",
        "OAUTHBEARER",
        "EXTERNAL",
        "ANONYMOUS",
        "GSSAPI",
    }
)

#: OpenSSL's protocol names (``SSL_get_version``).
TLS_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})

#: The session states (slimta_tx.state.State values).
STATES = frozenset(s.value for s in State)

#: The buses ``twistd slimta`` builds, by class name.
_BUS_KINDS = {
    "MaildirBus": "maildir",
    "RelayBus": "relay",
    "AmqpBus": "amqp",
    "ChainBus": "chain",
    "TeeBus": "tee",
}

_FIRST_DIGITS = frozenset("2345")
_SUBJECTS = frozenset("01234567")  # RFC 3463's subjects (X.0.x to X.7.x)


def reply_code(code: str, enhanced: str | None) -> str:
    """The ``code`` label of a reply: its first digit and its enhanced code's class and
    subject, ``"2.0.x"``, ``"5.7.x"`` (``"4.x.x"`` without an enhanced code): at most 36
    values, whatever a validator or a next hop answers."""
    first = code[:1]
    if first not in _FIRST_DIGITS or len(code) != 3 or not code.isdigit():
        return OTHER
    if enhanced and enhanced[:1] == first and enhanced[1:2] == ".":
        subject = enhanced[2:].split(".", 1)[0]
        if subject in _SUBJECTS:
            return f"{first}.{subject}.x"
    return f"{first}.x.x"


def rejection_reason(reason: str) -> str:
    return reason if reason in REJECTION_REASONS else OTHER


def time_limit(limit: str) -> str:
    return limit if limit in TIME_LIMITS else OTHER


def state(value: str) -> str:
    return value if value in STATES else OTHER


def tls_version(version: str | None) -> str:
    return version if version in TLS_VERSIONS else OTHER


def auth_mechanism(name: str | None) -> str:
    name = (name or "").upper()
    return name if name in AUTH_MECHANISMS else OTHER


def bus_kind(bus: object) -> str:
    """``maildir``, ``relay``, ``amqp``, ``chain``, ``tee``; a bus of your own: its
    ``metrics_name`` attribute if it has a short identifier there, else ``other``."""
    name = getattr(bus, "metrics_name", None)
    if (
        isinstance(name, str)
        and 0 < len(name) <= 32
        and name.isascii()
        and name.replace("_", "a").isalnum()
    ):
        return name.lower()
    return _BUS_KINDS.get(type(bus).__name__, OTHER)
