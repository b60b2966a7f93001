"""Offline verification: tampering with the file is found, and named, vertex by vertex."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from ledger_helpers import BASE, TASK, run_cli, signed_reply

from ledger.store import Ledger
from ledger.verify import verify_store
from ledger.vertex import Vertex, sign
from protocol import cbor
from protocol.digest import sha256
from protocol.keys import Identity


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Vertex]]:
    """A closed ledger file: genesis, three enrollments, an updates batch, an aggregate."""
    path = tmp_path_factory.mktemp("ledger") / "built.db"
    gateway = Identity.generate()
    devices = [Identity.generate() for _ in range(3)]
    with Ledger.open(path, gateway) as ledger:
        marks = {"genesis": ledger.init_genesis("city-centre", [gateway.public_key])}
        enrolls = [ledger.enroll_device(d.public_key, f"pi-{i}", "allow-list") for i, d in enumerate(devices)]
        marks["enroll"] = enrolls[1]
        records = [signed_reply(d, gateway.id, 1) for d in devices]
        marks["updates"] = ledger.record_updates(gateway.id, 1, TASK, BASE, records)
        marks["aggregate"] = ledger.record_aggregate(
            1, "FedAvg", BASE, [r[1] for r in records], sha256(b"v2")
        )
    assert (
        not path.with_name(path.name + "-wal").exists()
        or path.with_name(path.name + "-wal").stat().st_size == 0
    )
    return path, marks


@pytest.fixture
def copy(built: tuple[Path, dict[str, Vertex]], tmp_path: Path) -> Path:
    path = tmp_path / "copy.db"
    shutil.copy(built[0], path)
    return path


def flip(path: Path, absolute: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[absolute] ^= 0xFF
    path.write_bytes(bytes(raw))


def blob_offset(path: Path, vertex: Vertex) -> int:
    """Where the vertex's encoded bytes sit in the file (small blobs are stored contiguously)."""
    raw = path.read_bytes()
    blob = vertex.encode()
    assert raw.count(blob) == 1, "the vertex should be stored exactly once, contiguously"
    return raw.index(blob)


def test_untouched_store_verifies(built: tuple[Path, dict[str, Vertex]]) -> None:
    report = verify_store(built[0])
    assert report.ok, report
    assert report.checked == 6 and report.bad_vertex is None and report.problems == []


def test_cli_verify_of_untouched_store_exits_0(copy: Path) -> None:
    result = run_cli("verify", "--db", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[0]) == {
        "ok": True,
        "checked": 6,
        "bad_vertex": None,
        "reason": None,
        "problems": [],
    }


@pytest.mark.parametrize("label", ["genesis", "enroll", "updates", "aggregate"])
@pytest.mark.parametrize("where", ["body", "sig"])
def test_flipping_one_stored_byte_makes_cli_verify_fail_naming_that_vertex(
    built: tuple[Path, dict[str, Vertex]], copy: Path, label: str, where: str
) -> None:
    target = built[1][label]
    blob = target.encode()
    part = target.sig if where == "sig" else cbor.dumps(target.body)
    position = blob_offset(copy, target) + blob.index(part) + len(part) // 2
    flip(copy, position)

    result = run_cli("verify", "--db", str(copy))

    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert report["ok"] is False
    assert report["bad_vertex"] == target.id_hex
    expected = ("bad_signature",) if where == "sig" else ("id_mismatch", "undecodable")
    assert report["reason"].split(":")[0] in expected
    assert target.id_hex in result.stdout.splitlines()[1]  # the human line names it too
    others = {v.id_hex for v in built[1].values()} - {target.id_hex}
    assert not any(p["vertex"] in others for p in report["problems"][:1])


