"""`starling-ledger init | join | leave | history | dot`: the operator's membership commands and audits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ledger.store import Ledger
from ledger.vertex import Vertex
from ledger.verify import verify_store
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledger.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_init_join_leave_through_a_gateways_ledger_file(tmp_path: Path):
    a, b, c = (Identity.generate() for _ in range(3))
    done = cli("init", "--root-key", str(tmp_path / "root.key"), "--create-root-key", "--name", "harbour",
               "--gateway", a.public_key.hex(), "--gateway", b.public_key.hex(), "--out", str(tmp_path / "g.cbor"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["root_key_created"] and sorted(summary["gateways"]) == sorted([a.id, b.id])
    assert (tmp_path / "root.key").stat().st_mode & 0o077 == 0
    genesis = Vertex.decode((tmp_path / "g.cbor").read_bytes())
    with Ledger.open(tmp_path / "a.db", a) as ledger:
        ledger.insert_vertex(genesis)
    assert cli("init", "--root-key", str(tmp_path / "root.key"), "--name", "again", "--gateway", a.public_key.hex(),
               "--out", str(tmp_path / "g.cbor")).returncode == 2  # one genesis per city
    joined = cli("join", "--root-key", str(tmp_path / "root.key"), "--db", str(tmp_path / "a.db"),
                 "--gateway", c.public_key.hex(), "--name", "north")
    assert joined.returncode == 0, joined.stderr
    left = cli("leave", "--root-key", str(tmp_path / "root.key"), "--db", str(tmp_path / "a.db"),
               "--gateway", b.id, "--reason", "flooded")
    assert left.returncode == 0, left.stderr
    with Ledger.open(tmp_path / "a.db", read_only=True) as ledger:
        assert ledger.gateways() == sorted([a.public_key, c.public_key])
    assert verify_store(tmp_path / "a.db").ok
    stranger = Identity.generate()
    stranger.save(tmp_path / "stranger.key")
    refused = cli("join", "--root-key", str(tmp_path / "stranger.key"), "--db", str(tmp_path / "a.db"),
                  "--gateway", stranger.public_key.hex(), "--name", "me")
    assert refused.returncode == 2 and "not the root key" in refused.stderr


def test_history_and_dot_show_a_devices_vertices_and_a_rounds_part_of_the_dag(tmp_path: Path):
    gateway, device = Identity.generate(), Identity.generate()
    with Ledger.open(tmp_path / "l.db", gateway) as ledger:
        ledger.init_genesis("solo", [gateway.public_key])
        enrolled = ledger.enroll_device(device.public_key, "d", "open")
        revoked = ledger.revoke_device(device.public_key, "lost")
    done = cli("history", "--db", str(tmp_path / "l.db"), "--device", device.id)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [enrolled.id_hex, revoked.id_hex]
    dot = cli("dot", "--db", str(tmp_path / "l.db"))
    assert dot.returncode == 0 and dot.stdout.startswith("digraph ledger {")
    assert f'"{revoked.id_hex[:12]}" -> "{enrolled.id_hex[:12]}"' in dot.stdout
    missing = cli("history", "--db", str(tmp_path / "l.db"), "--device", "0" * 32)
    assert missing.returncode == 2 and "no device" in missing.stderr
