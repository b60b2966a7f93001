"""Revocation (`device.revoke`): what it changes, what it refuses, and what the verifier re-checks."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from ledger_helpers import BASE, TASK, Record, signed_reply

from ledger import errors, kinds
from ledger.state import MemoryState
from ledger.store import SCHEMA_VERSION, Ledger
from ledger.verify import verify_store
from ledger.vertex import Vertex, sign
from protocol.digest import sha256
from protocol.errors import ProtocolError
from protocol.keys import Identity


def snapshot(ledger: Ledger) -> tuple:
    """Everything observable about the store, to show a refusal changed nothing."""
    return (
        ledger.height,
        ledger.tips(),
        ledger.enrolled_devices(),
        ledger.revoked_devices(),
        [v.id for v in ledger.vertices()],
    )


def raw_insert(path: Path, vertex: Vertex, depth: int) -> None:
    """Put a vertex into the file behind the store's back (as a tamperer or a buggy writer would)."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO vertices (id, n, creator, seq, kind, time, depth, data)"
            " VALUES (?, (SELECT max(n) + 1 FROM vertices), ?, ?, ?, ?, ?, ?)",
            (vertex.id_hex, vertex.creator_id, vertex.seq, vertex.kind, vertex.time, depth, vertex.encode()),
        )
    conn.close()


# --- the kind --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"device": b"short", "reason": "lost"},
        {"device": bytes(32)},
        {"device": bytes(32), "reason": "x" * (kinds.REASON_MAX + 1)},
        {"device": bytes(32), "reason": b"not text"},
        {"device": bytes(32), "reason": "lost", "extra": 1},
    ],
)
def test_revoke_body_schema(body: dict) -> None:
    with pytest.raises(ProtocolError):
        kinds.check_body("device.revoke", body)


def test_revoke_reason_may_be_empty_or_256_characters() -> None:
    kinds.check_body("device.revoke", {"device": bytes(32), "reason": ""})
    kinds.check_body("device.revoke", {"device": bytes(32), "reason": "x" * kinds.REASON_MAX})


def test_memory_state_tracks_revocations() -> None:
    gateway, device = Identity.generate(), Identity.generate()
    vertex = sign(gateway, "device.revoke", 2, [sha256(b"p")], {"device": device.public_key, "reason": "r"})
    state = MemoryState()
    assert state.revocation_of(device.public_key) is None
    state.add_revocation(vertex, device.public_key, "r")
    assert state.revocation_of(device.public_key) == vertex.id and state.revoked == {device.public_key: ("r", vertex.id)}


# --- the store -------------------------------------------------------------------------


def test_revoked_device_is_no_longer_active(ledger: Ledger, enrolled: list[Identity]) -> None:
    victim = enrolled[1]
    vertex = ledger.revoke_device(victim.public_key, "stolen from the lamp post")
    assert vertex.kind == "device.revoke"
    assert vertex.body == {"device": victim.public_key, "reason": "stolen from the lamp post"}
    assert ledger.is_revoked(victim.public_key) and not ledger.is_enrolled(victim.public_key)
    assert ledger.revoked_devices() == {victim.public_key: "stolen from the lamp post"}
    assert ledger.enrolled_devices() == {enrolled[0].public_key: "pi-0", enrolled[2].public_key: "pi-2"}
    assert ledger.is_enrolled(enrolled[0].public_key) and not ledger.is_revoked(enrolled[0].public_key)
    assert ledger.kind_counts() == {"device.enroll": 3, "device.revoke": 1, "genesis": 1}
    assert ledger.tips() == [vertex.id]


def test_revoking_a_device_that_was_never_enrolled_is_refused(ledger: Ledger) -> None:
    before = snapshot(ledger)
    with pytest.raises(errors.UnknownDevice, match="not enrolled"):
        ledger.revoke_device(Identity.generate().public_key, "never seen")
    assert snapshot(ledger) == before


def test_revoking_twice_is_refused(ledger: Ledger, enrolled: list[Identity]) -> None:
    ledger.revoke_device(enrolled[0].public_key, "lost")
    before = snapshot(ledger)
    with pytest.raises(errors.AlreadyRevoked, match="revoked already") as info:
        ledger.revoke_device(enrolled[0].public_key, "lost again")
    assert info.value.reason == "already_revoked" and isinstance(info.value, errors.LedgerError)
    assert snapshot(ledger) == before
    assert ledger.revoked_devices() == {enrolled[0].public_key: "lost"}


