"""Buses: where accepted messages go. :class:`MaildirBus` is the embedded default."""

from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.bus.simple import DiscardBus

__all__ = ["DiscardBus", "MaildirBus"]
