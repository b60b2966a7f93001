"""The city tier with real gateways and agents over a real Mosquitto: one model for the city, checked by all.

Three gateways of one city (a genesis naming them, ledger gossip, blob exchange)
each run four rounds with two synthetic agents of their own, a city epoch
every round (slow momentum from the third on; every two rounds in the second
test). Every gateway ends every epoch on the same city model, which
each ledger records in a `city` vertex that recomputes bit for bit from the
offered models; every gateway's auditor recomputed its peers' round aggregates
and found them true. Then the same city with one gateway whose strategy
tampers with its round aggregates (the model it releases and records is not
what its inputs give): both honest gateways write the evidence, flag it, and
merge without it; they still agree on one city model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.service import Agent
from gateway.blobs import BlobStore
from gateway.city import CitySettings
from gateway.city_merge import momentum_problem, verify_city
from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker
from hw.city import write_genesis
from hw.synthetic import SyntheticModel, synthetic_data, write_manifest
from ledger.cli import main as ledger_cli
from ledger.kinds import CITY, MISMATCH
from ledger.store import Ledger
from ledger.verify import verify_store
from protocol.keys import Identity

SHAPES = {"dense_w": (8, 4), "dense_b": (4,)}
DEVICES_PER_GATEWAY = 2
ROUNDS = 4
EPOCHS = [1, 2, 3, 4]  # the first test's: an epoch every round


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


class TamperedConfig(GatewayConfig):
    """A gateway whose strategy's round aggregates are not what their inputs give (what it records and
    releases is its inputs' FedAvg plus a shift): what the auditors must catch."""

    def make_strategy(self, selection_recorder=None, population=None):
        strategy = super().make_strategy(selection_recorder, population)
        honest = strategy.aggregate_train

        def tampered(server_round, replies):
            arrays, metrics = honest(server_round, replies)
            if arrays is not None:
                from flwr.app import Array, ArrayRecord

                arrays = ArrayRecord({k: Array(v.numpy() + np.float32(0.01)) for k, v in arrays.items()})
            return arrays, metrics

        strategy.aggregate_train = tampered
        return strategy


def run_city(broker: Broker, workdir: Path, tampered: int | None = None,
             city: CitySettings = CitySettings(every=2, deadline_s=20)) -> tuple[list[dict[str, Any]], list[Path]]:
    (workdir / "city").mkdir(parents=True)
    keys = [Identity.generate() for _ in range(3)]
    for g, key in enumerate(keys):
        key.save(workdir / "city" / f"g{g}.key")
    genesis = write_genesis(workdir / "city", "test-city", [k.public_key for k in keys])  # + operator.key
    manifest = write_manifest(workdir / "model", SHAPES)
    results: list[dict[str, Any]] = [{} for _ in keys]
    threads, agents, agent_stop = [], [], threading.Event()
    for g, key in enumerate(keys):
        config_class = TamperedConfig if g == tampered else GatewayConfig
        config = config_class(
            name=f"gw{g}", key=workdir / "city" / f"g{g}.key", state_dir=workdir / f"gw{g}", broker_host=broker.host,
            broker_port=broker.port, manifest=manifest, genesis=genesis, strategy="FedAvg", deadline_s=20,
            epochs=1, batch_size=32, lr=0.5, min_devices=DEVICES_PER_GATEWAY, wait_devices_s=30, policy="open",
            num_rounds=ROUNDS, city=city)
        gateway = Gateway(config, key)
        threads.append(threading.Thread(target=lambda g=g, gw=gateway: results[g].update(gw.run(threading.Event())),
                                        daemon=True))
        for d in range(DEVICES_PER_GATEWAY):
            i = g * DEVICES_PER_GATEWAY + d
            cfg = AgentConfig(name=f"syn-{i}", key=workdir / f"d{i}.key", state_dir=workdir / f"d{i}",
                              gateway_id=key.id, gateway_public_key=key.public_key, broker_host=broker.host,
                              broker_port=broker.port, replay=workdir / "none.npz", enroll_retry_s=0.5)
            agent = Agent(cfg, Identity.generate(), SyntheticModel(SHAPES, seed=i + 1), synthetic_data(64))
            agents.append(threading.Thread(target=agent.run, args=(agent_stop,), daemon=True))
    for thread in threads + agents:
        thread.start()
    try:
        for thread in threads:
            thread.join(120)
    finally:
        agent_stop.set()
        for thread in agents:
            thread.join(20)
    return results, [workdir / f"gw{g}" for g in range(len(keys))]


