"""The dashboard's MQTT subscription: status topics in, `Fleet.apply` out.

One paho client, read-only: it subscribes to the status and ledger topics,
never publishes and has no last will. It connects in the background and
reconnects by itself, so the page is up (saying "no broker connection")
even while the broker is not. The broker's ACL must let its user read:

    starling/+/status   starling/+/status/device/+   starling/ledger/vv/+   starling/ledger/vertex/+
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

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
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"dashboard-{os.getpid()}-{os.urandom(3).hex()}",
                                  clean_session=True, protocol=mqtt.MQTTv311)
        auth = auth or BrokerAuth()
        if broker.tls and not auth.tls:  # mqtts:// without --tls-ca: the system's trusted CAs
            self.client.tls_set(cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        auth.apply(self.client)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._logged: dict[str, int] = {}

    def start(self) -> None:
        event(log, "mqtt.connecting", broker=str(self.broker))
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            event(log, "mqtt.refused", logging.WARNING, reason=str(reason_code))
            self.fleet.set_connection(False, time.time(), f"refused: {reason_code}")
            return
        client.subscribe([(topic, 1) for topic in SUBSCRIPTIONS])
        self.fleet.set_connection(True, time.time(), str(self.broker))
        event(log, "mqtt.connected", broker=str(self.broker))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.fleet.set_connection(False, time.time(), f"disconnected: {reason_code}")
        event(log, "mqtt.disconnected", logging.WARNING, reason=str(reason_code))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        reason = self.fleet.apply(msg.topic, msg.payload, time.time())
        if reason is not None:
            seen = self._logged[reason] = self._logged.get(reason, 0) + 1
            if seen == 1 or seen % LOG_EVERY == 0:
                event(log, "status.malformed", logging.WARNING, reason=reason, topic=msg.topic[:200], count=seen)
