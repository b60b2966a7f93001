"""`Connection`: a paho-mqtt client that owns its whole life, and the frozen options it is built from.

Threads: paho's network thread runs the callbacks below, which only convert
what arrived into a `Message` and hand it to `deliver` (by default: put it on
`inbox`); whoever owns the connection does the work on its own thread.
`publish` is thread-safe (paho's is).

Events are logged one line each: `mqtt.connected broker=mqtt://host:port
client=ID`, `mqtt.refused reason=...`, `mqtt.disconnected reason=...`.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.logs import event
from protocol.transport import BrokerAuth

GOODBYE_WAIT_S = 2.0  # how long `close` waits for its goodbye message to leave


class MqttError(Exception):
    """Base of the errors a `Connection` raises."""


class ConnectError(MqttError):
    """No connection within the options' `connect_timeout_s` (broker down, wrong TLS), or a refusal."""

    def __init__(self, message: str, refused: str = "") -> None:
        super().__init__(message)
        self.refused = refused  # the broker's reason when it answered the CONNECT with a refusal; else ""


class Message(NamedTuple):
    """What arrived: topic, payload, and when (Unix time, taken on paho's thread)."""

    topic: str
    payload: bytes
    at: float


@dataclass(frozen=True)
class Will:
    """A message the connection leaves behind: as MQTT last will (the broker sends it when we vanish)
    or as the `birth` published on every connect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class ConnectionOptions:
    """Everything a connection is made from; a role builds one and hands it to `Connection`."""

    client_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    auth: BrokerAuth = field(default_factory=BrokerAuth)  # TLS and credentials (protocol/transport.py)
    tls_system_ca: bool = False  # TLS against the system's trusted CAs when `auth` names no CA (mqtts:// URLs)
    mqtt5: bool = False  # MQTT 5 (needed for shared subscriptions); else 3.1.1
    clean_session: bool = False  # False: a persistent session, so QoS 1 messages wait while we are away
    session_expiry_s: int | None = None  # MQTT 5 persistent sessions: how long the broker keeps ours
    keepalive_s: int = 30
    subscriptions: tuple[tuple[str, int], ...] = ()  # (topic filter, QoS), made on every connect
    will: Will | None = None  # the broker publishes it when the connection dies without a goodbye
    birth: Will | None = None  # published on every connect (e.g. a retained "online" flag)
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 10.0
    max_inflight: int = 20  # QoS 1 messages in flight at once (paho's default is 20)
    # Small packets (PUBACKs, receipts, tasks) leave at once instead of waiting for the previous one's ACK
    # (Nagle's algorithm against delayed ACKs can hold one back ~40 ms); paho does not set it itself.
    tcp_nodelay: bool = True
    max_queued: int = 0  # outgoing messages paho holds while offline; 0 = unbounded
    connect_timeout_s: float = 10.0  # how long `with Connection(...)` waits for the first connect
    log_name: str = "starling.mqtt"

    @property
    def tls(self) -> bool:
        return self.auth.tls or self.tls_system_ca

    @property
    def broker(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def _set_nodelay(client: mqtt.Client) -> None:
    sock = client.socket()
    try:
        if sock is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # a TLS or proxy socket that will not take it: Nagle stays on
        pass


class Connection:
    """One MQTT connection: `with Connection(options) as conn:`, or `conn.start()` (returns at once) or
    `conn.connect()` (waits for the first connect) ... `conn.close()`.

    `deliver(message)` runs on paho's thread for every message that arrives and must only queue it
    (the default puts it on `inbox`); `on_state(connected, detail)` runs there on every connect,
    refusal (`detail` "refused: <reason>") and disconnect. `subscribe`/`unsubscribe` may be called
    offline: the connection remembers its subscriptions and makes them again on every connect.
    """

    def __init__(self, options: ConnectionOptions, deliver: Callable[[Message], None] | None = None,
                 on_state: Callable[[bool, str], None] | None = None) -> None:
        self.options = options
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._deliver = deliver or self.inbox.put
        self._on_state = on_state
        self._log = logging.getLogger(options.log_name)
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker acknowledged the subscriptions of the current connect
        self._connect_subscription: int | None = None  # the message id of that SUBSCRIBE
        self.bytes_in = 0  # payload bytes received
        self.bytes_out = 0  # payload bytes of `counted` publishes
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)  # notified when the broker accepts or refuses us
        self.refused = ""  # the broker's reason when it refused our last CONNECT; "" once connected
        self._subscriptions: dict[str, int] = dict(options.subscriptions)
        self._closing = False
        self._started = False
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        o = self.options
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            clean_session=None if o.mqtt5 else o.clean_session,
            protocol=mqtt.MQTTv5 if o.mqtt5 else mqtt.MQTTv311,
        )
        if o.tls_system_ca and not o.auth.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        o.auth.apply(client)
        if o.will is not None:
            client.will_set(o.will.topic, o.will.payload, qos=o.will.qos, retain=o.will.retain)
        client.max_inflight_messages_set(o.max_inflight)
        client.max_queued_messages_set(o.max_queued)
        client.reconnect_delay_set(min_delay=o.reconnect_min_s, max_delay=o.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # --- paho's thread: convert and queue ------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            with self._lock:
                self.refused = str(reason_code)
                self._answered.notify_all()
            event(self._log, "mqtt.refused", logging.WARNING, broker=self.options.broker, reason=str(reason_code))
            if self._on_state is not None:
                self._on_state(False, f"refused: {reason_code}")
            return
        if self.options.tcp_nodelay:
            _set_nodelay(client)
        # Under the lock up to `connected.set()`: a `subscribe` racing with us either lands in this
        # list or sees the connection up and subscribes itself; otherwise it would be lost until
        # the next connect.
        with self._lock:
            if self._subscriptions:
                self._connect_subscription = client.subscribe(list(self._subscriptions.items()))[1]
            else:
                self.subscribed.set()
            birth = self.options.birth
            if birth is not None:
                client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
            self.refused = ""
            self.connected.set()
            self._answered.notify_all()
        event(self._log, "mqtt.connected", broker=self.options.broker, client=self.options.client_id)
        if self._on_state is not None:
            self._on_state(True, self.options.broker)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid == self._connect_subscription:  # from now on the broker routes those topics to us
            self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        # Paho closes a refused attempt with an "Unspecified error" disconnect: `mqtt.refused` said it better.
        if self._closing or self.refused:
            return
        event(self._log, "mqtt.disconnected", logging.WARNING, broker=self.options.broker, reason=str(reason_code))
        if self._on_state is not None:
            self._on_state(False, f"disconnected: {reason_code}")

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.bytes_in += len(msg.payload)
        self._deliver(Message(msg.topic, msg.payload, time.time()))

    # --- the owner's side ------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                counted: bool = True) -> mqtt.MQTTMessageInfo:
        """Publish (QoS 1 by default); `counted` payloads add to `bytes_out`. Offline, paho queues it."""
        if counted:
            with self._lock:  # publishers on several threads: `+=` alone could lose a count
                self.bytes_out += len(payload)
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topics: list[tuple[str, int]]) -> None:
        """Subscribe now if connected, and on every later connect."""
        with self._lock:
            self._subscriptions.update(topics)
            if self.connected.is_set():
                self.client.subscribe(topics)

    def unsubscribe(self, topics: list[str]) -> None:
        with self._lock:
            for topic in topics:
                self._subscriptions.pop(topic, None)
            if self.connected.is_set():
                self.client.unsubscribe(topics)

    def start(self) -> Connection:
        """Begin connecting in the background and return at once; paho retries until `close`."""
        o = self.options
        properties = None
        if o.mqtt5 and o.session_expiry_s is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = o.session_expiry_s
        if o.mqtt5:
            self.client.connect_async(o.host, o.port, keepalive=o.keepalive_s, clean_start=o.clean_session,
                                      properties=properties)
        else:
            self.client.connect_async(o.host, o.port, keepalive=o.keepalive_s)
        self.client.loop_start()
        self._started = True
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(self.options.connect_timeout_s if timeout is None else timeout)

    def close(self, goodbye: Will | None = None) -> None:
        """Publish `goodbye` (if connected, waiting a moment for it to leave), disconnect, stop paho's thread."""
        if not self._started:
            return
        if goodbye is not None and self.connected.is_set():
            info = self.client.publish(goodbye.topic, goodbye.payload, qos=goodbye.qos, retain=goodbye.retain)
            try:
                info.wait_for_publish(timeout=GOODBYE_WAIT_S)
            except (RuntimeError, ValueError):  # the connection dropped meanwhile: the will says it instead
                pass
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()
        self._started = False

    def connect(self) -> Connection:
        """Start and wait for the first connect (`connect_timeout_s`); on failure stop and raise
        `ConnectError`, at once when the broker refuses us. `with Connection(...)` does this."""
        self.start()
        with self._lock:
            self._answered.wait_for(lambda: self.connected.is_set() or self.refused,
                                    self.options.connect_timeout_s)
            up, refused = self.connected.is_set(), self.refused
        if not up:
            self.close()
            if refused:
                raise ConnectError(f"{self.options.broker} refused the connection: {refused}", refused)
            raise ConnectError(f"no MQTT connection to {self.options.broker} within "
                               f"{self.options.connect_timeout_s:g} s")
        return self

    def __enter__(self) -> Connection:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()
