"""Milters: the MTA side of the Sendmail 8 mail filter protocol (version 6), as Postfix speaks it.

``SmtpEdge(bus, policy, milters=[Milter("inet:127.0.0.1:11332"), ...])`` (or ``--milter`` for
``twistd slimta``) puts Rspamd, OpenDKIM, OpenDMARC, ClamAV and the like in the SMTP
conversation: they see the client, each command and the message while the client is still
connected, and may refuse, accept, discard, quarantine or change the message.

- :mod:`~slimta_tx.milter.codec`: the packets, sans I/O;
- :mod:`~slimta_tx.milter.config`: :class:`Milter` and the ``--milter`` syntax;
- :mod:`~slimta_tx.milter.client`: the Twisted connection and the connection limit;
- :mod:`~slimta_tx.milter.macros`: Sendmail macros and their values;
- :mod:`~slimta_tx.milter.message`: header fields, edits, body replacement (on spools);
- :mod:`~slimta_tx.milter.link`: one milter within one session: state, negotiation, answers;
- :mod:`~slimta_tx.milter.content`: the message stage to one milter, applying its changes;
- :mod:`~slimta_tx.milter.session`: the per-session driver the protocol calls at each step.
"""

from slimta_tx.milter.config import Milter, parse_milter
from slimta_tx.milter.session import Milters, MilterSession

__all__ = ["Milter", "MilterSession", "Milters", "parse_milter"]
