"""hw/city.py: the genesis of an emulated city, and the comparison of its gateways' ledgers."""

from __future__ import annotations

import os
from pathlib import Path

from hw.city import GatewayLedger, compare_ledgers, write_genesis
from ledger.store import Ledger
from ledger.vertex import Vertex
from protocol.keys import Identity


def _city(tmp_path: Path, n: int = 2):
    keys = [Identity.generate() for _ in range(n)]
    genesis = Vertex.decode(write_genesis(tmp_path / "city", "test", [k.public_key for k in keys]).read_bytes())
    ledgers = []
    for i, key in enumerate(keys):
        key.save(tmp_path / f"g{i}.key")
        with Ledger.open(tmp_path / f"g{i}.db", key) as ledger:
            ledger.insert_vertex(genesis)
        ledgers.append(GatewayLedger(f"gw-{i + 1}", tmp_path / f"g{i}.db", tmp_path / f"g{i}.key"))
    return keys, genesis, ledgers


def test_the_genesis_names_every_gateway_and_keeps_the_root_key_private(tmp_path):
    keys, genesis, _ = _city(tmp_path, 3)
    assert genesis.kind == "genesis" and genesis.body["gateways"] == sorted(k.public_key for k in keys)
    genesis.verify_signature()
    assert os.stat(tmp_path / "city" / "operator.key").st_mode & 0o077 == 0
    assert Identity.load(tmp_path / "city" / "operator.key").public_key == genesis.creator


def test_ledgers_that_differ_or_lack_an_accepted_update_are_reported(tmp_path):
    keys, _, ledgers = _city(tmp_path)
    names = {"gw-1": keys[0].public_key, "gw-2": keys[1].public_key}
    with Ledger.open(ledgers[0].path, keys[0]) as a, Ledger.open(ledgers[1].path, keys[1]) as b:
        device = Identity.generate()
        enroll = a.enroll_device(device.public_key, "d", "open")
        assert compare_ledgers(ledgers, {}, names)["identical"] is False
        b.insert_vertex(enroll)
        same = compare_ledgers(ledgers, {}, names)
        assert same["identical"] is True and same["every_accepted_update_in_every_ledger"] is True
        a.record_updates(keys[0].id, 1, "train-1", b"\0" * 32, [(device.public_key, b"\1" * 32, 10, b"\2" * 64)],
                         signatures_checked=True)
    check = compare_ledgers(ledgers, {"gw-1": 1}, names)
    assert check["identical"] is False and check["every_accepted_update_in_every_ledger"] is False
    assert check["recorded_updates"] == {"gw-1": 1, "gw-2": 0}
    assert check["missing_updates"] == {"gw-2": {"gw-1": 1}}
    # A gateway that says it accepted more than its own ledger recorded is caught too.
    assert compare_ledgers(ledgers[:1], {"gw-1": 2}, {"gw-1": keys[0].public_key}
                           )["every_accepted_update_in_every_ledger"] is False
