"""The gateway's ledger gossip on its own MQTT connection (`ledger.gossip.Gossip` over paho).

    with LedgerSync(ledger, identity.id, host, port, auth) as sync:
        vertex = ledger.enroll_device(...)
        sync.announce(vertex)

One paho connection (client id `gw-<id>-ledger`, persistent session, QoS 1)
and one thread that feeds `Gossip` every message and ticks it (version
vector every second). The `Ledger` is thread-safe, so the gateway's worker
thread keeps writing while this thread inserts what peers send.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from ledger.gossip import Gossip
from ledger.store import Ledger
from ledger.vertex import Vertex
from protocol.logs import event
from protocol.transport import BrokerAuth

log = logging.getLogger("starling.gateway.ledger")
TICK_S = 0.1


class LedgerSync:
    def __init__(self, ledger: Ledger, gateway_id: str, host: str, port: int, auth: BrokerAuth | None = None,
                 vv_interval_s: float = 1.0, client_id: str | None = None, bootstrap_s: float = 0.0) -> None:
        self.host, self.port = host, port
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"gw-{gateway_id}-ledger", clean_session=False)
        (auth or BrokerAuth()).apply(self.client)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        self.gossip = Gossip(ledger, gateway_id, self._publish, vv_interval_s, bootstrap_s)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self._connected.clear()
        self.client.on_message = lambda _c, _u, msg: self._inbox.put((msg.topic, msg.payload))
        self._thread = threading.Thread(target=self._run, name="ledger-gossip", daemon=True)

    @property
    def on_applied(self) -> Callable[[Vertex], None] | None:
        return self.gossip.on_applied

    @on_applied.setter
    def on_applied(self, callback: Callable[[Vertex], None] | None) -> None:
        self.gossip.on_applied = callback

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            event(log, "mqtt.refused", logging.WARNING, reason=str(reason_code))
            return
        client.subscribe([(topic, 1) for topic in self.gossip.subscriptions()])
        self._connected.set()
        event(log, "gossip.connected", broker=f"{self.host}:{self.port}")

    def announce(self, vertex: Vertex) -> None:
        """Push a vertex this gateway wrote (thread-safe: paho's publish is)."""
        self.gossip.announce(vertex)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._inbox.get(timeout=TICK_S)
                self.gossip.handle(topic, payload)
                while True:  # drain what is there before the next tick
                    topic, payload = self._inbox.get_nowait()
                    self.gossip.handle(topic, payload)
            except queue.Empty:
                pass
            self.gossip.tick()

    def __enter__(self) -> LedgerSync:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.client.loop_stop()
            raise ConnectionError(f"no MQTT connection for ledger gossip to {self.host}:{self.port} within 10 s")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()
