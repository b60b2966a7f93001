"""`mqttlink.Connection` against a real Mosquitto (hw.broker.Broker) on a free loopback port.

Observers are plain paho clients that wait for their SUBACK before anything is
published. A connection's own subscriptions are proven by publishing from the
connection itself: the broker handles one client's packets in order, so a
message it publishes after connecting comes after the SUBSCRIBE its connect
sent. Non-delivery is asserted after a later message on the same path has
arrived (one publisher to one subscriber keeps its order).
"""

from __future__ import annotations

import itertools
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from required_tools import needs

from hw.broker import Broker, _child_env, find_mosquitto, free_port
from mqttlink import ConnectError, Connection, ConnectionOptions, Message, Will

pytestmark = needs(find_mosquitto() is not None, "needs mosquitto (hw/install-system.sh)")

ROOT = Path(__file__).resolve().parents[2]
WAIT = 5.0  # upper bound for anything that should happen
QUIET = 0.5  # how long something that must not happen is given to happen anyway
_ids = itertools.count()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


def options(port: int, **kwargs) -> ConnectionOptions:
    """Fast reconnects and a fresh client id, so tests never take over each other's sessions."""
    kwargs.setdefault("clean_session", True)
    return ConnectionOptions(f"test-{next(_ids)}", "127.0.0.1", port, reconnect_min_s=0.1,
                             reconnect_max_s=0.5, connect_timeout_s=WAIT, **kwargs)


class Observer:
    """An independent paho client: what arrives on `topics` goes to `inbox` as (topic, payload, retained)."""

    def __init__(self, port: int, *topics: str) -> None:
        self.inbox: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"observer-{next(_ids)}")
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.inbox.put((m.topic, m.payload, bool(m.retain)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if topics:
            self.client.subscribe([(topic, 1) for topic in topics])
            assert subscribed.wait(WAIT), "the observer's SUBSCRIBE was not acknowledged"

    def next(self, timeout: float = WAIT) -> tuple[str, bytes, bool]:
        return self.inbox.get(timeout=timeout)

    def nothing(self, wait: float = QUIET) -> None:
        with pytest.raises(queue.Empty):
            self.inbox.get(timeout=wait)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observe(broker):
    made: list[Observer] = []

    def make(*topics: str, port: int | None = None) -> Observer:
        made.append(Observer(port or broker.port, *topics))
        return made[-1]

    yield make
    for observer in made:
        observer.close()


def payloads(inbox: queue.Queue[Message], count: int) -> list[tuple[str, bytes]]:
    return [inbox.get(timeout=WAIT)[:2] for _ in range(count)]


def test_subscriptions_in_the_options_bring_messages_to_deliver(broker, observe):
    delivered: queue.Queue[Message] = queue.Queue()
    with Connection(options(broker.port, subscriptions=(("t/opt/+", 1),)), deliver=delivered.put) as conn:
        conn.publish("t/opt/probe", b"")  # once it is back, the subscription is in place for others too
        assert delivered.get(timeout=WAIT)[:2] == ("t/opt/probe", b"")
        before = time.time()
        observe().publish("t/opt/a", b"from outside")
        message = delivered.get(timeout=WAIT)
        assert isinstance(message, Message)
        assert (message.topic, message.payload) == ("t/opt/a", b"from outside")
        assert before <= message.at <= time.time()
        assert conn.inbox.empty()  # `deliver` replaces the inbox, it does not add to it


def test_subscribe_and_unsubscribe_while_offline_take_effect_on_connect(broker):
    conn = Connection(options(broker.port))
    conn.subscribe([("t/offline/kept", 1), ("t/offline/dropped", 1)])
    conn.unsubscribe(["t/offline/dropped"])
    with conn:
        conn.publish("t/offline/dropped", b"1")  # first: it would arrive before the next one
        conn.publish("t/offline/kept", b"2")
        assert payloads(conn.inbox, 1) == [("t/offline/kept", b"2")]
        assert conn.inbox.empty()


def test_the_birth_is_published_on_every_connect(broker, observe):
    watcher = observe("t/birth")
    states: queue.Queue[tuple[bool, str]] = queue.Queue()
    conn = Connection(options(broker.port, birth=Will("t/birth", b"up", retain=False)),
                      on_state=lambda *state: states.put(state))
    with conn:
        assert watcher.next()[:2] == ("t/birth", b"up")
        assert states.get(timeout=WAIT)[0] is True
        conn.client.socket().shutdown(socket.SHUT_RDWR)  # the connection drops; paho connects again
        assert states.get(timeout=WAIT)[0] is False
        assert states.get(timeout=WAIT)[0] is True
        assert watcher.next()[:2] == ("t/birth", b"up")


CHILD = """
import sys, time
from mqttlink import Connection, ConnectionOptions, Will
port, topic = int(sys.argv[1]), sys.argv[2]
options = ConnectionOptions("will-child", port=port, clean_session=True, will=Will(topic, b"gone"),
                            birth=Will(topic, b"here"))
with Connection(options):
    time.sleep(60)
"""


def test_the_last_will_is_published_when_the_process_dies_without_a_goodbye(broker, observe):
    watcher = observe("t/will")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(broker.port), "t/will"], cwd=ROOT,
                             env=_child_env())
    try:
        assert watcher.next(timeout=15)[:2] == ("t/will", b"here")
        child.kill()
        assert watcher.next()[:2] == ("t/will", b"gone")
    finally:
        child.kill()
        child.wait(10)
    assert observe("t/will").next() == ("t/will", b"gone", True)  # and it is retained


