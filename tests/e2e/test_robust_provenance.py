"""A small real MultiKrum run under a boosted sign-flip attack, audited the way an operator would.

The trust claims of `hw/scenarios/attacks.toml`'s `robust` run, on a fleet small enough for a test:
8 devices (watch subjects 1-8), 2 of them (a seeded choice) send -4 x their honest delta, and the
gateway runs Flower's MultiKrum with num_malicious_nodes = 2, num_nodes_to_select = 6. Every part is
real (broker, gateway and agent processes, TFLite training, the ledger), and the checks go through
the operator's own commands (`python -m ledger.cli provenance / contributions / lineage`):

- the attackers really attacked: their signed replies were accepted every round and are on the
  ledger's `updates` vertices (the attack was delivered, not refused at the door);
- `provenance --model <final model>` walks every aggregate back to the lineage's first model, and in
  none of them is an attacker's update an input: each round's inputs are exactly the honest devices'
  accepted updates (what MultiKrum selected, as the gateway's journal also says), with their capped
  example weights, and every attacker update is listed under `left_out` with a score of 0;
- the inputs really are what shaped each model: the round's scores (each update's projection on the
  model's move) sum to 1;
- `contributions` ranks every attacker strictly below every honest device.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
from emulation import ROOT, emulate, env

ROUNDS = 3
DEVICES = 8
ATTACKERS = 2

SCENARIO = f"""
[run]
name = "tiny-robust"
rounds = {ROUNDS}
seed = 0
timeout_s = 100
[fleet]
devices = {DEVICES}
subjects = [1, 2, 3, 4, 5, 6, 7, 8]
[dataset]
source = "watch"
partition = "subject"
stride = 64
[strategy]
name = "MultiKrum"
params = {{ num_malicious_nodes = {ATTACKERS}, num_nodes_to_select = {DEVICES - ATTACKERS} }}
[training]
epochs = 1
batch_size = 32
lr = 0.2
deadline_s = 20
[aggregation]
weights = "capped"
median_multiple = 2.0
[[adversary]]
attack = "sign_flip"
count = {ATTACKERS}
scale = 4.0
"""


def _ledger_cli(*args: str, ok: tuple[int, ...] = (0,)) -> dict:
    done = subprocess.run([sys.executable, "-m", "ledger.cli", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in ok, (args, done.returncode, done.stderr[-2000:])
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("robust")
    started = time.monotonic()
    done, report = emulate(tmp_path, SCENARIO)
    assert done.returncode == 0, done.stderr[-4000:]
    assert time.monotonic() - started < 120
    attackers = {d["id"]: name for name, d in report["devices"].items() if d.get("attack")}
    honest = {d["id"]: name for name, d in report["devices"].items() if not d.get("attack")}
    assert len(attackers) == ATTACKERS and len(honest) == DEVICES - ATTACKERS, report["devices"]
    db = report["ledger"]["path"]
    assert report["ledger"]["verified"] is True  # every digest, signature (devices' too) and parent link
    model = report["model"]["digest"]
    return {"tmp": tmp_path, "report": report, "attackers": attackers, "honest": honest, "db": db,
            "model": model, "provenance": _ledger_cli("provenance", "--db", db, "--model", model),
            "contributions": _ledger_cli("contributions", "--db", db),
            "lineage": _ledger_cli("lineage", "--db", db, "--model", model)}


def _round_records(db: str) -> dict[int, list[tuple[str, str, int]]]:
    """round -> [(device id, update digest hex, examples)] from the ledger's own `updates` vertices."""
    from ledger.kinds import UPDATES
    from ledger.store import Ledger
    from protocol.keys import identity_id

    ledger = Ledger(db, read_only=True)
    try:
        found: dict[int, list[tuple[str, str, int]]] = {}
        for vertex in ledger.vertices_of(UPDATES):
            for device, digest, examples, _signature in vertex.body["records"]:
                found.setdefault(vertex.body["round"], []).append(
                    (identity_id(device), digest.hex(), examples))
        return found
    finally:
        ledger.close()


def test_the_attackers_attacked_and_their_replies_were_accepted_every_round(run):
    report, attackers = run["report"], run["attackers"]
    assert [r["round"] for r in report["rounds"]] == list(range(ROUNDS + 1))
    trained = report["rounds"][1:]
    assert all(r["participants"] == DEVICES and r["rejected"] == 0 for r in trained), report["rounds"]
    [attack] = report["attacks"]
    assert attack["attack"] == "sign_flip" and attack["scale"] == 4.0
    assert sorted(attack["devices"]) == sorted(attackers.values())
    assert attack["expected"] == ["accepted"] and attack["as_expected"] is True, attack
    for name in attack["devices"]:
        entry = attack["per_device"][name]
        assert entry["accepted"] >= ROUNDS and not entry["rejected"], (name, entry)  # its replies, all taken
        log = (run["tmp"] / "run" / "logs" / f"{name}.log").read_text()
        assert "attack.start" in log
    records = _round_records(run["db"])
    assert sorted(records) == list(range(1, ROUNDS + 1))
    for round_, found in records.items():
        # every device's update, the attackers' included, is an accepted, signed record of the round
        assert sorted(device for device, _, _ in found) == sorted([*attackers, *run["honest"]]), round_
    assert report["rounds"][-1]["accuracy"] > 0.5  # the model learned despite 2 x (-4) deltas a round


