"""Built-in policies an MX needs, each usable from Python and from ``twistd slimta`` options.

Each policy is an object with ``install(edge)``, which registers its checks on the edge's
validators (see :mod:`slimta_tx.validators`: checks run before your own validator, in the order
the policies were installed)::

    from slimta_tx.policies import ConnectionLimits, DnsblPolicy, ReverseDnsPolicy

    for policy in (
        ConnectionLimits(max_connections=10, max_rate=(30, 60.0)),
        ReverseDnsPolicy(),
        DnsblPolicy(blocklists=["zen.spamhaus.org"], allowlists=["list.dnswl.org"]),
    ):
        policy.install(edge)

No open relay is not here: it is the edge's default (``Policy.trusted_networks``,
``Policy.accepted_domains``, authenticated clients).
"""

from slimta_tx.policies.dnsbl import DnsblPolicy
from slimta_tx.policies.early_talker import EarlyTalkerPolicy
from slimta_tx.policies.limits import ConnectionLimits
from slimta_tx.policies.lists import (
    AddressList,
    ListError,
    ListPolicy,
    recipient_list,
    sender_list,
)
from slimta_tx.policies.rdns import ReverseDnsPolicy

__all__ = [
    "AddressList",
    "ConnectionLimits",
    "DnsblPolicy",
    "EarlyTalkerPolicy",
    "ListError",
    "ListPolicy",
    "ReverseDnsPolicy",
    "recipient_list",
    "sender_list",
]
