"""The running gateway keeps every update and model its ledger names, by digest, and serves them.

A real gateway (in a thread: its status board is at hand) runs rounds with
real agents over a real Mosquitto. While it runs, an auditor with its own
empty store and its own node id fetches an update and the newest model by
digest from it (starling/blobs/want|give). After the stop, every update digest
and every model digest on the ledger is in the gateway's blob store. Started
again with `[blobs] keep = 2` for one more round, the gateway prunes what
retention does not keep: the older rounds' blobs go, the newest round's
updates and the models it began from and made stay.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.service import Agent
from gateway.blob_exchange import BlobExchange
from gateway.blob_keeper import BlobKeeper, BlobSettings
from gateway.blobs import BlobStore
from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from ledger.store import Ledger
from protocol import schemas
from protocol.digest import sha256
from protocol.keys import Identity

SHAPES = {"dense_w": (8, 4), "dense_b": (4,)}
DEVICES = 2


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


def on_ledger(path: Path) -> tuple[set[bytes], list[bytes], dict[bytes, int]]:
    """Every update digest, every model digest (in the order the ledger names them), and each update's round."""
    with Ledger.open(path, read_only=True) as ledger:
        updates = {digest: records[0][2] for digest, records in ledger.update_records().items()}
        models = [v.body["model"] for v in ledger.vertices_of("lineage")]
        for vertex in ledger.vertices_of("aggregate"):
            models += [vertex.body["base"], vertex.body["output"]]
    return set(updates), list(dict.fromkeys(models)), updates


def aggregates(path: Path) -> list[dict]:
    """The aggregate vertices' bodies, oldest round first."""
    if not path.exists():
        return []
    with Ledger.open(path, read_only=True) as ledger:
        return sorted((v.body for v in ledger.vertices_of("aggregate")), key=lambda body: body["round"])


def test_every_digest_the_ledger_names_is_kept_served_to_an_auditor_and_pruned_by_retention(broker, tmp_path):
    gw_key = Identity.generate()
    base = {"name": "gw", "key": tmp_path / "gw.key", "state_dir": tmp_path / "gw", "broker_host": broker.host,
            "broker_port": broker.port, "manifest": write_manifest(tmp_path / "model", SHAPES), "strategy": "FedAvg",
            "deadline_s": 20, "epochs": 1, "batch_size": 32, "lr": 0.5, "min_devices": DEVICES, "wait_devices_s": 30,
            "policy": "open"}
    gw_key.save(tmp_path / "gw.key")
    agents, agent_stop = [], threading.Event()
    for i in range(DEVICES):
        cfg = AgentConfig(name=f"syn-{i}", key=tmp_path / f"d{i}.key", state_dir=tmp_path / f"d{i}",
                          gateway_id=gw_key.id, gateway_public_key=gw_key.public_key, broker_host=broker.host,
                          broker_port=broker.port, replay=tmp_path / "none.npz", enroll_retry_s=0.5)
        agent = Agent(cfg, Identity.generate(), SyntheticModel(SHAPES, seed=i + 1), synthetic_data(64))
        thread = threading.Thread(target=agent.run, args=(agent_stop,), daemon=True)
        thread.start()
        agents.append(thread)
    ledger_path = tmp_path / "gw" / "ledger.db"
    stop = threading.Event()
    try:
        # A service (no round count): it runs until stopped, and serves its blobs meanwhile.
        gateway, result = Gateway(GatewayConfig(**base), gw_key), {}
        running = threading.Thread(target=lambda: result.update(gateway.run(stop)), daemon=True)
        running.start()
        deadline = time.monotonic() + 30
        while len(aggregates(ledger_path)) < 2 and time.monotonic() < deadline and running.is_alive():
            time.sleep(0.1)
        assert len(aggregates(ledger_path)) >= 2, result
        gateway.blobs.flush(10)
        updates, models, rounds = on_ledger(ledger_path)
        first_update = next(d for d, r in rounds.items() if r == 1)
        newest_model = aggregates(ledger_path)[-1]["output"]
        auditor = Identity.generate()
        with BlobExchange(BlobStore(tmp_path / "auditor"), auditor.id, broker.host, broker.port) as exchange:
            fetched = [exchange.fetch(d, [gw_key.id], tag=0).result(timeout=15) for d in (first_update, newest_model)]
            status = gateway.board.status()["blobs"]  # (the status topic's `blobs` field)
        stop.set()
        running.join(30)
        assert [(f.reason, f.holder) for f in fetched] == [("ok", gw_key.id)] * 2
        assert sha256(fetched[0].data) == first_update and schemas.check_update(fetched[0].data)
        assert sha256(fetched[1].data) == newest_model and set(schemas.decode_model(fetched[1].data)) == set(SHAPES)
        assert status["serving"] and status["exchange"]["served"] >= 2 and status["not_stored"] == 0
        assert result["state"] == "stopped", result

        # Every digest the ledger names, now that the gateway stopped (what was queued went to disk first).
        updates, models, rounds = on_ledger(ledger_path)
        assert len(updates) >= 2 * DEVICES and len(models) >= 3  # the first model and at least two rounds'
        store = BlobStore(tmp_path / "gw" / "blobs")
        assert [d.hex()[:16] for d in updates | set(models) if store.get(d) is None] == []
        assert store.get(bytes.fromhex(result["model"]["digest"])) is not None  # the head devices are on
        kept = result["blobs"]
        assert kept["blobs"] == store.status()["blobs"] >= len(updates) + len(models)
        assert (kept["pending"], kept["not_stored"], kept["corrupt"], kept["keep_tags"]) == (0, 0, 0, 4)
        assert json.loads((tmp_path / "gw" / "result.json").read_text())["blobs"] == kept

        # Started again with keep = 2 for one more round: its start publishes the head again (kept again),
        # and after the round only the two newest tags stay: the round's updates, its base and its output.
        last = max(r["round"] for r in result["rounds"])
        again = GatewayConfig(**base, num_rounds=last + 1, blobs=BlobSettings(keep=2))
        second: dict = {}
        running = threading.Thread(target=lambda: second.update(Gateway(again, gw_key).run(threading.Event())),
                                   daemon=True)
        running.start()
        running.join(30)
        assert second.get("state") == "done", second
    finally:
        stop.set()
        agent_stop.set()
        for thread in agents:
            thread.join(20)
    updates, models, rounds = on_ledger(ledger_path)
    newest_round = max(rounds.values())
    store = BlobStore(tmp_path / "gw" / "blobs")
    head = bytes.fromhex(second["model"]["digest"])
    last_aggregate = aggregates(ledger_path)[-1]
    assert last_aggregate["output"] == head and last_aggregate["round"] == newest_round
    keep = {head, last_aggregate["base"]} | {d for d, r in rounds.items() if r == newest_round}
    assert {d.hex()[:16] for d in keep if not store.has(d)} == set()
    pruned = (updates | set(models)) - keep
    assert pruned and {d.hex()[:16] for d in pruned if store.has(d)} == set()
    assert store.status()["tags"] == 2 and second["blobs"]["keep_tags"] == 2
    assert second["blobs"]["blobs"] == len(keep)