def epochs_of(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {e["epoch"]: e for e in result["city"]["epochs"]}


def fetch_from(folders: list[Path]):
    stores = [BlobStore(f / "blobs", read_only=True) for f in folders]
    return lambda digest: next((data for s in stores if (data := s.get(digest)) is not None), None)


def audit(capsys, db: Path, folders: list[Path]) -> tuple[int, dict[str, Any]]:
    """`starling-ledger audit --recompute --db DB --blobs F ...`: its exit code and its JSON."""
    import json

    capsys.readouterr()
    code = ledger_cli(["audit", "--recompute", "--db", str(db), *(a for f in folders for a in ("--blobs", str(f)))])
    return code, json.loads(capsys.readouterr().out)


def test_three_gateways_end_every_epoch_on_one_city_model_that_every_ledger_recomputes(broker, tmp_path, capsys):
    # An epoch every round, with slow momentum: epochs 1 and 2 are plain merges, 3 and 4 add momentum.
    results, folders = run_city(broker, tmp_path, city=CitySettings(every=1, deadline_s=20, momentum=0.5))
    assert [r.get("state") for r in results] == ["done"] * 3, [r.get("failure") for r in results]
    per_gateway = [epochs_of(r) for r in results]
    assert all(set(e) == set(EPOCHS) for e in per_gateway), per_gateway
    for epoch in EPOCHS:
        digests = {e[epoch]["model"] for e in per_gateway}
        assert len(digests) == 1, (epoch, digests)
        assert all(len(e[epoch]["inputs"]) == 3 and e[epoch]["left_out"] == [] for e in per_gateway)
    # The rounds went on from the city model: the last epoch's model is every gateway's head.
    assert {r["model"]["digest"] for r in results} == {per_gateway[0][ROUNDS]["model"]}
    assert [per_gateway[0][e]["momentum"] for e in EPOCHS] == [None, None, 0.5, 0.5]

    fetch = fetch_from(folders)
    for folder, result in zip(folders, results):
        with Ledger.open(folder / "ledger.db", read_only=True) as ledger:
            merges = list(ledger.vertices_of(CITY))
            assert not list(ledger.vertices_of(MISMATCH))
        assert verify_store(folder / "ledger.db").ok
        own = [v for v in merges if v.creator == Identity.load(folder.parent / "city" /
                                                                f"g{folders.index(folder)}.key").public_key]
        assert sorted(v.body["epoch"] for v in own) == EPOCHS
        for vertex in own:
            verdict = verify_city(vertex.body, fetch)
            assert verdict.status == "match", verdict
            momentum = vertex.body["params"].get("momentum")
            assert momentum == (0.5 if vertex.body["epoch"] >= 3 else None)
            if momentum is not None:  # the gateway's own city models of the two epochs before
                with Ledger.open(folder / "ledger.db", read_only=True) as ledger:
                    assert momentum_problem(vertex.body, ledger.city_outputs) is None
                    mine = {e: ledger.city_outputs(e) for e in EPOCHS}
                gateway_id = results[folders.index(folder)]["gateway"]["id"]
                assert vertex.body["params"]["previous"] == mine[vertex.body["epoch"] - 1][gateway_id].hex()
                assert vertex.body["params"]["before"] == mine[vertex.body["epoch"] - 2][gateway_id].hex()
            assert all(w > 0 for _, _, w in vertex.body["inputs"])
        audits = result["city"]["audits"]
        assert audits["mismatch"] == 0 and audits["match"] >= 2 and audits["recompute_s"] is not None, audits
        # Each epoch it fetched the two peers' models (at most: one may have been at hand already), no more.
        model_bytes = len(fetch(bytes.fromhex(per_gateway[0][1]["model"])))
        assert 0 < result["city"]["fetched_bytes"] <= len(EPOCHS) * 2 * model_bytes, result["city"]
        assert result["city"]["pushed_bytes"] == len(EPOCHS) * model_bytes  # its offer's model, once per epoch
        assert result["city"]["flagged"] == {}

    # The operator's audit of one ledger with every gateway's blobs: each city epoch's merge and every round
    # aggregate of every gateway recompute bit for bit.
    code, report = audit(capsys, folders[0] / "ledger.db", [f / "blobs" for f in folders])
    assert code == 0 and report["mismatches"] == [] and report["epochs"] == EPOCHS, report
    assert report["missing_inputs"] == 0 and report["checked"] == report["aggregates"] + report["cities"]
    assert len(report["gateways"]) == 3 and all(g["checked"] >= ROUNDS for g in report["gateways"].values())


def test_a_gateway_that_tampers_with_its_aggregates_is_flagged_and_left_out_by_the_honest_ones(broker, tmp_path,
                                                                                                capsys):
    results, folders = run_city(broker, tmp_path, tampered=2)
    assert [r.get("state") for r in results] == ["done"] * 3, [r.get("failure") for r in results]
    cheat = results[2]["gateway"]["id"]
    honest = results[:2]
    for result in honest:
        assert cheat in result["city"]["flagged"], result["city"]
        assert result["city"]["audits"]["mismatch"] >= 1
        last = epochs_of(result)[2]
        assert {"gateway": cheat, "reason": "flagged"} in last["left_out"], last
        assert cheat not in {i["gateway"] for i in last["inputs"]}
    # The honest gateways agree on the city model without the cheat.
    assert len({epochs_of(r)[2]["model"] for r in honest}) == 1
    with Ledger.open(folders[0] / "ledger.db", read_only=True) as ledger:
        flagged = ledger.flagged()
    assert set(flagged) == {cheat}
    assert {e.accuser for e in flagged[cheat]} >= {honest[0]["gateway"]["id"]}
    code, report = audit(capsys, folders[0] / "ledger.db", [f / "blobs" for f in folders])
    assert code == 1 and {m["gateway"] for m in report["mismatches"]} == {cheat}, report
    assert report["gateways"][cheat]["mismatches"] == ROUNDS  # every round aggregate it recorded

    # `show` names it; the operator's clear-mismatch (root key) answers the evidence.
    db = str(folders[0] / "ledger.db")
    assert ledger_cli(["show", "--db", db]) == 0
    assert f"MISMATCH {cheat}:" in capsys.readouterr().out
    root = str(tmp_path / "city" / "operator.key")
    assert ledger_cli(["clear-mismatch", "--root-key", root, "--db", db, "--gateway", cheat,
                       "--reason", "re-imaged"]) == 0
    assert '"command": "clear-mismatch"' in capsys.readouterr().out
    with Ledger.open(db, read_only=True) as ledger:
        assert ledger.flagged() == {} and {e.cleared for e in ledger.evidence()} == {True}
    assert ledger_cli(["clear-mismatch", "--root-key", root, "--db", db, "--gateway", cheat,
                       "--reason", "again"]) == 2  # nothing left to clear
