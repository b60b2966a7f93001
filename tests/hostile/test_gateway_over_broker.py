"""A running gateway (`gateway.service.Gateway` in a thread) under hostile traffic through a real Mosquitto.

One gateway with voucher enrollment and ledger gossip on; one attacker client
floods its reply topic, its enrollment topic and the ledger gossip topics with
mutants of real messages (the gateway's own vertices, real signed replies and
enrollment requests with real vouchers). The gateway must count every refusal
by reason (compared with what was sent), log no traceback, keep its ledger and
its enrolled devices exactly as they were, and still admit an honest device
and answer it afterwards. A second share of enrollment mutants goes straight
to the gateway's enroll handler (`gateway.enrollment.handle`), which is faster
than a broker; it is called once the broker's share has all been counted, so
the worker thread (which otherwise runs it) is not in it at the same time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
import tally
import world
from mutants import Mutator

from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.synthetic import write_manifest
from ledger import gossip as gossip_topics
from ledger.vertex import Vertex
from protocol import topics
from protocol.errors import ProtocolError

REPLIES_BY_BROKER = 15_000
ENROLLS_BY_BROKER = 3_000
ENROLLS_IN_PROCESS = 10_000
VERTICES_BY_BROKER = 3_000
CONTROL_BY_BROKER = 2_000
# gateway/devices.py `Enrollment.handle`: any ProtocolError's reason, then its own checks.
ENROLL_REASONS = {"malformed", "non_canonical", "schema", "limits", "non_finite", "bad_signature", "digest_mismatch",
                  "topic_mismatch", "wrong_gateway", "revoked", "not_allowed", "no_voucher", "bad_voucher"}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Attacker:
    """A plain MQTT client that publishes as fast as QoS 1 allows."""

    def __init__(self, broker) -> None:
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def flood(self, messages: list[tuple[str, bytes]], pace: Callable[[int], None] | None = None) -> None:
        last = None
        for i, (topic, payload) in enumerate(messages):
            last = self.client.publish(topic, payload, qos=1)
            if pace is not None and i % 1000 == 999:
                last.wait_for_publish(30)
                pace(i + 1)
        if last is not None:
            last.wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def running(mosquitto, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    world.GATEWAY.save(tmp / "gw.key")
    config = GatewayConfig(
        name="gw", key=tmp / "gw.key", state_dir=tmp / "state", broker_host=mosquitto.host,
        broker_port=mosquitto.port, manifest=write_manifest(tmp / "model", world.SHAPES), min_devices=100,
        wait_devices_s=600, policy="voucher", operator_keys=(world.OPERATOR.public_key,), gossip=True,
        bootstrap_s=0.0, checkpoint_every=0,
    )
    gateway = Gateway(config, world.GATEWAY)
    stop = threading.Event()
    thread = threading.Thread(target=gateway.run, args=(stop,), daemon=True)
    thread.start()
    wait_until(lambda: gateway.state == "waiting" and gateway.keeper is not None
               and gateway.keeper.sync_link is not None, 30, "the gateway to start")
    time.sleep(0.5)  # its subscriptions are acknowledged
    attacker = Attacker(mosquitto)
    # The attacker is an enrolled device with a real voucher: its replies reach the signature check.
    attacker.flood([(topics.enroll(world.GATEWAY.id, world.HOSTILE.id),
                     world.enroll(world.HOSTILE, voucher_bytes=world.voucher(world.HOSTILE), when=time.time()))])
    wait_until(lambda: gateway.registry.is_enrolled(world.HOSTILE.public_key), 20, "the attacker's enrollment")
    yield gateway, attacker
    attacker.close()
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def ledger_view(gateway: Gateway) -> tuple[list[bytes], str]:
    ledger = gateway.keeper.ledger  # thread-safe: read from the test's thread
    return ledger.ids(), ledger.state_digest()


def enrolled(gateway: Gateway) -> set[bytes]:
    return set(gateway.registry.keys()[0])


def journaled_replies(gateway: Gateway) -> int:
    """Accepted training replies in the gateway's journal (each is written there before its receipt)."""
    with sqlite3.connect(gateway.config.state_dir / "rounds.db", timeout=10) as db:
        return db.execute("select count(*) from accepted").fetchone()[0]


def test_a_reply_flood_through_the_broker_is_counted_reply_for_reply_and_accepts_nothing(running):
    gateway, attacker = running
    mutator = Mutator(seed=81)
    honest = world.reply(world.DEVICE)
    seeds = [world.reply(world.HOSTILE), world.reply(world.HOSTILE, round_=0), world.skip_reply(world.HOSTILE)]
    messages = []
    for _ in range(REPLIES_BY_BROKER):
        if mutator.rng.random() < 0.5:
            messages.append((topics.reply(world.GATEWAY.id, world.DEVICE.id), mutator.mutate(honest)))
        else:
            messages.append((topics.reply(world.GATEWAY.id, world.HOSTILE.id),
                             mutator.mutate(mutator.rng.choice(seeds), world.HOSTILE, 0.3)))
    before = ledger_view(gateway)
    counted = lambda: sum(gateway.book.rejections.values())
    start, duplicates = counted(), gateway.book.duplicates
    attacker.flood(messages, pace=lambda n: wait_until(lambda: counted() - start >= n - 3000, 30, "the gateway"))
    tally.count("gateway reply (broker)", len(messages))
    wait_until(lambda: counted() - start >= len(messages), 60, f"{len(messages)} counted rejections")
    time.sleep(0.2)
    assert counted() - start == len(messages)  # nothing lost, nothing counted twice: nothing accepted
    assert gateway.book.duplicates == duplicates
    assert all(gateway.book.accepted_reply(d.id, world.TASK) is None for d in (world.DEVICE, world.HOSTILE))
    assert journaled_replies(gateway) == 0
    assert ledger_view(gateway) == before
    assert enrolled(gateway) == {world.HOSTILE.public_key}
    assert gateway.state == "waiting"