def test_a_gateway_on_a_bridged_broker_fetches_a_blob_from_one_on_the_other(tmp_path):
    """hw.broker bridges starling/blobs/# with the ledger's gossip: gateways in two districts reach each other."""
    model = np.random.default_rng(1).standard_normal(150_000).astype(np.float32)
    data = schemas.encode_model({"w": model})  # 600 KB: three chunks across the bridge
    holder, asker = Identity.generate(), Identity.generate()
    with Broker(tmp_path / "a", kind="mosquitto") as a, \
            Broker(tmp_path / "b", kind="mosquitto", bridge_to=(a.host, a.port)) as b:
        store = BlobStore(tmp_path / "holder")
        digest = store.put(data, 7)
        with BlobExchange(store, holder.id, a.host, a.port), \
                BlobExchange(BlobStore(tmp_path / "asker"), asker.id, b.host, b.port) as exchange:
            fetched = exchange.fetch(digest, [holder.id], tag=7, timeout_s=15).result(timeout=20)
    assert (fetched.reason, fetched.holder, fetched.data == data) == ("ok", holder.id, True)


def test_a_blob_that_cannot_be_kept_is_one_logged_line_and_a_count_never_an_error(tmp_path, caplog, monkeypatch):
    keeper = BlobKeeper(tmp_path / "blobs", BlobSettings(serve=False), "ab" * 16, ("127.0.0.1", 1, None))
    try:
        def disk_full(blobs, tag):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(keeper.store, "put_many", disk_full)
        model = schemas.encode_model({"w": np.zeros(3, np.float32)})
        with caplog.at_level(logging.INFO, logger="starling.gateway.blobs"):
            keeper.keep_updates(3, [b"a", b"b"])  # never raises, whatever the disk says
            keeper.keep_model(3, sha256(model), model)
            keeper.keep_model(3, sha256(b"other bytes"), model)  # bytes that are not the release's: refused
            keeper.end_round(3, sha256(model))
            assert keeper.flush(10)
        failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("blob.not_stored")]
        assert len(failures) == 2, failures
        assert "what=updates tag=3 blobs=2" in failures[0] and "No space left on device" in failures[0]
        assert "what=model tag=3 blobs=1" in failures[1] and "do not hash to the release digest" in failures[1]
        status = keeper.status()
        assert (status["not_stored"], status["blobs"], status["pending"], status["serving"]) == (3, 1, 0, False)
        assert keeper.store.get(sha256(model)) == model
    finally:
        keeper.close()
    keeper.keep_updates(4, [b"late"])  # after the close: logged and counted, not raised
    assert keeper.not_stored == 4


def test_retention_prunes_after_each_round_but_never_when_the_tags_went_back(tmp_path, caplog):
    keeper = BlobKeeper(tmp_path / "blobs", BlobSettings(keep=2, serve=False), "ab" * 16, ("127.0.0.1", 1, None))
    models = [schemas.encode_model({"w": np.full(3, i, np.float32)}) for i in range(4)]
    try:
        for version, model in enumerate(models[:3]):  # a release per round, each under its own version
            keeper.keep_updates(version, [b"update %d" % version])
            keeper.keep_model(version, sha256(model), model)
            keeper.end_round(version, sha256(model))
        assert keeper.flush(10)
        assert keeper.store.tags() == [1, 2] and not keeper.store.has(sha256(models[0]))
        with caplog.at_level(logging.WARNING, logger="starling.gateway.blobs"):
            keeper.keep_model(0, sha256(models[3]), models[3])  # a journal lost: versions start again at 0
            keeper.end_round(0, sha256(models[3]))
            assert keeper.flush(10)
        assert "blob.not_pruned tag=0 newest=2" in caplog.text
        assert keeper.store.tags() == [0, 1, 2] and keeper.store.has(sha256(models[3]))  # the head stays
    finally:
        keeper.close()
