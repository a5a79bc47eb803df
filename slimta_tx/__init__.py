"""slimta_tx: an ESMTP edge listener on Twisted.

The public names live here; the modules behind them are implementation detail (which modules
are public API: docs/architecture.md). Importing this package never installs a reactor and
never needs pika (the ``amqp`` extra): :class:`AmqpBus` loads it when it connects.
"""

from slimta_tx.accept import new
from slimta_tx.auth import Auth, AuthLimits
from slimta_tx.bus.amqp import AmqpBus
from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.bus.relay import RelayBus
from slimta_tx.bus.simple import DiscardBus
from slimta_tx.data import BareNewlinePolicy
from slimta_tx.envelope import Envelope, Session, TLSInfo
from slimta_tx.factory import SmtpEdge
from slimta_tx.interfaces import IBus
from slimta_tx.policy import Policy
from slimta_tx.reply import Reply
from slimta_tx.tls import ServerTLS, TLSConfigError
from slimta_tx.validators import SmtpValidators

#: The one place the version is written (pyproject.toml reads it: [tool.hatch.version]).
__version__ = "0.1.0"

__all__ = [
    "AmqpBus",
    "Auth",
    "AuthLimits",
    "BareNewlinePolicy",
    "DiscardBus",
    "Envelope",
    "IBus",
    "MaildirBus",
    "Policy",
    "RelayBus",
    "Reply",
    "ServerTLS",
    "Session",
    "SmtpEdge",
    "SmtpValidators",
    "TLSConfigError",
    "TLSInfo",
    "__version__",
    "new",
]
