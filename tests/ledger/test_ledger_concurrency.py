"""Several gateways writing at once: the same DAG gives the same order and state, whatever the arrival order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ledger import errors
from ledger.store import Ledger
from ledger.verify import verify_store
from ledger.vertex import Vertex, sign
from protocol.keys import Identity


def deliver(vertices: list[Vertex], into: Ledger, rng: random.Random) -> None:
    """Insert in a random order; a vertex whose parents are missing waits, as gossip makes it."""
    waiting = list(vertices)
    rng.shuffle(waiting)
    while waiting:
        progressed = []
        for vertex in waiting:
            try:
                into.insert_vertex(vertex)
                progressed.append(vertex)
            except (errors.MissingParent, errors.NotInitialized):
                pass
        assert progressed, "some vertex can never be applied"
        waiting = [v for v in waiting if v not in progressed]


@pytest.fixture
def city(tmp_path: Path):
    root = Identity.from_seed(b"r" * 32)
    gateways = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(3)]
    with Ledger.open(tmp_path / "root.db", root) as operator:
        genesis = operator.init_genesis("city", [g.public_key for g in gateways])
    stores = [Ledger(tmp_path / f"g{i}.db", g) for i, g in enumerate(gateways)]
    for store in stores:
        store.insert_vertex(genesis)
    yield stores
    for store in stores:
        store.close()


@pytest.mark.parametrize("seed", range(6))
def test_concurrent_enrollments_and_revocations_converge_in_any_delivery_order(city, tmp_path: Path, seed: int):
    rng = random.Random(seed)
    devices = [Identity.from_seed(bytes([100 + i]) * 32).public_key for i in range(5)]
    for _ in range(40):
        i = rng.randrange(len(city))
        store, action = city[i], rng.choice(["enroll", "enroll", "revoke", "sync"])
        if action == "enroll":
            device = rng.choice(devices)
            if not store.is_revoked(device):
                store.enroll_device(device, f"d-by-{i}", "open")  # another gateway may enroll it concurrently
        elif action == "revoke":
            active = sorted(store.enrolled_devices())
            if active:
                store.revoke_device(rng.choice(active), f"by-{i}")
        else:
            source = rng.choice(city)
            deliver(list(source.vertices()), store, rng)
    everything = {v.id: v for store in city for v in store.vertices()}
    digests = set()
    for attempt in range(3):
        with Ledger.open(tmp_path / f"replica-{attempt}.db") as replica:
            deliver(list(everything.values()), replica, rng)
            assert {v.id for v in replica.vertices()} == set(everything)
            digests.add(replica.state_digest())
        assert verify_store(tmp_path / f"replica-{attempt}.db").ok
    for store in city:  # the writers themselves, once they have everything
        deliver(list(everything.values()), store, rng)
        digests.add(store.state_digest())
    assert len(digests) == 1


def test_a_gateway_that_left_is_refused_for_what_it_writes_after_hearing_so(tmp_path: Path):
    root, a, b = (Identity.from_seed(bytes([c]) * 32) for c in b"rab")
    with Ledger.open(tmp_path / "root.db", root) as operator, Ledger.open(tmp_path / "a.db", a) as ledger_a:
        genesis = operator.init_genesis("city", [a.public_key, b.public_key])
        ledger_a.insert_vertex(genesis)
        concurrent = ledger_a.enroll_device(b"\x01" * 32, "before", "open")  # a has not heard yet
        leave = operator.leave_gateway(a.public_key, "decommissioned")
        ledger_a.insert_vertex(leave)
        operator.insert_vertex(concurrent)  # written before a knew: kept
        with pytest.raises(errors.NotAGateway, match="left"):  # its own store refuses it ...
            ledger_a.enroll_device(b"\x02" * 32, "after", "open")
        after = sign(a, "device.enroll", concurrent.seq + 1, ledger_a.tips(),
                     {"device": b"\x02" * 32, "name": "after", "policy": "open"})
        with pytest.raises(errors.NotAGateway, match="left"):  # ... and so does everyone else
            operator.insert_vertex(after)
        assert operator.gateways() == [b.public_key]
    with Ledger.open(tmp_path / "b.db", b) as ledger_b:
        ledger_b.insert_vertex(genesis)
        with pytest.raises(errors.NotRoot):  # a member gateway cannot admit others
            ledger_b.join_gateway(Identity.generate().public_key, "sneaky")


def test_finality_needs_more_than_two_thirds_of_the_gateways(city):
    first = city[0].enroll_device(b"\x07" * 32, "d", "open")
    assert not city[0].is_final(first.id)
    city[1].insert_vertex(first)
    seen_by_two = city[1].enroll_device(b"\x08" * 32, "e", "open")  # descends from `first`
    for store in city:
        for vertex in (first, seen_by_two):
            if store.get(vertex.id) is None:
                store.insert_vertex(vertex)
    assert not city[2].is_final(first.id)  # 2 of 3 is not more than two thirds
    city[2].enroll_device(b"\x09" * 32, "f", "open")  # the third gateway builds on it
    assert city[2].is_final(first.id)
    stats = city[2].finality()
    assert stats["final"] >= 2 and stats["lag"] == stats["height"] - stats["final"]


def test_a_checkpoint_is_checked_by_every_gateway_and_a_wrong_one_refused(city, tmp_path: Path):
    rng = random.Random(7)
    for i, store in enumerate(city):
        store.enroll_device(bytes([i + 1]) * 32, f"d{i}", "open")
    for store in city:
        for source in city:
            deliver(list(source.vertices()), store, rng)
    checkpoint = city[0].write_checkpoint()
    assert checkpoint.body["count"] == city[0].height - 1
    assert city[1].insert_vertex(checkpoint)  # recomputed from its own copy of the past: the same
    lie = sign(Identity.from_seed(bytes([2]) * 32), "checkpoint", checkpoint.seq, list(checkpoint.parents),
               {"count": checkpoint.body["count"], "state": bytes(32)})
    with pytest.raises(errors.BadCheckpoint):
        city[2].insert_vertex(lie)
    assert verify_store(city[1].path).ok


def test_a_new_gateway_starts_from_a_final_checkpoint_and_ends_in_the_same_state(city, tmp_path: Path):
    rng = random.Random(11)
    genesis = next(city[0].vertices())
    for round_ in range(3):
        for i, store in enumerate(city):
            store.enroll_device(bytes([10 * round_ + i + 1]) * 32, f"d{i}", "open")
        if round_ == 1:
            city[0].revoke_device(bytes([1]) * 32, "lost")
        for store in city:
            for source in city:
                deliver(list(source.vertices()), store, rng)
    checkpoint = city[0].write_checkpoint()
    for store in city[1:]:
        store.insert_vertex(checkpoint)
        store.enroll_device(Identity.generate().public_key, "after", "open")  # builds on the checkpoint
    for store in city:
        for source in city:
            deliver(list(source.vertices()), store, rng)
    served = city[2].latest_final_checkpoint()
    assert served is not None and served[0].id == checkpoint.id
    with Ledger.open(tmp_path / "newcomer.db") as newcomer:
        newcomer.insert_vertex(genesis)
        newcomer.bootstrap(genesis, *served)
        assert newcomer.bootstrap_point()[0] == checkpoint.id
        suffix = [v for v in city[1].vertices() if not newcomer.holds(v.id)]
        assert len(suffix) == city[1].height - checkpoint.body["count"] - 1  # only what came after
        deliver(suffix, newcomer, rng)
        assert newcomer.state_digest() == city[1].state_digest()
        assert newcomer.revoked_devices() == city[1].revoked_devices()
    assert verify_store(tmp_path / "newcomer.db").ok


def test_a_bootstrap_from_a_tampered_snapshot_or_another_ledger_is_refused(city, tmp_path: Path):
    genesis = next(city[0].vertices())
    city[0].enroll_device(b"\x05" * 32, "d", "open")
    checkpoint = city[0].write_checkpoint()
    _, snapshot = city[0].bootstrap_point() or (None, None)
    assert snapshot is None  # city[0] holds the whole history
    snapshot = city[0]._read_all("SELECT data FROM snapshots WHERE vertex = ?", checkpoint.id_hex)[0][0]
    with Ledger.open(tmp_path / "n1.db") as newcomer:
        with pytest.raises(errors.BadCheckpoint, match="does not hash"):
            newcomer.bootstrap(genesis, checkpoint, snapshot[:-1] + bytes([snapshot[-1] ^ 1]))
        other_root = Identity.generate()
        other = sign(other_root, "genesis", 0, [], {"name": "elsewhere", "gateways": [other_root.public_key]})
        with pytest.raises(errors.BadCheckpoint, match="another ledger"):
            newcomer.bootstrap(other, checkpoint, snapshot)
        assert newcomer.height == 0
