"""The gateway's ledger gossip on its own MQTT connection (`ledger.gossip.Gossip` over `mqttlink`).

    with LedgerSync(ledger, identity.id, host, port, auth) as sync:
        vertex = ledger.enroll_device(...)
        sync.announce(vertex)

One connection (client id `gw-<id>-ledger`, persistent session, QoS 1) and
one thread that feeds `Gossip` every message and ticks it (version vector
every second). The `Ledger` is thread-safe, so the gateway's other threads
keep writing while this thread inserts what peers send.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from ledger.gossip import Gossip
from ledger.store import Ledger
from ledger.vertex import Vertex
from mqttlink import Connection, ConnectionOptions
from protocol.transport import BrokerAuth

TICK_S = 0.1


class LedgerSync:
    def __init__(self, ledger: Ledger, gateway_id: str, host: str, port: int, auth: BrokerAuth | None = None,
                 vv_interval_s: float = 1.0, client_id: str | None = None, bootstrap_s: float = 0.0) -> None:
        self._stop = threading.Event()
        self.gossip = Gossip(ledger, gateway_id, self._publish, vv_interval_s, bootstrap_s)
        self.connection = Connection(ConnectionOptions(
            client_id=client_id or f"gw-{gateway_id}-ledger", host=host, port=port, auth=auth or BrokerAuth(),
            subscriptions=tuple((topic, 1) for topic in self.gossip.subscriptions()),
            max_inflight=1000, reconnect_min_s=0.2, reconnect_max_s=5, log_name="starling.gateway.ledger"))
        self._thread = threading.Thread(target=self._run, name="ledger-gossip", daemon=True)

    @property
    def on_applied(self) -> Callable[[Vertex], None] | None:
        return self.gossip.on_applied

    @on_applied.setter
    def on_applied(self, callback: Callable[[Vertex], None] | None) -> None:
        self.gossip.on_applied = callback

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.connection.publish(topic, payload, retain=retain)

    def announce(self, vertex: Vertex) -> None:
        """Push a vertex this gateway wrote (thread-safe: publishing is)."""
        self.gossip.announce(vertex)

    def _run(self) -> None:
        inbox = self.connection.inbox
        while not self._stop.is_set():
            try:
                message = inbox.get(timeout=TICK_S)
                self.gossip.handle(message.topic, message.payload)
                while True:  # drain what is there before the next tick
                    message = inbox.get_nowait()
                    self.gossip.handle(message.topic, message.payload)
            except queue.Empty:
                pass
            self.gossip.tick()

    def start(self) -> LedgerSync:
        """Connect (raises mqttlink.ConnectError if the broker is not there within 10 s) and start gossiping."""
        self.connection.connect()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.connection.close()

    def __enter__(self) -> LedgerSync:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
