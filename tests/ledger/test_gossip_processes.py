"""Ledger gossip between gateway processes on real Mosquitto brokers: agreement, partitions, lies, garbage."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from hw.broker import Broker
from hw.ledger_peer import PeerProcess, make_city
from hw.netem import TcpRelay
from ledger.vertex import Vertex, sign
from protocol.keys import Identity

SETTLE_S = 30.0  # upper bound for agreement; it is usually well under a second


def agree(peers: list[PeerProcess], timeout: float = SETTLE_S) -> list[dict]:
    """Wait until every peer holds the same vertices and derives the same state; return their status."""
    end = time.monotonic() + timeout
    while True:
        status = [peer.ask("status") for peer in peers]
        # A status reads its height before its ids: a vertex applied in between makes them differ; ask again.
        settled = all(s["height"] == len(s["ids"]) and not s["pending"] for s in status)
        if settled and len({(tuple(s["ids"]), s["state"]) for s in status}) == 1:
            return status
        if time.monotonic() > end:
            summary = [(s["height"], s["pending"], s["state"], s["refused"]) for s in status]
            raise AssertionError(f"no agreement within {timeout} s: {summary}")
        time.sleep(0.2)


def publisher(broker: Broker) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{secrets.token_hex(4)}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


@pytest.fixture
def city(tmp_path: Path):
    keys, genesis = make_city(tmp_path, 3)
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        peers = [PeerProcess(tmp_path, i, genesis, broker.host, broker.port, vv_interval=0.3) for i in range(3)]
        try:
            yield broker, peers, keys
        finally:
            for peer in peers:
                peer.close()


def test_gateways_writing_at_once_end_with_the_same_vertices_order_and_state(city):
    broker, peers, _ = city
    written = set()
    for _ in range(3):  # interleaved batches from every gateway
        for peer in peers:
            written.update(peer.ask("enroll 7")["ids"])
    status = agree(peers)
    assert written <= set(status[0]["ids"]) and status[0]["height"] == 1 + len(written)
    assert all(s["refused"] == {} and s["equivocators"] == [] for s in status)


def test_an_equivocating_gateway_is_flagged_by_every_gateway(city):
    broker, peers, keys = city
    peers[1].ask("enroll 2")
    twins = peers[0].ask("equivocate")["ids"]
    status = agree(peers)
    assert all(s["equivocators"] == [keys[0].id] for s in status)
    assert all(set(twins) <= set(s["ids"]) for s in status)  # both kept as evidence


def test_forged_tampered_and_random_messages_are_refused_without_harm(city, tmp_path: Path):
    broker, peers, keys = city
    peers[0].ask("enroll 3")
    before = agree(peers)
    genesis = Vertex.decode((tmp_path / "genesis.cbor").read_bytes())
    outsider = Identity.generate()
    forged = sign(outsider, "device.enroll", 0, [genesis.id], {"device": bytes(32), "name": "x", "policy": "open"})
    honest = sign(Identity.load(tmp_path / "g2.key"), "device.enroll", 50, [genesis.id],
                  {"device": bytes(32), "name": "x", "policy": "open"})
    tampered = bytearray(honest.encode())
    tampered[-5] ^= 0xFF  # inside the signature
    client = publisher(broker)
    try:
        sends = [("starling/ledger/vertex/" + outsider.id, forged.encode()),
                 ("starling/ledger/vertex/" + keys[2].id, bytes(tampered))]
        for i in range(200):  # random bytes and truncated vertices on every gossip topic
            blob = os.urandom(i % 97) if i % 2 else forged.encode()[: i % len(forged.encode())]
            sends.append((["starling/ledger/vertex/x", f"starling/ledger/vv/{keys[i % 3].id}",
                           f"starling/ledger/want/{keys[i % 3].id}", f"starling/ledger/give/{keys[i % 3].id}"][i % 4],
                          blob))
        for topic, payload in sends:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    time.sleep(1.0)
    after = agree(peers)
    assert [s["ids"] for s in after] == [s["ids"] for s in before]
    assert {s["state"] for s in after} == {before[0]["state"]}
    for s in after:
        assert s["refused"].get("not_a_gateway") == 1 and s["refused"].get("bad_signature") == 1, s["refused"]
        assert sum(s["refused"].values()) >= 50  # the random bytes are counted too, by reason
    peers[2].ask("enroll 1")  # and gossip still works
    agree(peers)


def test_gateways_on_two_bridged_brokers_agree_again_after_a_partition(tmp_path: Path):
    keys, genesis = make_city(tmp_path, 4)
    with Broker(tmp_path / "a", kind="mosquitto") as a, TcpRelay((a.host, a.port)) as relay, \
            Broker(tmp_path / "b", kind="mosquitto", bridge_to=("127.0.0.1", relay.port)) as b:
        peers = [PeerProcess(tmp_path, i, genesis, (a if i < 2 else b).host, (a if i < 2 else b).port, 0.3)
                 for i in range(4)]
        try:
            peers[0].ask("enroll 2")
            peers[3].ask("enroll 2")
            agree(peers)  # through the bridge
            relay.cut()
            for _ in range(3):  # both sides keep writing while apart
                peers[1].ask("enroll 3")
                peers[2].ask("enroll 3")
                time.sleep(0.2)
            side_a, side_b = agree(peers[:2]), agree(peers[2:])
            assert side_a[0]["state"] != side_b[0]["state"]
            relay.heal()
            healed = time.monotonic()
            status = agree(peers)
            assert status[0]["height"] == 1 + 2 + 2 + 18
            assert time.monotonic() - healed < SETTLE_S
        finally:
            for peer in peers:
                peer.close()


def test_a_new_gateway_starts_from_the_newest_final_checkpoint_not_from_genesis(tmp_path: Path):
    keys, genesis = make_city(tmp_path, 4)
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        peers = [PeerProcess(tmp_path, i, genesis, broker.host, broker.port, vv_interval=0.3) for i in range(3)]
        try:
            for peer in peers:
                peer.ask("enroll 10")
            agree(peers)
            checkpoint = peers[0].ask("checkpoint")["id"]
            agree(peers)  # every gateway holds it before it writes again ...
            for peer in peers:  # ... so what each writes next descends from it: final
                peer.ask("enroll 1")
            before = agree(peers)
            newcomer = PeerProcess(tmp_path, 3, genesis, broker.host, broker.port, vv_interval=0.3, bootstrap_s=10)
            peers.append(newcomer)
            status = agree(peers)
            mine = status[3]
            assert mine["bootstrapped_from"] == checkpoint
            assert mine["full_vertices"] == before[0]["height"] - 30  # the 30 enrollments before it: ids only
            newcomer.ask("enroll 2")  # and it writes like any member
            agree(peers)
        finally:
            for peer in peers:
                peer.close()
