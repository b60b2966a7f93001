"""The SQLite store: what it accepts, what it refuses (writing nothing), order and persistence."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from ledger_helpers import BASE, TASK, Record, signed_reply

from ledger import errors
from ledger.verify import verify_store
from ledger.store import Ledger
from ledger.vertex import Vertex, sign
from protocol.digest import sha256
from protocol.keys import Identity


def snapshot(ledger: Ledger) -> tuple:
    """Everything observable about the store, to show a refusal changed nothing."""
    return ledger.height, ledger.tips(), ledger.enrolled_devices(), [v.id for v in ledger.vertices()]


# --- genesis ---------------------------------------------------------------------------


def test_genesis_is_seq_0_without_parents_and_names_the_gateways(db_path: Path, gateway: Identity) -> None:
    other = Identity.generate()
    with Ledger.open(db_path, gateway) as ledger:
        assert not ledger.is_initialized
        genesis = ledger.init_genesis("city-centre", [other.public_key, gateway.public_key])
        assert ledger.is_initialized
        assert (genesis.kind, genesis.seq, genesis.parents) == ("genesis", 0, ())
        assert genesis.body["gateways"] == sorted([other.public_key, gateway.public_key])
        assert ledger.gateways() == sorted([other.public_key, gateway.public_key])
        assert ledger.tips() == [genesis.id] and ledger.height == 1


def test_a_root_key_that_is_no_gateway_signs_genesis_and_membership_changes_only(db_path: Path) -> None:
    root, member = Identity.generate(), Identity.generate()
    with Ledger.open(db_path, root) as ledger:
        genesis = ledger.init_genesis("city", [member.public_key])
        assert ledger.root == root.public_key and ledger.gateways() == [member.public_key]
        with pytest.raises(errors.NotAGateway, match="membership changes and cleared evidence only"):
            ledger.enroll_device(Identity.generate().public_key, "d", "open")
        assert ledger.height == 1 and ledger.tips() == [genesis.id]


def test_second_genesis_is_refused(ledger: Ledger, gateway: Identity) -> None:
    with pytest.raises(errors.AlreadyInitialized):
        ledger.init_genesis("again", [gateway.public_key])
    assert ledger.height == 1


def test_append_before_genesis_is_refused(db_path: Path, gateway: Identity) -> None:
    with Ledger.open(db_path, gateway) as ledger:
        with pytest.raises(errors.NotInitialized):
            ledger.enroll_device(Identity.generate().public_key, "pi", "open")
        assert ledger.height == 0


# --- enrollment ------------------------------------------------------------------------


def test_enroll_device_records_it(ledger: Ledger) -> None:
    device = Identity.generate()
    vertex = ledger.enroll_device(device.public_key, "pi-7", "voucher")
    assert vertex.kind == "device.enroll"
    assert vertex.body == {"device": device.public_key, "name": "pi-7", "policy": "voucher"}
    assert ledger.is_enrolled(device.public_key)
    assert ledger.enrolled_devices() == {device.public_key: "pi-7"}


def test_enroll_device_again_returns_the_existing_vertex_and_writes_nothing(ledger: Ledger) -> None:
    device = Identity.generate()
    first = ledger.enroll_device(device.public_key, "pi-7", "voucher")
    before = snapshot(ledger)
    again = ledger.enroll_device(device.public_key, "renamed", "open")
    assert again == first
    assert snapshot(ledger) == before


def test_appending_a_second_enroll_for_one_device_is_refused(ledger: Ledger) -> None:
    device = Identity.generate()
    ledger.enroll_device(device.public_key, "pi", "open")
    with pytest.raises(errors.AlreadyEnrolled):
        ledger.append("device.enroll", {"device": device.public_key, "name": "pi", "policy": "open"})


def test_append_with_a_body_that_breaks_the_schema_is_refused(ledger: Ledger) -> None:
    before = snapshot(ledger)
    with pytest.raises(errors.InvalidVertex):
        ledger.append("device.enroll", {"device": b"short", "name": "pi", "policy": "open"})
    with pytest.raises(errors.InvalidVertex):
        ledger.append("device.revoke", {})
    assert snapshot(ledger) == before


# --- updates ---------------------------------------------------------------------------


def test_updates_batch_of_real_device_signed_replies_is_accepted(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    records = [reply(d, round=4) for d in enrolled]
    vertex = ledger.record_updates(gateway.id, 4, TASK, BASE, records)
    assert vertex.kind == "updates"
    assert vertex.body["records"] == [list(r) for r in records]
    assert ledger.get(vertex.id) == vertex
    assert ledger.tips() == [vertex.id]


def test_record_with_forged_device_signature_is_refused_and_nothing_written(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    good = [reply(d) for d in enrolled]
    device, digest, examples, sig = good[1]
    forged = (device, digest, examples + 1, sig)  # claims more examples than the device signed
    before = snapshot(ledger)
    with pytest.raises(errors.BadDeviceSignature, match="record 1"):
        ledger.record_updates(gateway.id, 1, TASK, BASE, [good[0], forged, good[2]])
    assert snapshot(ledger) == before


def test_record_signed_by_another_key_is_refused(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    impostor = Identity.generate()
    _, digest, examples, sig = reply(impostor)
    before = snapshot(ledger)
    with pytest.raises(errors.BadDeviceSignature):
        ledger.record_updates(gateway.id, 1, TASK, BASE, [(enrolled[0].public_key, digest, examples, sig)])
    assert snapshot(ledger) == before


@pytest.mark.parametrize("field", ["round", "task", "base"])
def test_reply_signed_for_another_context_is_refused(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], field: str
) -> None:
    context = {"round": 1, "task": TASK, "base": BASE}
    signed = signed_reply(enrolled[0], gateway.id, **context)
    context[field] = {"round": 2, "task": "other", "base": sha256(b"other")}[field]
    with pytest.raises(errors.BadDeviceSignature):
        ledger.record_updates(gateway.id, context["round"], context["task"], context["base"], [signed])
    assert ledger.height == 4


def test_record_from_unenrolled_device_is_refused_and_nothing_written(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    stranger = Identity.generate()
    before = snapshot(ledger)
    with pytest.raises(errors.UnknownDevice, match="record 1"):
        ledger.record_updates(gateway.id, 1, TASK, BASE, [reply(enrolled[0]), reply(stranger)])
    assert snapshot(ledger) == before


def test_updates_for_another_gateway_are_refused(ledger: Ledger, enrolled: list[Identity]) -> None:
    other = Identity.generate().id
    with pytest.raises(errors.WrongGateway):
        ledger.record_updates(other, 1, TASK, BASE, [signed_reply(enrolled[0], other, 1)])
    assert ledger.height == 4


def test_replayed_update_is_refused(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    record = reply(enrolled[0])
    ledger.record_updates(gateway.id, 1, TASK, BASE, [record])
    before = snapshot(ledger)
    with pytest.raises(errors.DuplicateUpdate):
        ledger.record_updates(gateway.id, 1, TASK, BASE, [reply(enrolled[1]), record])
    assert snapshot(ledger) == before


# --- aggregate -------------------------------------------------------------------------


def test_aggregate_of_recorded_updates_is_accepted(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    records = [reply(d) for d in enrolled]
    ledger.record_updates(gateway.id, 1, TASK, BASE, records)
    output = sha256(b"global model v7")
    vertex = ledger.record_aggregate(1, "FedAvg", BASE, [r[1] for r in records], output)
    inputs = [r[1] for r in records]
    assert vertex.body == {"round": 1, "strategy": "FedAvg", "base": BASE, "inputs": inputs, "output": output}


def test_aggregate_naming_an_unknown_input_is_refused(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    records = [reply(d) for d in enrolled]
    ledger.record_updates(gateway.id, 1, TASK, BASE, records)
    before = snapshot(ledger)
    with pytest.raises(errors.UnknownInput):
        ledger.record_aggregate(1, "FedAvg", BASE, [records[0][1], sha256(b"never recorded")], sha256(b"out"))
    assert snapshot(ledger) == before


# --- links, order ----------------------------------------------------------------------


def test_each_append_links_to_own_previous_vertex_with_the_next_seq(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    ledger.record_updates(gateway.id, 1, TASK, BASE, [reply(enrolled[0])])
    chain = list(ledger.vertices())
    assert [v.seq for v in chain] == list(range(len(chain)))
    for previous, vertex in pairwise(chain):
        assert vertex.parents == (previous.id,)
        assert vertex.creator == gateway.public_key
        assert vertex.time >= previous.time


def fork(gateway: Identity, peer: Identity, db: Path) -> list[Vertex]:
    """Two gateways writing concurrently: vertices from both, with ties in depth."""
    with Ledger.open(db, gateway) as ledger:
        ledger.init_genesis("city", [gateway.public_key, peer.public_key])
        ours = ledger.enroll_device(Identity.generate().public_key, "a", "open")
        genesis = next(ledger.vertices())

        def enroll_body(name: str) -> dict:
            return {"device": Identity.generate().public_key, "name": name, "policy": "open"}

        theirs = [sign(peer, "device.enroll", 0, [genesis.id], enroll_body("b"))]
        theirs.append(sign(peer, "device.enroll", 1, [theirs[0].id], enroll_body("c")))
        for vertex in theirs:
            assert ledger.insert_vertex(vertex)
        assert ledger.tips() == sorted([ours.id, theirs[1].id])
        joined = ledger.enroll_device(Identity.generate().public_key, "d", "open")
        assert set(joined.parents) == {ours.id, theirs[1].id}
        return list(ledger.vertices())


def test_vertices_come_in_topological_order_with_ties_by_id(tmp_path: Path, gateway: Identity) -> None:
    order = fork(gateway, Identity.generate(), tmp_path / "a.db")
    seen: set[bytes] = set()
    for vertex in order:
        assert set(vertex.parents) <= seen  # parents first
        seen.add(vertex.id)
    depth1 = [v for v in order if v.parents == (order[0].id,)]
    assert len(depth1) == 2 and depth1[0].id < depth1[1].id


def test_order_is_the_same_whatever_order_vertices_arrived_in(tmp_path: Path, gateway: Identity) -> None:
    order = fork(gateway, Identity.generate(), tmp_path / "a.db")
    # Replay into a fresh store, peer's vertices first where the DAG allows it.
    replay = [order[0]] + sorted(order[1:], key=lambda v: (v.creator == gateway.public_key, v.seq))
    with Ledger.open(tmp_path / "b.db") as copy:
        for vertex in replay:
            assert copy.insert_vertex(vertex)
        assert [v.id for v in copy.vertices()] == [v.id for v in order]


# --- vertices from elsewhere -----------------------------------------------------------


def test_insert_vertex_is_idempotent(tmp_path: Path, ledger: Ledger) -> None:
    genesis = next(ledger.vertices())
    with Ledger.open(tmp_path / "copy.db") as copy:
        assert copy.insert_vertex(genesis) is True
        assert copy.insert_vertex(genesis) is False
        assert copy.height == 1


def test_insert_vertex_applies_the_same_rules(ledger: Ledger, gateway: Identity) -> None:
    genesis = next(ledger.vertices())
    device = {"device": Identity.generate().public_key, "name": "x", "policy": "open"}
    outsider = Identity.generate()
    cases = [
        (errors.NotAGateway, sign(outsider, "device.enroll", 0, [genesis.id], device)),
        (errors.MissingParent, sign(gateway, "device.enroll", 1, [sha256(b"nowhere")], device)),
        (errors.BadSequence, sign(gateway, "device.enroll", 2, [genesis.id], device)),
        (errors.InvalidVertex, sign(gateway, "device.enroll", 1, [], device)),
    ]
    good = sign(gateway, "device.enroll", 1, [genesis.id], device)
    cases.append((errors.BadVertexSignature, dataclasses.replace(good, time=good.time + 1)))
    before = snapshot(ledger)
    for error, vertex in cases:
        with pytest.raises(error):
            ledger.insert_vertex(vertex)
    assert snapshot(ledger) == before
    assert ledger.insert_vertex(good)


def test_a_second_vertex_with_the_same_creator_and_seq_is_kept_as_evidence_and_flagged(
    ledger: Ledger, gateway: Identity
) -> None:
    genesis = next(ledger.vertices())
    first = sign(gateway, "device.enroll", 1, [genesis.id], {"device": b"\x01" * 32, "name": "a", "policy": "open"})
    second = sign(gateway, "device.enroll", 1, [genesis.id], {"device": b"\x02" * 32, "name": "b", "policy": "open"})
    assert ledger.insert_vertex(first) and ledger.insert_vertex(second)
    assert ledger.equivocators() == {gateway.id: [1]}
    assert {v.id for v in ledger.vertices()} == {genesis.id, first.id, second.id}
    assert verify_store(ledger.path).ok


def test_vertex_that_skips_its_creators_previous_vertex_is_refused(db_path: Path, gateway: Identity) -> None:
    peer = Identity.generate()
    with Ledger.open(db_path, gateway) as ledger:
        genesis = ledger.init_genesis("city", [gateway.public_key, peer.public_key])
        body = {"device": Identity.generate().public_key, "name": "b", "policy": "open"}
        theirs = sign(peer, "device.enroll", 0, [genesis.id], body)
        assert ledger.insert_vertex(theirs)
        body = {"device": Identity.generate().public_key, "name": "c", "policy": "open"}
        with pytest.raises(errors.BadSequence, match="previous vertex"):
            ledger.insert_vertex(sign(gateway, "device.enroll", 1, [theirs.id], body))
        assert ledger.insert_vertex(sign(gateway, "device.enroll", 1, [genesis.id, theirs.id], body))


# --- queries ---------------------------------------------------------------------------


def test_history_lists_a_devices_enrollment_and_its_updates(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    first = ledger.record_updates(gateway.id, 1, TASK, BASE, [reply(enrolled[0], 1), reply(enrolled[1], 1)])
    second = ledger.record_updates(gateway.id, 2, TASK, BASE, [reply(enrolled[1], 2)])
    enroll = [v for v in ledger.vertices() if v.kind == "device.enroll"]
    assert [v.id for v in ledger.history(enrolled[0].public_key)] == [enroll[0].id, first.id]
    assert [v.id for v in ledger.history(enrolled[1].public_key)] == [enroll[1].id, first.id, second.id]
    assert ledger.history(enrolled[2].public_key) == [enroll[2]]
    assert ledger.history(Identity.generate().public_key) == []


def test_get_unknown_id_is_none(ledger: Ledger) -> None:
    assert ledger.get(sha256(b"nothing")) is None


def test_kind_counts(ledger: Ledger, enrolled: list[Identity]) -> None:
    assert ledger.kind_counts() == {"device.enroll": 3, "genesis": 1}


# --- the file --------------------------------------------------------------------------


def test_store_uses_wal_with_full_sync_and_persists_across_reopen(db_path: Path, gateway: Identity) -> None:
    with Ledger.open(db_path, gateway) as ledger:
        ledger.init_genesis("city", [gateway.public_key])
        assert ledger.db.journal_mode == "wal"
        assert ledger.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        device = Identity.generate()
        vertex = ledger.enroll_device(device.public_key, "pi", "open")
    with Ledger.open(db_path, gateway) as again:
        assert again.height == 2 and again.get(vertex.id) == vertex and again.is_enrolled(device.public_key)
        assert again.enroll_device(Identity.generate().public_key, "pi-2", "open").seq == 2


def test_close_checkpoints_the_wal_into_the_main_file(db_path: Path, gateway: Identity) -> None:
    with Ledger.open(db_path, gateway) as ledger:
        genesis = ledger.init_genesis("city", [gateway.public_key])
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert genesis.encode() in db_path.read_bytes()


def test_vertices_table_has_the_documented_columns(ledger: Ledger) -> None:
    columns = {c.name: c.type for c in ledger.db["vertices"].columns}
    documented = {
        "id": "TEXT",
        "creator": "TEXT",
        "seq": "INTEGER",
        "kind": "TEXT",
        "time": "REAL",
        "data": "BLOB",
    }
    assert documented.items() <= columns.items()
    row = ledger.db.execute("SELECT id, creator, data FROM vertices").fetchone()
    genesis = Vertex.decode(row[2])
    assert row[0] == genesis.id_hex and row[1] == genesis.creator_id


def test_without_identity_the_ledger_is_query_only(db_path: Path, ledger: Ledger) -> None:
    with Ledger.open(db_path) as reader:
        assert reader.height == 1
        with pytest.raises(errors.NoIdentity):
            reader.enroll_device(Identity.generate().public_key, "pi", "open")


def test_read_only_ledger_refuses_writes_and_never_creates_files(tmp_path: Path, gateway: Identity) -> None:
    with pytest.raises(errors.StoreError):
        Ledger.open(tmp_path / "absent.db", read_only=True)
    assert not (tmp_path / "absent.db").exists()
    with Ledger.open(tmp_path / "l.db", gateway) as ledger:
        ledger.init_genesis("city", [gateway.public_key])
    with Ledger.open(tmp_path / "l.db", gateway, read_only=True) as reader:
        with pytest.raises(errors.StoreError):
            reader.enroll_device(Identity.generate().public_key, "pi", "open")


def test_other_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    with pytest.raises(errors.StoreError):
        Ledger.open(path)
    with sqlite3.connect(path) as conn:  # and left it as it was
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_non_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(errors.StoreError):
        Ledger.open(path)


def test_record_updates_takes_a_batch_of_1000_signed_records_in_one_vertex(ledger: Ledger, gateway: Identity) -> None:
    # Its speed is measured by a benchmark, not here: a timed test would fail on a busy machine.
    devices = [Identity.generate() for _ in range(1000)]
    for i, device in enumerate(devices):
        ledger.enroll_device(device.public_key, f"pi-{i}", "open")
    records = [signed_reply(d, gateway.id, 9) for d in devices]
    vertex = ledger.record_updates(gateway.id, 9, TASK, BASE, records)
    assert len(vertex.body["records"]) == 1000
    assert ledger.height == 1 + 1000 + 1


def test_appends_from_several_threads_get_consecutive_seqs(ledger: Ledger) -> None:
    def enroll_many(n: int) -> None:
        for i in range(10):
            ledger.enroll_device(Identity.generate().public_key, f"t{n}-{i}", "open")

    threads = [threading.Thread(target=enroll_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    chain = list(ledger.vertices())
    assert [v.seq for v in chain] == list(range(41))
    assert all(v.parents == (p.id,) for p, v in pairwise(chain))