def test_revoke_with_a_bad_body_is_refused(ledger: Ledger, enrolled: list[Identity]) -> None:
    before = snapshot(ledger)
    with pytest.raises(errors.InvalidVertex):
        ledger.revoke_device(enrolled[0].public_key, "x" * 257)
    with pytest.raises(errors.InvalidVertex):
        ledger.revoke_device(b"short", "lost")
    assert snapshot(ledger) == before


def test_a_revoked_device_cannot_enroll_again(ledger: Ledger, enrolled: list[Identity]) -> None:
    key = enrolled[0].public_key
    ledger.revoke_device(key, "compromised")
    before = snapshot(ledger)
    with pytest.raises(errors.DeviceRevoked, match="new key") as info:
        ledger.enroll_device(key, "pi-0", "allow-list")
    assert info.value.reason == "revoked"
    with pytest.raises(errors.DeviceRevoked):  # the kind rule itself, not only the convenience method
        ledger.append("device.enroll", {"device": key, "name": "pi-0", "policy": "open"})
    assert snapshot(ledger) == before
    fresh = Identity.generate()  # re-admission takes a fresh key
    assert ledger.enroll_device(fresh.public_key, "pi-0b", "allow-list").kind == "device.enroll"


def test_updates_naming_a_revoked_device_are_refused(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    records = [reply(d, round=2) for d in enrolled]  # signed before the revocation: still refused
    ledger.revoke_device(enrolled[2].public_key, "stolen")
    before = snapshot(ledger)
    with pytest.raises(errors.DeviceRevoked, match="record 2"):
        ledger.record_updates(gateway.id, 2, TASK, BASE, records)
    assert snapshot(ledger) == before
    assert ledger.record_updates(gateway.id, 2, TASK, BASE, records[:2]).kind == "updates"


def test_revocation_keeps_what_the_device_contributed_before(
    ledger: Ledger, gateway: Identity, enrolled: list[Identity], reply: Callable[..., Record]
) -> None:
    records = [reply(d) for d in enrolled]
    updates = ledger.record_updates(gateway.id, 1, TASK, BASE, records)
    revoke = ledger.revoke_device(enrolled[0].public_key, "retired")
    # The round it took part in can still be aggregated: its update was recorded while it was active.
    ledger.record_aggregate(1, "FedAvg", BASE, [r[1] for r in records], sha256(b"v2"))
    enroll = next(v for v in ledger.vertices() if v.kind == "device.enroll")
    assert [v.id for v in ledger.history(enrolled[0].public_key)] == [enroll.id, updates.id, revoke.id]
    assert verify_store(ledger.path).ok


def test_revocation_persists_across_reopen(db_path: Path, gateway: Identity) -> None:
    device = Identity.generate()
    with Ledger.open(db_path, gateway) as ledger:
        ledger.init_genesis("city", [gateway.public_key])
        ledger.enroll_device(device.public_key, "pi", "open")
        ledger.revoke_device(device.public_key, "lost")
    with Ledger.open(db_path, read_only=True) as reader:
        assert reader.is_revoked(device.public_key) and not reader.is_enrolled(device.public_key)
        assert reader.revoked_devices() == {device.public_key: "lost"} and reader.enrolled_devices() == {}


def test_revocation_by_another_gateway_is_honoured(db_path: Path, gateway: Identity) -> None:
    peer = Identity.generate()
    device = Identity.generate()
    with Ledger.open(db_path, gateway) as ledger:
        ledger.init_genesis("city", [gateway.public_key, peer.public_key])
        enroll = ledger.enroll_device(device.public_key, "pi", "open")
        revoke = sign(peer, "device.revoke", 0, [enroll.id], {"device": device.public_key, "reason": "peer"})
        assert ledger.insert_vertex(revoke)
        assert ledger.is_revoked(device.public_key)
        # A peer's updates vertex that still records the revoked device is refused on arrival.
        record = list(signed_reply(device, peer.id, 1))
        body = {"gateway": peer.id, "round": 1, "task": TASK, "base": BASE, "records": [record]}
        late = sign(peer, "updates", 1, [revoke.id], body)
        with pytest.raises(errors.DeviceRevoked):
            ledger.insert_vertex(late)
        assert ledger.tips() == [revoke.id] and ledger.height == 3
        assert [v.id for v in ledger.history(device.public_key)] == [enroll.id, revoke.id]
    assert verify_store(db_path).ok


# --- the verifier ----------------------------------------------------------------------


@pytest.fixture
def revoked_file(db_path: Path, ledger: Ledger, enrolled: list[Identity]) -> Path:
    ledger.revoke_device(enrolled[0].public_key, "stolen")
    ledger.close()
    return db_path


def test_store_with_a_revocation_verifies(revoked_file: Path) -> None:
    report = verify_store(revoked_file)
    assert report.ok, report
    assert report.checked == 5


def test_forged_revocation_row_is_detected(revoked_file: Path, enrolled: list[Identity]) -> None:
    with sqlite3.connect(revoked_file) as conn:  # revokes a device without any vertex saying so
        conn.execute(
            "INSERT INTO revocations (public_key, reason, vertex) VALUES (?, 'evil', 'x')",
            (enrolled[1].public_key.hex(),),
        )
    conn.close()
    report = verify_store(revoked_file)
    assert not report.ok and report.reason.startswith("derived_mismatch") and "revocations" in report.reason


def test_deleted_revocation_row_is_detected(revoked_file: Path) -> None:
    with sqlite3.connect(revoked_file) as conn:  # quietly re-activates the device
        conn.execute("DELETE FROM revocations")
    conn.close()
    report = verify_store(revoked_file)
    assert not report.ok and "revocations" in report.reason


def test_verify_refuses_updates_of_a_revoked_device_slipped_into_the_file(
    revoked_file: Path, gateway: Identity, enrolled: list[Identity]
) -> None:
    with Ledger.open(revoked_file, read_only=True) as reader:
        chain = list(reader.vertices())
    record = list(signed_reply(enrolled[0], gateway.id, 1))
    body = {"gateway": gateway.id, "round": 1, "task": TASK, "base": BASE, "records": [record]}
    # Correctly signed, linked and numbered: only the kind rule can catch it.
    late = sign(gateway, "updates", len(chain), [chain[-1].id], body)
    raw_insert(revoked_file, late, depth=len(chain))
    report = verify_store(revoked_file)
    assert not report.ok and report.bad_vertex == late.id_hex and report.reason.startswith("revoked")


def test_verify_refuses_a_revocation_of_an_unknown_device(
    db_path: Path, ledger: Ledger, gateway: Identity
) -> None:
    genesis = next(ledger.vertices())
    ledger.close()
    bogus = sign(gateway, "device.revoke", 1, [genesis.id], {"device": bytes(32), "reason": "x"})
    raw_insert(db_path, bogus, depth=1)
    report = verify_store(db_path)
    assert report.bad_vertex == bogus.id_hex and report.reason.startswith("unknown_device")


# --- schema version 1 files (before revocation) ----------------------------------------


def downgrade_to_v1(path: Path) -> None:
    """Make the file look as schema 1 wrote it: no revocations table."""
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE revocations")
        conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_schema_1_file_is_refused_read_only_and_rebuilt_by_a_writer(
    tmp_path: Path, db_path: Path, ledger: Ledger, gateway: Identity, enrolled: list[Identity]
) -> None:
    ledger.close()
    downgrade_to_v1(db_path)
    copy = tmp_path / "copy.db"
    shutil.copy(db_path, copy)
    with pytest.raises(errors.StoreError, match="older than"):  # read-only: nothing on disk changes
        Ledger.open(db_path, read_only=True)
    assert db_path.read_bytes() == copy.read_bytes()
    assert not verify_store(db_path).ok
    with Ledger.open(db_path, gateway) as writer:  # a writer rebuilds it in place from its vertices
        assert len(writer.enrolled_devices()) == 3 and len(writer.history(enrolled[0].public_key)) == 1
        assert writer.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        writer.revoke_device(enrolled[0].public_key, "upgraded")
        assert writer.revoked_devices() == {enrolled[0].public_key: "upgraded"}
    assert verify_store(db_path).ok


def test_newer_schema_is_refused(db_path: Path, ledger: Ledger) -> None:
    ledger.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(errors.StoreError, match="schema version"):
        Ledger.open(db_path, read_only=True)
    assert not verify_store(db_path).ok