def enroll_mutants(mutator: Mutator, n: int) -> list[tuple[str, bytes]]:
    """Mutants of an honest request with a real voucher, and a stranger's re-signed requests (bad vouchers)."""
    honest = world.enroll(world.DEVICE, voucher_bytes=world.voucher(world.DEVICE))
    stranger_seeds = [world.enroll(world.STRANGER), world.enroll(world.STRANGER, voucher_bytes=world.voucher(
        world.DEVICE)), world.enroll(world.STRANGER, voucher_bytes=world.voucher(world.STRANGER, operator=world.ROGUE))]
    out = []
    for _ in range(n):
        if mutator.rng.random() < 0.6:
            out.append((topics.enroll(world.GATEWAY.id, world.DEVICE.id), mutator.mutate(honest)))
        else:
            out.append((topics.enroll(world.GATEWAY.id, world.STRANGER.id),
                        mutator.mutate(mutator.rng.choice(stranger_seeds), world.STRANGER, 0.6)))
    return out


def test_enrollment_mutants_are_refused_by_reason_and_enroll_nobody(running):
    gateway, attacker = running
    mutator = Mutator(seed=82)
    before = ledger_view(gateway)
    counted = lambda: sum(dict(gateway.enrollment.rejections).values())
    start = counted()
    by_broker = enroll_mutants(mutator, ENROLLS_BY_BROKER)
    attacker.flood(by_broker)
    tally.count("gateway enroll (broker)", len(by_broker))
    wait_until(lambda: counted() - start >= len(by_broker), 60, "counted enrollment refusals")

    in_process = enroll_mutants(mutator, ENROLLS_IN_PROCESS)
    for topic, payload in in_process:
        gateway.enrollment.handle(topic, payload)
    tally.count("gateway enroll (in-process)", len(in_process))
    time.sleep(0.2)
    rejections = dict(gateway.enrollment.rejections)
    assert counted() - start == len(by_broker) + len(in_process)
    assert set(rejections) <= ENROLL_REASONS, rejections
    assert {"bad_signature", "bad_voucher", "no_voucher", "topic_mismatch", "malformed"} <= set(rejections)
    assert enrolled(gateway) == {world.HOSTILE.public_key}
    assert ledger_view(gateway) == before

    # The honest request itself is still good.
    attacker.flood([(topics.enroll(world.GATEWAY.id, world.DEVICE.id),
                     world.enroll(world.DEVICE, voucher_bytes=world.voucher(world.DEVICE)))])
    wait_until(lambda: gateway.registry.is_enrolled(world.DEVICE.public_key), 20, "the honest enrollment")
    assert len(ledger_view(gateway)[0]) == len(before[0]) + 1


def expected_vertex_refusals(payloads: list[bytes], held: set[bytes]) -> int:
    """Mutants the gossip must refuse: all but those that decode to a vertex already held (ignored as known)."""
    refused = 0
    for payload in payloads:
        try:
            known = Vertex.decode(payload).id in held
        except ProtocolError:
            known = False
        refused += not known
    return refused


def test_gossip_mutants_through_the_broker_are_refused_and_leave_the_ledger_alone(running):
    gateway, attacker = running
    gossip = gateway.keeper.sync_link.gossip
    mutator = Mutator(seed=83)
    vertices = [v.encode() for v in gateway.keeper.ledger.vertices()]
    ids, digest = ledger_view(gateway)
    refused = lambda: sum(dict(gossip.refused).values())

    controls = []
    status = gossip_topics.cbor.dumps(gossip.status())
    want = gossip_topics.cbor.dumps({"from": world.PEER.id, "creator": world.GATEWAY.id, "seq": 0})
    for _ in range(CONTROL_BY_BROKER):
        seed, topic = mutator.rng.choice([(status, gossip_topics.vv_topic(world.PEER.id)),
                                          (want, gossip_topics.want_topic(world.GATEWAY.id))])
        payload = mutator.mutate(seed)
        controls.append((topic, payload))
    limits_before = gossip.refused.get("limits", 0)
    marker = (gossip_topics.vertex_topic(world.PEER.id), b"\x00" * (gossip_topics.MAX_VERTEX_BYTES + 1))
    attacker.flood([*controls, marker])  # in order: when the oversize marker is counted, the controls are done
    wait_until(lambda: gossip.refused.get("limits", 0) > limits_before, 60, "the gossip to read the control flood")
    tally.count("ledger gossip control (broker)", len(controls) + 1)

    start = refused()
    payloads = [mutator.mutate(mutator.rng.choice(vertices)) for _ in range(VERTICES_BY_BROKER)]
    expected = expected_vertex_refusals(payloads, set(ids))
    attacker.flood([(mutator.rng.choice([gossip_topics.vertex_topic(world.GATEWAY.id),
                                         gossip_topics.give_topic(world.GATEWAY.id)]), p) for p in payloads])
    tally.count("ledger gossip vertex (broker)", len(payloads))
    wait_until(lambda: refused() - start >= expected, 60, f"{expected} gossip refusals")
    time.sleep(0.3)
    assert refused() - start == expected
    assert "internal" not in gossip.refused
    assert not gossip.pending  # nothing unsigned waits for parents either
    assert ledger_view(gateway) == (ids, digest)
