"""The Maildir bus: durable local storage with group commit (see docs/maildir.md).

- :class:`MaildirBus`: the bus (``twistd slimta --maildir PATH``, the embedded default);
- :func:`read_envelopes`, :func:`envelope_of`: a stored message's envelope (sender,
  recipients, client facts), kept in ``PATH/envelope/*.jsonl``;
- :class:`MaildirStore`: the blocking writer under the bus, for programs that fill a Maildir
  the same way without a reactor (``examples/amqp_consumer.py``).
"""

from slimta_tx.bus.maildir.bus import MaildirBus
from slimta_tx.bus.maildir.journal import envelope_of, read_envelopes
from slimta_tx.bus.maildir.store import MaildirStore, StoredMessage

__all__ = ["MaildirBus", "MaildirStore", "StoredMessage", "envelope_of", "read_envelopes"]
