"""Buses: where accepted messages go.

- :class:`MaildirBus`: the embedded default (durable files, no other service);
- :class:`RelayBus`: the next hop over SMTP or LMTP;
- :class:`AmqpBus`: RabbitMQ with publisher confirms (needs the ``amqp`` extra: pika);
- :class:`ChainBus`, :class:`TeeBus`, :func:`optional`: compose buses;
- :class:`DiscardBus`: stores nothing (benchmarks only).
"""

from slimta_tx.bus.amqp import AmqpBus
from slimta_tx.bus.compose import ChainBus, TeeBus, optional
from slimta_tx.bus.maildir import MaildirBus
from slimta_tx.bus.relay import RelayBus
from slimta_tx.bus.simple import DiscardBus

__all__ = ["AmqpBus", "ChainBus", "DiscardBus", "MaildirBus", "RelayBus", "TeeBus", "optional"]
