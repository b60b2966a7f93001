"""Both emulator brokers (Mosquitto, and the embedded fallback) do what Starling relies on."""

from __future__ import annotations

import queue
import socket
import time

import paho.mqtt.client as mqtt
import pytest

from hw.broker import Broker, find_mosquitto
from hw.embedded_broker import topic_matches

KINDS = ["embedded"] + (["mosquitto"] if find_mosquitto() else [])


@pytest.fixture(params=KINDS)
def broker(request, tmp_path):
    with Broker(tmp_path, kind=request.param) as running:
        yield running


def client(broker, client_id, clean=True, will=None):
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    inbox: queue.Queue = queue.Queue()
    c.on_message = lambda _c, _u, msg: inbox.put((msg.topic, msg.payload, msg.retain))
    if will:
        c.will_set(will[0], will[1], qos=1, retain=True)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c, inbox


def subscribe(c, topic):
    result, mid = c.subscribe(topic, qos=1)
    assert result == mqtt.MQTT_ERR_SUCCESS
    time.sleep(0.2)


def test_wildcards_follow_the_mqtt_rules():
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/d/c")
    assert topic_matches("a/#", "a/b/c") and topic_matches("#", "x")
    assert not topic_matches("a/b", "a/b/c")


def test_qos1_messages_reach_wildcard_subscribers(broker):
    sub, inbox = client(broker, "sub")
    subscribe(sub, "starling/+/reply/+")
    pub, _ = client(broker, "pub")
    pub.publish("starling/gw/reply/dev1", b"\x00\x01payload", qos=1).wait_for_publish(5)
    assert inbox.get(timeout=5)[:2] == ("starling/gw/reply/dev1", b"\x00\x01payload")
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()


def test_retained_messages_reach_late_subscribers_and_can_be_cleared(broker):
    pub, _ = client(broker, "pub")
    pub.publish("starling/gw/model/abc", b"model", qos=1, retain=True).wait_for_publish(5)
    sub, inbox = client(broker, "late")
    subscribe(sub, "starling/gw/model/#")
    assert inbox.get(timeout=5) == ("starling/gw/model/abc", b"model", True)
    pub.publish("starling/gw/model/abc", b"", qos=1, retain=True).wait_for_publish(5)
    sub2, inbox2 = client(broker, "later")
    subscribe(sub2, "starling/gw/model/#")
    with pytest.raises(queue.Empty):
        inbox2.get(timeout=0.5)


def test_an_abrupt_disconnect_publishes_the_last_will(broker):
    watcher, inbox = client(broker, "watcher")
    subscribe(watcher, "starling/gw/online/+")
    dying, _ = client(broker, "dying", will=("starling/gw/online/dev1", b"0"))
    time.sleep(0.2)
    dying._sock.close() if getattr(dying, "_sock", None) else None  # no DISCONNECT packet: a crash
    dying.loop_stop()
    topic, payload, _ = inbox.get(timeout=10)
    assert (topic, payload) == ("starling/gw/online/dev1", b"0")


def test_a_persistent_session_gets_what_was_sent_while_it_was_away(broker):
    away, _ = client(broker, "device-1", clean=False)
    subscribe(away, "starling/gw/task/dev1")
    away.disconnect()
    away.loop_stop()
    time.sleep(0.2)
    pub, _ = client(broker, "gw")
    pub.publish("starling/gw/task/dev1", b"task", qos=1).wait_for_publish(5)
    back, inbox = client(broker, "device-1", clean=False)
    assert inbox.get(timeout=5)[:2] == ("starling/gw/task/dev1", b"task")


def test_garbage_bytes_do_not_take_the_broker_down(broker):
    with socket.create_connection((broker.host, broker.port)) as raw:
        raw.sendall(b"\xff\xff\xff\xff\xff garbage")
    c, inbox = client(broker, "after-garbage")
    subscribe(c, "t")
    c.publish("t", b"still here", qos=1).wait_for_publish(5)
    assert inbox.get(timeout=5)[1] == b"still here"
