"""Several processes writing one ledger file as the same gateway: a running gateway and the operator's CLI."""

from __future__ import annotations

import json
import sqlite3
import time
from itertools import pairwise
from pathlib import Path

import pytest
from ledger_helpers import BASE, TASK, cli_env, run_cli, signed_reply, start_writer

from ledger import errors
from ledger.store import Ledger
from ledger.verify import verify_store
from protocol.keys import Identity

WRITES = 15  # rounds per process: 15 enrollments, 5 updates vertices, 4 revocations


@pytest.fixture
def key_file(tmp_path: Path, gateway: Identity) -> Path:
    path = tmp_path / "gateway.key"
    gateway.save(path)
    return path


def test_two_processes_appending_interleaved_get_gapless_seqs_and_a_verifiable_file(
    tmp_path: Path, db_path: Path, gateway: Identity, key_file: Path
) -> None:
    with Ledger.open(db_path, gateway) as ledger:
        ledger.init_genesis("city", [gateway.public_key])
    go = tmp_path / "go"
    writers = [
        start_writer(db_path, key_file, label, other, WRITES, go)
        for label, other in (("gw", "op"), ("op", "gw"))
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.{label}").exists() for label in ("gw", "op")):  # both have the file open
        assert all(w.poll() is None for w in writers), [w.communicate() for w in writers]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    go.touch()
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert "locked" not in err

    assert verify_store(db_path).ok
    with Ledger.open(db_path, read_only=True) as ledger:
        chain = list(ledger.vertices())
        assert len(chain) == 1 + 2 * (WRITES + 5 + 4)
        assert [v.seq for v in chain] == list(range(len(chain)))  # no seq taken twice, none skipped
        assert all(v.parents == (p.id,) for p, v in pairwise(chain))  # one linear chain
        assert ledger.kind_counts() == {"device.enroll": 30, "device.revoke": 8, "genesis": 1, "updates": 10}
        assert len(ledger.enrolled_devices()) == 22 and len(ledger.revoked_devices()) == 8
    # In step: both writers' round i comes before either's round i + 1, in whichever order they won the lock.
    names = [v.body["name"] for v in chain if v.kind == "device.enroll"]
    assert [sorted(names[2 * i : 2 * i + 2]) for i in range(WRITES)] == [
        [f"gw-{i}", f"op-{i}"] for i in range(WRITES)
    ]


def test_cli_revoke_while_a_gateway_has_the_ledger_open(
    ledger: Ledger, db_path: Path, gateway: Identity, key_file: Path, enrolled: list[Identity]
) -> None:
    # `ledger` stays open throughout, as the gateway process keeps it.
    victim = enrolled[1]
    result = run_cli(
        "revoke",
        "--db",
        str(db_path),
        "--key",
        str(key_file),
        "--device",
        victim.id,
        "--reason",
        "tampered enclosure",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["seq"] == 4
    # The gateway's open ledger sees it at once, and carries on at the next seq.
    assert ledger.is_revoked(victim.public_key) and not ledger.is_enrolled(victim.public_key)
    assert victim.public_key not in ledger.enrolled_devices()
    records = [signed_reply(d, gateway.id, 1) for d in enrolled]
    with pytest.raises(errors.DeviceRevoked):
        ledger.record_updates(gateway.id, 1, TASK, BASE, records)
    kept = ledger.record_updates(gateway.id, 1, TASK, BASE, [records[0], records[2]])
    assert kept.seq == 5
    assert verify_store(db_path).ok


def test_a_writer_waits_for_the_lock_instead_of_failing(
    ledger: Ledger, db_path: Path, key_file: Path, enrolled: list[Identity]
) -> None:
    import subprocess
    import sys

    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer in the middle of a transaction
    try:
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ledger.cli",
                "revoke",
                "--db",
                str(db_path),
                "--key",
                str(key_file),
                "--device",
                enrolled[0].public_key.hex(),
                "--reason",
                "lost",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        time.sleep(0.8)  # well past the CLI's start-up (about 0.3 s): it is waiting for the lock
        assert cli.poll() is None, cli.communicate()
    finally:
        holder.execute("COMMIT")
        holder.close()
    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 0, err
    assert ledger.is_revoked(enrolled[0].public_key)
    assert verify_store(db_path).ok
