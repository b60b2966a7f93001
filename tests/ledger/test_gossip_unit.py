"""`ledger.gossip.Gossip` without a broker: two gateways wired through an in-memory bus."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from ledger import gossip as gossip_module
from ledger.gossip import Gossip
from ledger.store import Ledger
from protocol.keys import Identity


class Bus:
    """Every publish goes to every gossip subscribed to the topic (MQTT's + wildcard), in a queue."""

    def __init__(self, shuffle: random.Random | None = None) -> None:
        self.members: list[Gossip] = []
        self.queue: list[tuple[str, bytes]] = []
        self.shuffle = shuffle

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.queue.append((topic, payload))

    def run(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            for member in self.members:
                member.tick(now=time.monotonic() + 3600 * rounds)  # version vectors every round
            batch, self.queue = self.queue, []
            if self.shuffle is not None:
                self.shuffle.shuffle(batch)
            for topic, payload in batch:
                for member in self.members:
                    if any(_matches(pattern, topic) for pattern in member.subscriptions()):
                        member.handle(topic, payload)
            if not self.queue:
                return


def _matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    return len(p) == len(t) and all(a in ("+", b) for a, b in zip(p, t))


@pytest.fixture
def pair(tmp_path: Path):
    root = Identity.from_seed(b"r" * 32)
    keys = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(2)]
    with Ledger.open(tmp_path / "root.db", root) as operator:
        genesis = operator.init_genesis("city", [k.public_key for k in keys])
    ledgers = [Ledger(tmp_path / f"g{i}.db", k) for i, k in enumerate(keys)]
    for ledger in ledgers:
        ledger.insert_vertex(genesis)
    yield ledgers, keys, genesis
    for ledger in ledgers:
        ledger.close()


def test_out_of_order_delivery_and_lost_pushes_end_in_agreement(pair):
    ledgers, keys, _ = pair
    bus = Bus(random.Random(3))
    nodes = [Gossip(ledger, key.id, bus.publish, vv_interval_s=0.0) for ledger, key in zip(ledgers, keys)]
    bus.members = nodes
    for i in range(20):  # written without pushing: only the version vectors can reveal them
        ledgers[i % 2].enroll_device(bytes([i + 1]) * 32, "d", "open")
    bus.run()
    assert ledgers[0].state_digest() == ledgers[1].state_digest()
    assert nodes[0].refused == {} and nodes[1].refused == {} and not nodes[0].pending


def test_a_newcomer_assembles_a_chunked_snapshot_in_any_order(pair, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(gossip_module, "SNAPSHOT_CHUNK", 256)
    monkeypatch.setattr(gossip_module, "WANT_INTERVAL_S", 0.0)  # the bus runs faster than a real clock
    ledgers, keys, genesis = pair
    for i in range(12):
        ledgers[i % 2].enroll_device(bytes([i + 1]) * 32, "d", "open")
    bus = Bus(random.Random(5))
    nodes = [Gossip(ledger, key.id, bus.publish, vv_interval_s=0.0) for ledger, key in zip(ledgers, keys)]
    bus.members = nodes
    bus.run()
    checkpoint = ledgers[0].write_checkpoint()
    nodes[0].announce(checkpoint)
    bus.run()
    ledgers[1].enroll_device(b"\xee" * 32, "after", "open")  # both have built on it: final
    ledgers[0].enroll_device(b"\xef" * 32, "after", "open")
    bus.run()
    assert ledgers[0].is_final(checkpoint.id)
    with Ledger.open(tmp_path / "new.db", Identity.from_seed(b"n" * 32)) as fresh:
        fresh.insert_vertex(genesis)
        newcomer = Gossip(fresh, Identity.from_seed(b"n" * 32).id, bus.publish, vv_interval_s=0.0, bootstrap_s=60)
        bus.members = [*nodes, newcomer]
        bus.run()
        assert newcomer.bootstrapped_from == checkpoint.id_hex
        assert fresh.state_digest() == ledgers[0].state_digest()
