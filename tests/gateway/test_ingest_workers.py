"""Ingest workers: replies shared over MQTT 5 between processes, checked there, judged by the gateway."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from gateway.ingest import Authenticated, Rejected
from gateway.ingest_workers import IngestWorkers, WorkerSettings
from hw.broker import Broker
from hw.loadgen import LoadGenerator, finished_gateway, start_gateway
from protocol import envelope, schemas, topics
from protocol.keys import Identity
from protocol.transport import BrokerAuth

GATEWAY = Identity.from_seed(b"g" * 32)
DEVICE = Identity.from_seed(b"d" * 32)
UPDATE = schemas.encode_update({"w": np.full((4,), 0.5, np.float32)}, {"train_loss": 1.0, "steps": 1.0}, "i8")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


def reply(device: Identity = DEVICE, task: str = "train-1-x.1") -> tuple[str, bytes]:
    ctx = envelope.Context(device.public_key, GATEWAY.id, 1, task, b"\1" * 32)
    return topics.reply(GATEWAY.id, device.id), envelope.seal(device, "reply", ctx, {"examples": 8}, UPDATE)


def publisher(broker: Broker) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def next_outcome(inbox: queue.Queue, timeout: float = 10.0):
    topic, payload, outcome = inbox.get(timeout=timeout)
    return outcome


@pytest.fixture
def workers(broker):
    inbox: queue.Queue = queue.Queue()
    enrolled, revoked = {DEVICE.public_key}, set()
    settings = WorkerSettings(GATEWAY.id, broker.host, broker.port, BrokerAuth(), 1 << 20, logging.INFO)
    with IngestWorkers(1, settings, inbox, lambda: (list(enrolled), list(revoked))) as running:
        time.sleep(1.5)  # spawned, connected, subscribed
        yield running, inbox, enrolled, revoked


def test_a_worker_authenticates_replies_and_hands_them_to_the_gateway(broker, workers):
    running, inbox, _, _ = workers
    client = publisher(broker)
    try:
        topic, wire = reply()
        client.publish(topic, wire, qos=1)
        outcome = next_outcome(inbox)
        assert isinstance(outcome, Authenticated)
        assert outcome.envelope.ctx.sender == DEVICE.public_key and outcome.shapes == {"w": (4,)}
        end = wire.index(UPDATE) + len(UPDATE) - 1  # the update's last byte: still well-formed CBOR
        forged = wire[:end] + bytes([wire[end] ^ 1]) + wire[end + 1:]
        client.publish(topic, forged, qos=1)
        assert next_outcome(inbox).reason == "digest_mismatch"
        stranger = Identity.from_seed(b"s" * 32)
        client.publish(*reply(stranger), qos=1)
        assert next_outcome(inbox).reason == "unknown_device"
        assert running.bytes_in == 2 * len(wire) + len(reply(stranger)[1])
    finally:
        client.loop_stop()
        client.disconnect()


def test_key_set_changes_reach_the_workers(broker, workers):
    running, inbox, enrolled, revoked = workers
    newcomer = Identity.from_seed(b"n" * 32)
    client = publisher(broker)
    try:
        running.enroll(newcomer.public_key)
        time.sleep(0.5)  # the worker reads key changes between batches (every 50 ms when idle)
        client.publish(*reply(newcomer), qos=1)
        assert isinstance(next_outcome(inbox), Authenticated)
        running.revoke(DEVICE.public_key)
        time.sleep(0.5)
        client.publish(*reply(DEVICE), qos=1)
        outcome = next_outcome(inbox)
        assert isinstance(outcome, Rejected) and outcome.reason == "revoked"
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_worker_that_dies_is_restarted_and_gets_what_queued_meanwhile(broker, workers):
    running, inbox, _, _ = workers
    process = running._workers[0][0]
    os.kill(process.pid, signal.SIGKILL)
    process.join(5)
    client = publisher(broker)
    try:
        wires = [reply(task=f"train-1-x.{i}") for i in range(5)]
        for topic, wire in wires:  # nobody is connected to take these: the broker queues them
            client.publish(topic, wire, qos=1).wait_for_publish(5)
        running.watch()
        assert running.restarts == 1
        got = {next_outcome(inbox, 20).envelope.ctx.task for _ in wires}
        assert got == {f"train-1-x.{i}" for i in range(5)}
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_gateway_with_two_workers_runs_a_round_and_both_take_a_share(broker, tmp_path: Path):
    devices = 60
    shapes = {"w": (20, 5)}
    gateway, gw = start_gateway(tmp_path, broker, shapes, devices, 60.0, workers=2)
    load = LoadGenerator(broker.host, broker.port, gw.id, devices, shapes, seed=7)
    try:
        time.sleep(1.0)
        load.enroll_all()
        wires = load.sign_replies(load.collect_tasks(devices, 60.0))
        topic, wire = wires[0]
        at = wire.index(envelope.decode(wire).sig)
        forged = wire[:at] + bytes([wire[at] ^ 1]) + wire[at + 1:]
        garbage = [(topics.reply(gw.id, "f" * 32), b"\xa1not cbor"), (topic, forged)]
        for bad_topic, bad in garbage:  # malformed, and a forged signature: refused in the workers
            load.client.publish(bad_topic, bad, qos=1).wait_for_publish(5)
        time.sleep(0.5)
        load.send(wires)
        load.wait_receipts(devices, 60.0)
        result = finished_gateway(gateway, tmp_path, 60.0)
    finally:
        load.close()
        if gateway.poll() is None:
            gateway.kill()
    assert load.timeline.accepted == devices
    assert result["rounds"][-1]["participants"] == devices
    assert result["rejections"] == {"malformed": 1, "bad_signature": 1}
    log = (tmp_path / "gateway.log").read_text()
    shares = {int(w): int(n) for w, n in re.findall(r"ingest\.stopped worker=(\d) replies=(\d+)", log)}
    assert set(shares) == {0, 1} and sum(shares.values()) == devices + len(garbage)
    assert all(n > 0 for n in shares.values()), shares
    state = json.loads((tmp_path / "state" / "result.json").read_text())
    assert state["rounds"][-1]["bytes_up"] >= devices * len(wire)


def retained(broker: Broker, topic: str, timeout: float = 10.0) -> dict:
    """The JSON retained on `topic` (a gateway's status, or one of its devices')."""
    got: queue.Queue = queue.Queue()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{time.time_ns()}")
    client.on_message = lambda _c, _u, m: got.put(m.payload)
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        return json.loads(got.get(timeout=timeout))
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_reply_re_sent_through_the_workers_in_its_round_is_acknowledged_as_a_duplicate(broker, tmp_path: Path):
    """An agent re-sends a reply whose receipt is late (at-least-once): a second accepted receipt, counted
    under `duplicates` in result.json and the status, never under `rejections`."""
    devices = 3
    shapes = {"w": (20, 5)}
    gateway, gw = start_gateway(tmp_path, broker, shapes, devices, 60.0, workers=1)
    load = LoadGenerator(broker.host, broker.port, gw.id, devices, shapes, seed=11)
    try:
        time.sleep(1.0)
        load.enroll_all()
        wires = load.sign_replies(load.collect_tasks(devices, 60.0))
        load.send(wires[:-1])  # the last device holds its reply back: the round stays open
        load.wait_receipts(devices - 1, 60.0)
        load.send(wires[:1])  # the first one again, byte for byte
        load.wait_receipts(devices, 60.0)
        load.send(wires[-1:])
        load.wait_receipts(devices + 1, 60.0)
        result = finished_gateway(gateway, tmp_path, 60.0)
    finally:
        load.close()
        if gateway.poll() is None:
            gateway.kill()
    assert load.timeline.accepted == devices + 1 and load.timeline.rejected == {}
    assert result["duplicates"] == 1 and result["rejections"] == {}
    assert result["rounds"][-1]["participants"] == devices and result["rounds"][-1]["rejected"] == 0
    status = retained(broker, topics.status(gw.id))
    assert status["duplicates"] == 1 and status["rejections"] == {}
    device = retained(broker, topics.device_status(gw.id, topics.device_of(wires[0][0])))
    assert (device["accepted"], device["duplicates"], device["rejected"]) == (1, 1, {})
    log = (tmp_path / "gateway.log").read_text()
    assert "reply.duplicate" in log and "reply.rejected" not in log
