"""The dashboard's MQTT subscription: status topics in, `Fleet.apply` out.

One `mqttlink.Connection`, read-only: it subscribes to the status and ledger
topics, never publishes and has no last will. It connects in the background
and reconnects by itself, so the page is up (saying "no broker connection")
even while the broker is not. The broker's ACL must let its user read:

    starling/+/status   starling/+/status/device/+   starling/ledger/vv/+   starling/ledger/vertex/+
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from mqttlink import Connection, ConnectionOptions, Message
from protocol.logs import event
from protocol.transport import BrokerAuth

from .fleet import Fleet

log = logging.getLogger("starling.dashboard.feed")
SUBSCRIPTIONS = ("starling/+/status", "starling/+/status/device/+", "starling/ledger/vv/+", "starling/ledger/vertex/+")
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
LOG_EVERY = 100  # after the first of a reason, log one malformed message in this many


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """`mqtt://host[:port]` (plain, 1883) or `mqtts://host[:port]` (TLS, 8883); ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"broker URL {url!r}: only scheme, host and port (credentials go in --username/--password-file)")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from exc
    return BrokerURL(parts.hostname, port, parts.scheme == "mqtts")


class Feed:
    """Subscribes `fleet` to a broker; `start()` returns at once, `close()` disconnects."""

    def __init__(self, fleet: Fleet, broker: BrokerURL, auth: BrokerAuth | None = None) -> None:
        self.fleet = fleet
        self.broker = broker
        options = ConnectionOptions(
            client_id=f"dashboard-{os.getpid()}-{os.urandom(3).hex()}",
            host=broker.host,
            port=broker.port,
            auth=auth or BrokerAuth(),
            tls_system_ca=broker.tls,  # mqtts:// without --tls-ca: the system's trusted CAs
            clean_session=True,
            subscriptions=tuple((topic, 1) for topic in SUBSCRIPTIONS),
            reconnect_min_s=1,
            reconnect_max_s=10,
            log_name=log.name,
        )
        self.conn = Connection(options, deliver=self._on_message, on_state=self._on_state)
        self._logged: dict[str, int] = {}

    def start(self) -> None:
        event(log, "mqtt.connecting", broker=str(self.broker))
        self.conn.start()

    def close(self) -> None:
        self.conn.close()

    # Both on paho's thread: the fleet model is thread-safe, and applying a status message is cheap.

    def _on_state(self, connected: bool, detail: str) -> None:
        self.fleet.set_connection(connected, time.time(), detail)

    def _on_message(self, msg: Message) -> None:
        reason = self.fleet.apply(msg.topic, msg.payload, msg.at)
        if reason is not None:
            seen = self._logged[reason] = self._logged.get(reason, 0) + 1
            if seen == 1 or seen % LOG_EVERY == 0:
                event(log, "status.malformed", logging.WARNING, reason=reason, topic=msg.topic[:200], count=seen)
