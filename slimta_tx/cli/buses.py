"""Bus options: where accepted mail goes (the embedded Maildir by default)."""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from slimta_tx.cli.coerce import seconds, whole_number
from slimta_tx.interfaces import IBus


class OptionGroup:
    optFlags: list[list[Any]] = [
        [
            "amqp-per-recipient",
            None,
            "With --amqp: one message per recipient, confirmed each ('{domain}' and "
            "'{recipient}' in --amqp-routing-key are filled in).",
        ],
    ]

    def opt_also_maildir(self, path: str) -> None:
        """Store a copy here first; 250 only if both copy and bus succeed (repeatable)"""
        self["also-maildir"].append(path)  # type: ignore[index]

    optParameters: list[list[Any]] = [
        ["maildir", None, "./var/maildir", "Store accepted mail in this Maildir."],
        ["amqp", None, None, "Publish accepted mail to RabbitMQ: amqp://user:pw@host:5672/vhost."],
        ["amqp-queue", None, None, "With --amqp: durable quorum queue (declared if missing)."],
        ["amqp-exchange", None, None, "With --amqp: existing exchange to publish to instead."],
        ["amqp-routing-key", None, "", "With --amqp-exchange: the routing key."],
        [
            "amqp-timeout",
            None,
            30.0,
            "Seconds to wait for the broker's confirm.",
            seconds("amqp-timeout"),
        ],
        ["bus", None, None, "A bus of your own: package.module:Class (see docs/buses.md)."],
        # The relay bus (docs/bus-relay.md).
        ["relay", None, None, "Forward accepted mail to this SMTP next hop: HOST:PORT."],
        ["relay-lmtp", None, None, "Forward accepted mail over LMTP: HOST:PORT or unix:PATH."],
        [
            "relay-tls",
            None,
            "opportunistic",
            "STARTTLS to the next hop: none|opportunistic|required.",
        ],
        [
            "relay-tls-ca",
            None,
            None,
            "PEM CA file for the next hop's certificate (default: system).",
        ],
        [
            "relay-tls-name",
            None,
            None,
            "Name the next hop's certificate must carry (default: host).",
        ],
        [
            "relay-auth",
            None,
            None,
            "AUTH to the next hop: USER:PASSWORD or file:PATH holding that.",
        ],
        [
            "relay-pool",
            None,
            10,
            "Connections to the next hop, at most.",
            whole_number("relay-pool", 1),
        ],
        [
            "relay-timeout",
            None,
            120.0,
            "Seconds to wait for the next hop.",
            seconds("relay-timeout"),
        ],
    ]


def defaults(config: Any) -> None:
    config["also-maildir"] = []


def validate(config: Any) -> None:
    _validate_amqp_and_plugin(config)
    _validate_relay(config)
    from slimta_tx.cli.startup import check_bus_paths

    check_bus_paths(config)


def _validate_relay(config: Any) -> None:
    from slimta_tx.bus.relay_options import validate_relay_options

    validate_relay_options(config)


def _validate_amqp_and_plugin(config: Any) -> None:
    chosen = [f"--{name}" for name in ("bus", "amqp", "relay", "relay-lmtp") if config.get(name)]
    if len(chosen) > 1:
        raise usage.UsageError(f"choose one bus: {' or '.join(chosen)}")
    if config["bus"]:
        from slimta_tx.bus.loader import BusLoadError, resolve

        try:
            resolve(config["bus"])
        except BusLoadError as e:
            raise usage.UsageError(f"--bus: {e}") from None
    if not config["amqp"]:
        if config["amqp-queue"] is not None or config["amqp-exchange"] is not None:
            raise usage.UsageError("--amqp-queue and --amqp-exchange need --amqp URL")
        if config["amqp-per-recipient"]:
            raise usage.UsageError("--amqp-per-recipient needs --amqp URL")
        return
    if not config["amqp"].lower().startswith(("amqp://", "amqps://")):
        raise usage.UsageError("--amqp takes a URL like amqp://user:password@host:5672/vhost")
    if (config["amqp-queue"] is None) == (config["amqp-exchange"] is None):
        raise usage.UsageError("--amqp needs --amqp-queue NAME or --amqp-exchange NAME")
    try:
        import pika
    except ImportError:
        raise usage.UsageError("--amqp needs pika: pip install 'slimta_tx[amqp]'") from None
    try:
        pika.URLParameters(config["amqp"])
    except Exception as e:
        raise usage.UsageError(f"--amqp: {e}") from None


def make_bus(config: Any, reactor: Any) -> IBus:
    """The chosen bus; with --also-maildir, a ChainBus of the Maildir copies then it."""
    bus = _chosen_bus(config, reactor)
    if config["also-maildir"]:
        from slimta_tx.bus.compose import ChainBus

        copies = [maildir_bus("also-maildir", path, reactor) for path in config["also-maildir"]]
        bus = ChainBus([*copies, bus])
    return bus


def _chosen_bus(config: Any, reactor: Any) -> IBus:
    if config["bus"]:
        from slimta_tx.bus.loader import load_bus

        plugin: IBus = load_bus(config["bus"], config, reactor)
        return plugin
    if config.get("relay") or config.get("relay-lmtp"):
        from slimta_tx.bus.relay_options import make_relay_bus

        return make_relay_bus(config, reactor)
    if config["amqp"]:
        from slimta_tx.bus.amqp import AmqpBus

        return AmqpBus(
            config["amqp"],
            queue=config["amqp-queue"],
            exchange=config["amqp-exchange"],
            routing_key=config["amqp-routing-key"],
            timeout=config["amqp-timeout"],
            max_message_size=config["max-size"],
            reactor=reactor,
            per_recipient=bool(config["amqp-per-recipient"]),
        )
    return maildir_bus("maildir", config["maildir"], reactor)


def maildir_bus(option: str, path: str, reactor: Any) -> IBus:
    """A MaildirBus; a directory that cannot be created after all (what the checks of
    slimta_tx.cli.startup could not foresee, e.g. EPERM on a special file system) is one line
    and exit 1."""
    from slimta_tx.bus.maildir import MaildirBus

    try:
        return MaildirBus(path, reactor=reactor)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise SystemExit(
            f"twistd slimta: --{option} {path}: cannot create it: {e.strerror}{where}"
        ) from None


def configure(config: Any, edge: Any, service: Any, reactor: Any) -> None:
    from slimta_tx.bus.loader import BusService

    # Starts the bus (e.g. connects to RabbitMQ) and stops it after sessions drained.
    BusService(edge.bus, edge).setServiceParent(service)
