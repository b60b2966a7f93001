"""The gateway's MQTT connection: paho-mqtt with byte counters and a handler queue.

Paho's network thread only counts bytes and queues messages; the gateway's
single worker thread takes them from `inbox`. Publishing is thread-safe in
paho and counted in `bytes_out`.
"""

from __future__ import annotations

import logging
import queue
import threading

import paho.mqtt.client as mqtt

from protocol.logs import event
from protocol.transport import BrokerAuth

log = logging.getLogger("starling.gateway.link")


class Link:
    """A connected MQTT client for one gateway; use as a context manager."""

    def __init__(self, client_id: str, host: str, port: int, subscriptions: list[str], status_topic: str,
                 auth: BrokerAuth | None = None) -> None:
        self.host, self.port = host, port
        self.subscriptions = subscriptions
        # (topic, payload, stage-1 outcome or None): ingest workers put replies they checked here too
        self.inbox: queue.Queue[tuple[str, bytes, object]] = queue.Queue()
        self.bytes_in = 0
        self.bytes_out = 0
        self.connected = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        (auth or BrokerAuth()).apply(self.client)
        self.client.will_set(status_topic, b'{"state": "offline"}', qos=1, retain=True)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)  # unbounded: the gateway never drops its own sends
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            event(log, "mqtt.refused", logging.WARNING, reason=str(reason_code))
            return
        client.subscribe([(topic, 1) for topic in self.subscriptions])
        self.connected.set()
        event(log, "mqtt.connected", broker=f"{self.host}:{self.port}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        event(log, "mqtt.disconnected", logging.WARNING, reason=str(reason_code))

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.bytes_in += len(msg.payload)
        self.inbox.put((msg.topic, msg.payload, None))

    def publish(self, topic: str, payload: bytes, retain: bool = False, counted: bool = True) -> mqtt.MQTTMessageInfo:
        """Publish at QoS 1; `counted` traffic is what the gateway sends to devices (bytes_down)."""
        if counted:
            self.bytes_out += len(payload)
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def __enter__(self) -> Link:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.client.loop_stop()
            raise ConnectionError(f"no MQTT connection to {self.host}:{self.port} within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        self.client.disconnect()
        self.client.loop_stop()