def test_provenance_names_only_the_selected_honest_updates_as_inputs_back_to_the_first_model(run):
    prov, attackers, honest = run["provenance"], run["attackers"], run["honest"]
    records = _round_records(run["db"])
    assert prov["model"] == run["model"]
    chain = prov["aggregates"]
    assert sorted(a["round"] for a in chain) == list(range(1, ROUNDS + 1))  # every one, not just the last
    assert chain[0]["output"] == run["model"]
    for newer, older in pairwise(chain):
        assert newer["base"] == older["output"]
    lineage = run["lineage"]
    assert lineage["complete"] is True and lineage["gap"] is None
    first = lineage["releases"][-1]["model"]  # the lineage's start
    assert first == prov["initial_model"] == chain[-1]["base"]
    with sqlite3.connect(Path(run["db"]).with_name("rounds.db")) as db:
        journal = {r: {d for d, _ in json.loads(inputs)["inputs"]}
                   for r, inputs in db.execute("select round, inputs from release where round >= 1")}

    for aggregate in chain:
        round_ = aggregate["round"]
        assert aggregate["strategy"] == "MultiKrum" and aggregate["rule"] == "selected"
        by_device = {device: (digest, examples) for device, digest, examples in records[round_]}
        input_digests = {i["update"] for i in aggregate["inputs"]}
        input_devices = {r["device"] for i in aggregate["inputs"] for r in i["records"]}
        # the inputs are exactly the honest devices' updates of this round: none of an attacker's
        assert input_devices == set(honest), (round_, sorted(input_devices))
        assert input_digests == {by_device[d][0] for d in honest}, round_
        assert not input_digests & {by_device[d][0] for d in attackers}, round_
        assert all(len(i["records"]) == 1 and i["records"][0]["round"] == round_ for i in aggregate["inputs"])
        assert input_digests == journal[round_]  # what the gateway's journal says MultiKrum selected
        # the attackers' updates are the round's left-out ones, and nothing else is
        assert sorted((x["device"], x["update"]) for x in aggregate["left_out"]) == sorted(
            (d, by_device[d][0]) for d in attackers), round_
        # the inputs' weights: their capped example counts over the selected ones (cap: 2 x the median claim)
        claims = sorted(examples for _, examples in by_device.values())
        median = (claims[len(claims) // 2] if len(claims) % 2
                  else (claims[len(claims) // 2 - 1] + claims[len(claims) // 2]) / 2)
        cap = min(100_000, math.floor(2.0 * median))
        capped = {by_device[d][0]: min(by_device[d][1], cap) for d in honest}
        total = sum(capped.values())
        for entry in aggregate["inputs"]:
            assert entry["weight"] == pytest.approx(capped[entry["update"]] / total, rel=1e-9), round_
        # the scores: one per accepted update; a left-out update scores exactly 0; the inputs' scores
        # (projections of their deltas on the model's move) sum to 1: they are what moved the model
        scores = {s["device"]: s for s in aggregate["scores"]}
        assert set(scores) == set(attackers) | set(honest), round_
        assert all(scores[d]["score"] == 0.0 and scores[d]["update"] == by_device[d][0] for d in attackers)
        assert sum(scores[d]["score"] for d in honest) == pytest.approx(1.0, abs=1e-4), round_

    assert set(prov["devices"]) == set(honest)
    assert set(prov["left_out_devices"]) == set(attackers)
    assert prov["updates"] == ROUNDS * len(honest) and prov["left_out"] == ROUNDS * len(attackers)


def test_contributions_rank_every_attacker_below_every_honest_device(run):
    attackers, honest = run["attackers"], run["honest"]
    rows = run["contributions"]["devices"]
    assert run["contributions"]["rounds"] == ROUNDS
    assert {r["device"] for r in rows} == set(attackers) | set(honest)
    assert all(r["rounds"] == ROUNDS for r in rows), rows
    ranked = [r["device"] for r in rows]
    assert set(ranked[:len(honest)]) == set(honest) and set(ranked[len(honest):]) == set(attackers), ranked
    totals = {r["device"]: r["total"] for r in rows}
    assert max(totals[d] for d in attackers) < min(totals[d] for d in honest), totals  # strictly, not a tie
    assert all(totals[d] == 0.0 for d in attackers)  # left out every round
    assert sum(totals[d] for d in honest) == pytest.approx(ROUNDS, abs=1e-3)  # 1 a round, over the inputs