def test_close_publishes_the_goodbye_and_the_broker_drops_the_will(broker, observe):
    watcher = observe("t/online")
    conn = Connection(options(broker.port, will=Will("t/online", b"0"), birth=Will("t/online", b"1")))
    conn.connect()
    assert watcher.next()[:2] == ("t/online", b"1")
    conn.close(goodbye=Will("t/online", b"bye"))
    assert watcher.next()[:2] == ("t/online", b"bye")
    watcher.nothing()  # no will after a clean disconnect
    assert observe("t/online").next() == ("t/online", b"bye", True)


def test_subscriptions_are_made_again_after_a_broker_restart_that_forgot_the_session(tmp_path):
    states: queue.Queue[tuple[bool, str]] = queue.Queue()
    broker = Broker(tmp_path / "broker", kind="mosquitto")  # no persistence: a restart forgets every session
    assert not broker.persistent
    with broker:
        # A persistent session, which the restarted broker no longer has: the connection must not rely on it.
        conn = Connection(options(broker.port, clean_session=False, subscriptions=(("t/restart/opt", 1),)),
                          on_state=lambda *state: states.put(state))
        with conn:
            assert states.get(timeout=WAIT) == (True, f"mqtt://127.0.0.1:{broker.port}")
            assert conn.subscribed.wait(WAIT)  # the broker acknowledged the connect's subscriptions
            conn.subscribe([("t/restart/later", 1), ("t/restart/gone", 1)])  # while connected
            conn.unsubscribe(["t/restart/gone"])
            broker.stop()
            connected, detail = states.get(timeout=WAIT)
            assert not connected and detail.startswith("disconnected: ")
            assert not conn.subscribed.is_set()
            broker.start()
            assert states.get(timeout=WAIT)[0] is True
            assert conn.subscribed.wait(WAIT)  # ... and again after the restart
            conn.publish("t/restart/gone", b"0")
            conn.publish("t/restart/opt", b"1")
            conn.publish("t/restart/later", b"2")
            assert payloads(conn.inbox, 2) == [("t/restart/opt", b"1"), ("t/restart/later", b"2")]
            assert conn.inbox.empty()


def test_connect_raises_connect_error_within_its_timeout_when_nothing_listens():
    conn = Connection(ConnectionOptions("nobody-home", "127.0.0.1", free_port(), connect_timeout_s=1.0,
                                        reconnect_min_s=0.2, reconnect_max_s=0.2))
    started = time.monotonic()
    with pytest.raises(ConnectError) as raised:
        conn.connect()
    assert 1.0 <= time.monotonic() - started < 3.0
    assert raised.value.refused == "" and "within 1 s" in str(raised.value)
    assert "paho-mqtt-client-nobody-home" not in {t.name for t in threading.enumerate()}  # closed behind it


@pytest.fixture
def closed_broker(tmp_path):
    """A Mosquitto that refuses every client: no anonymous access and no password file."""
    with Broker(tmp_path / "closed", kind="mosquitto", anonymous=False) as broker:
        yield broker.port


def test_a_refusal_is_a_connect_error_at_once_naming_the_reason(closed_broker):
    states: list[tuple[bool, str]] = []
    conn = Connection(options(closed_broker), on_state=lambda *state: states.append(state))
    started = time.monotonic()
    with pytest.raises(ConnectError) as raised:
        conn.connect()
    assert time.monotonic() - started < WAIT / 2  # not the whole timeout
    assert raised.value.refused == "Not authorized"
    assert states == [(False, "refused: Not authorized")]


def test_byte_counters_count_payloads_in_and_counted_payloads_out(broker):
    with Connection(options(broker.port, subscriptions=(("t/bytes", 1),))) as conn:
        conn.publish("t/bytes", b"0123456789")
        conn.publish("t/bytes", b"abcde", counted=False)
        assert [payload for _, payload in payloads(conn.inbox, 2)] == [b"0123456789", b"abcde"]
        assert (conn.bytes_out, conn.bytes_in) == (10, 15)


@pytest.mark.parametrize("nodelay", [True, False])
def test_tcp_nodelay_is_set_on_the_socket_unless_turned_off(broker, nodelay):
    with Connection(options(broker.port, tcp_nodelay=nodelay)) as conn:
        sock = conn.client.socket()
        assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) is nodelay