def test_flipping_the_middle_byte_of_the_updates_blob_names_it(
    built: tuple[Path, dict[str, Vertex]], copy: Path
) -> None:
    target = built[1]["updates"]
    flip(copy, blob_offset(copy, target) + len(target.encode()) // 2)
    report = verify_store(copy)
    assert not report.ok and report.bad_vertex == target.id_hex


def test_verify_does_not_modify_the_file(copy: Path) -> None:
    before = hashlib.sha256(copy.read_bytes()).digest()
    assert verify_store(copy).ok
    assert hashlib.sha256(copy.read_bytes()).digest() == before


def test_verify_reads_what_a_live_gateway_has_not_checkpointed(db_path: Path, gateway: Identity) -> None:
    with Ledger.open(db_path, gateway) as ledger:
        ledger.init_genesis("city", [gateway.public_key])
        ledger.enroll_device(Identity.generate().public_key, "pi", "open")
        report = verify_store(db_path)
        assert report.ok and report.checked == 2


def test_non_sqlite_file_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(8192))
    report = verify_store(path)
    assert not report.ok and report.bad_vertex is None and report.reason
    result = run_cli("verify", "--db", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert json.loads(result.stdout.splitlines()[0])["ok"] is False


def test_missing_file_fails_without_creating_it(tmp_path: Path) -> None:
    report = verify_store(tmp_path / "absent.db")
    assert not report.ok and "absent.db" in (report.reason or "")
    assert not (tmp_path / "absent.db").exists()


def test_truncated_file_fails_cleanly(copy: Path) -> None:
    raw = copy.read_bytes()
    copy.write_bytes(raw[: len(raw) // 2])
    assert not verify_store(copy).ok


def test_corrupt_page_structure_fails_cleanly(copy: Path) -> None:
    raw = bytearray(copy.read_bytes())
    page_size = int.from_bytes(raw[16:18], "big")
    for page in range(1, len(raw) // page_size):  # scribble over every b-tree page header but the first
        raw[page * page_size : page * page_size + 12] = b"\xff" * 12
    copy.write_bytes(bytes(raw))
    report = verify_store(copy)
    assert not report.ok and report.reason


def test_random_byte_flips_anywhere_never_crash_verify(
    built: tuple[Path, dict[str, Vertex]], tmp_path: Path
) -> None:
    rng = random.Random(7)
    raw = built[0].read_bytes()
    path = tmp_path / "flipped.db"
    for _ in range(40):
        damaged = bytearray(raw)
        damaged[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(damaged))
        report = verify_store(path)  # may pass if the byte was unused space; must not raise
        assert report.ok or report.reason


def test_deleted_vertex_is_detected(built: tuple[Path, dict[str, Vertex]], copy: Path) -> None:
    with sqlite3.connect(copy) as conn:
        conn.execute("DELETE FROM vertices WHERE id = ?", (built[1]["enroll"].id_hex,))
    report = verify_store(copy)
    assert not report.ok
    assert report.bad_vertex is not None and report.bad_vertex != built[1]["enroll"].id_hex


def test_vertex_slipped_in_by_an_outsider_is_named(built: tuple[Path, dict[str, Vertex]], copy: Path) -> None:
    outsider = Identity.generate()
    tips = [built[1]["aggregate"].id]
    vertex = sign(
        outsider, "device.enroll", 0, tips, {"device": outsider.public_key, "name": "x", "policy": "open"}
    )
    with sqlite3.connect(copy) as conn:
        conn.execute(
            "INSERT INTO vertices (id, n, creator, seq, kind, time, depth, data)"
            " VALUES (?, 99, ?, 0, ?, ?, 6, ?)",
            (vertex.id_hex, vertex.creator_id, vertex.kind, vertex.time, vertex.encode()),
        )
    report = verify_store(copy)
    assert report.bad_vertex == vertex.id_hex and report.reason.startswith("not_a_gateway")


def test_edited_query_column_is_named(built: tuple[Path, dict[str, Vertex]], copy: Path) -> None:
    target = built[1]["enroll"]
    with sqlite3.connect(copy) as conn:
        conn.execute("UPDATE vertices SET kind = 'aggregate' WHERE id = ?", (target.id_hex,))
    report = verify_store(copy)
    assert report.bad_vertex == target.id_hex and report.reason.startswith("column_mismatch")


def test_forged_derived_row_is_detected(copy: Path) -> None:
    stranger = Identity.generate()
    with sqlite3.connect(copy) as conn:  # enrolls a device without any vertex saying so
        conn.execute(
            "INSERT INTO devices (public_key, id, name, policy, vertex) VALUES (?, ?, 'evil', 'open', 'x')",
            (stranger.public_key.hex(), stranger.id),
        )
    report = verify_store(copy)
    assert not report.ok and report.reason.startswith("derived_mismatch") and report.bad_vertex is None
