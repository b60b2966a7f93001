"""Small real emulator runs: two gateways sharing a ledger, and a fleet with a forging attacker.

Every part is real (broker, gateway and agent processes, TFLite training, ledger gossip); the
runs are kept tiny (two rounds, one epoch) so each test stays well under a minute.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from emulation import emulate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("city")
    return tmp_path, *emulate(tmp_path, """
[run]
name = "tiny-city"
rounds = 2
timeout_s = 140
[fleet]
gateways = 2
devices_per_gateway = 2
subjects = [1, 2, 3, 4]
[training]
epochs = 1
lr = 0.2
deadline_s = 30
""")


def test_a_two_gateway_run_completes(city):
    _, done, report = city
    assert done.returncode == 0, done.stderr[-4000:]
    assert "gw-1 round 2/2" in done.stderr and "gw-2 round 2/2" in done.stderr
    assert set(report["gateways"]) == {"gw-1", "gw-2"}
    assert report["gateways"]["gw-1"]["devices"] == ["subject-01", "subject-03"]
    assert report["gateways"]["gw-2"]["devices"] == ["subject-02", "subject-04"]
    for name, section in report["gateways"].items():
        assert section["state"] == "done", (name, section)
        rounds = section["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert all(r["participants"] == 2 for r in rounds[1:])
        ts = [r["t"] for r in rounds]
        assert ts == sorted(ts) and 0 < ts[0] < report["seconds"]
        ledger = section["ledger"]
        assert ledger["verified"] is True
        assert ledger["height_series"] and len(ledger["height_series"]) == len(ledger["finality_lag_series"])
        heights = [h for _, h in ledger["height_series"]]
        # genesis, 4 enrollments, 2 lineage starts (one per gateway), 4 updates, 4 aggregates, 4 contributions
        assert heights[-1] == max(heights) == 1 + 4 + 2 + 4 + 4 + 4
        assert all(0 <= lag <= h for (_, lag), (_, h) in zip(ledger["finality_lag_series"], ledger["height_series"]))
    assert report["rounds"] == report["gateways"]["gw-1"]["rounds"]  # the first gateway, as for one gateway


def test_the_gateways_end_with_identical_ledgers_holding_every_accepted_update(city):
    tmp_path, _, report = city
    check = report["ledger_check"]
    assert check["identical"] is True, check
    assert check["every_accepted_update_in_every_ledger"] is True, check
    assert check["accepted_updates"] == {"gw-1": 4, "gw-2": 4} and check["recorded_updates"] == {"gw-1": 4, "gw-2": 4}
    assert len(set(check["state_digests"].values())) == 1
    kinds, ids = [], []
    for section in report["gateways"].values():
        with sqlite3.connect(section["ledger"]["path"]) as db:
            ids.append(sorted(i for (i,) in db.execute("select id from vertices")))
            kinds.append(dict(db.execute("select kind, count(*) from vertices group by kind").fetchall()))
    assert ids[0] == ids[1]
    # One genesis naming both gateways; each gateway's 2 enrollments, its lineage's start, 2 updates,
    # 2 aggregates and their 2 contributions vertices.
    assert kinds[0] == {"genesis": 1, "device.enroll": 4, "lineage": 2, "updates": 4, "aggregate": 4,
                        "contributions": 4}
    html = (tmp_path / "report.html").read_text()
    assert "gw-1" in html and "gw-2" in html


def test_a_forging_attacker_is_rejected_bad_signature_and_named_in_the_attacks_section(tmp_path):
    done, report = emulate(tmp_path, """
[run]
name = "tiny-attack"
rounds = 1
seed = 3
timeout_s = 120
[fleet]
devices = 3
subjects = [1, 2, 3]
[training]
epochs = 1
lr = 0.2
deadline_s = 8
[[adversary]]
attack = "forged_signature"
count = 1
""")
    assert done.returncode == 0, done.stderr[-4000:]
    [attack] = report["attacks"]
    [attacker] = attack["devices"]
    assert report["devices"][attacker]["attack"] == "forged_signature"
    assert attack["expected"] == ["bad_signature"] and attack["as_expected"] is True, attack
    assert attack["accepted"] == 0 and attack["rejected"].get("bad_signature", 0) >= 1, attack
    assert set(attack["rejected"]) == {"bad_signature"}
    assert report["rounds"][1]["participants"] == 2  # the two honest devices
    log = (tmp_path / "run" / "logs" / f"{attacker}.log").read_text()
    assert "attack.start" in log
    assert "forged_signature" in done.stderr  # the summary names the attack and its outcome


def test_under_voucher_enrollment_a_sybil_is_never_enrolled_and_the_honest_devices_train(tmp_path):
    done, report = emulate(tmp_path, """
[run]
name = "tiny-sybil"
rounds = 2
seed = 3
timeout_s = 120
[fleet]
devices = 3
subjects = [1, 2, 3]
enrollment = "voucher"
[training]
epochs = 1
lr = 0.2
deadline_s = 8
[[adversary]]
attack = "sybil"
count = 1
""")
    assert done.returncode == 0, done.stderr[-4000:]
    [attack] = report["attacks"]
    assert attack["expected"] == ["no_voucher", "unknown_device"] and attack["as_expected"] is True, attack
    assert attack["accepted"] == 0 and attack["rejected"].get("no_voucher", 0) >= 1, attack
    assert report["rounds"][1]["participants"] == 2  # the gateway did not wait for the sybil
    with sqlite3.connect(report["ledger"]["path"]) as db:
        names = sorted(n for (n,) in db.execute("select name from devices"))
    honest = sorted(n for n, d in report["devices"].items() if "attack" not in d)
    assert names == honest  # enrolled by voucher; the sybil never


def test_variants_run_one_after_another_into_one_report_with_a_comparison(tmp_path):
    done, report = emulate(tmp_path, """
[run]
name = "tiny-variants"
rounds = 1
timeout_s = 60
[fleet]
devices = 2
subjects = [1, 2]
[training]
epochs = 1
lr = 0.2
deadline_s = 20
[[adversary]]
attack = "free_rider"
count = 1
[[variant]]
name = "clean"
adversary = []
[[variant]]
name = "riders"
[variant.strategy]
name = "FedMedian"
""")
    assert done.returncode == 0, done.stderr[-4000:]
    assert [(c["name"], c["strategy"], c["attack"]) for c in report["comparison"]] == [
        ("clean", "FedAvg", None), ("riders", "FedMedian", "free_rider 1 device")]
    for entry, sub in zip(report["comparison"], report["variants"]):
        assert sub["scenario"] == entry["name"] and sub["gateway"]["state"] == "done"
        assert entry["final_accuracy"] == sub["rounds"][-1]["accuracy"] and entry["last_round_evaluated"]
        assert len(entry["accuracy"]) == 2
        folder = tmp_path / "run" / entry["name"]
        assert (folder / "report.json").exists() and (folder / "report.html").exists()
    [attack] = report["attacks"]
    assert attack["variant"] == "riders" and attack["accepted"] >= 1 and attack["expected"] == ["accepted"]
    assert "attacks" not in report["variants"][0]
    assert "riders: FedMedian, attack free_rider 1 device: final accuracy" in done.stderr
    html = (tmp_path / "report.html").read_text()
    assert "FedMedian" in html and "comparison" in html


def test_devices_in_pools_with_the_synthetic_profile_take_part_in_every_round(tmp_path):
    from hw.emulate import run
    from hw.scenario import parse_scenario

    scenario = parse_scenario({
        "run": {"name": "pools", "rounds": 2, "timeout_s": 180},
        "fleet": {"gateways": 2, "devices_per_gateway": 5, "runner": "pool", "pool_size": 4},
        "dataset": {"partition": "dirichlet", "alpha": 1.0},
        "training": {"model": "synthetic", "epochs": 1, "deadline_s": 30},
        "broker": {"kind": "mosquitto"},
    })
    report = run(scenario, tmp_path / "report.json", tmp_path / "run")
    assert len(list((tmp_path / "run" / "pools").glob("pool-*.json"))) == 3  # 10 devices, 4 per pool
    for name, section in report["gateways"].items():
        assert [r["participants"] for r in section["rounds"] if r["round"] > 0] == [5, 5], name
    assert report["ledger_check"]["identical"] and report["ledger_check"]["every_accepted_update_in_every_ledger"]


def test_an_inflated_claim_is_accepted_signed_and_weighs_only_what_the_capped_rule_allows(tmp_path):
    """hw.adversary's inflate_examples as the emulator runs it (its own process, the real CNN): its signed
    10,000,000-example claim is accepted, and the strategy weighed it 2 x the median claim."""
    from protocol import envelope
    from protocol.keys import identity_id

    done, report = emulate(tmp_path, """
[run]
name = "tiny-inflated"
rounds = 1
seed = 3
timeout_s = 120
[fleet]
devices = 3
subjects = [1, 2, 3]
[training]
epochs = 1
lr = 0.2
deadline_s = 20
[aggregation]
weights = "capped"
median_multiple = 2.0
[[adversary]]
attack = "inflate_examples"
count = 1
scale = 0.1
""")
    assert done.returncode == 0, done.stderr[-4000:]
    [attack] = report["attacks"]
    [attacker] = attack["devices"]
    assert attack["expected"] == ["accepted"] and attack["as_expected"] is True, attack
    assert attack["accepted"] >= 1 and not attack["rejected"], attack
    assert report["rounds"][1]["participants"] == 3 and report["rounds"][1]["accuracy"] is not None
    home = tmp_path / "run" / "gateway"
    assert 'weights = "capped"' in (home / "gateway.toml").read_text()
    with sqlite3.connect(home / "rounds.db") as db:
        replies = [envelope.decode(wire) for (wire,) in db.execute(
            "select a.reply from accepted a join exchange e on a.task = e.task where e.task like 'train-%'")]
        [(inputs,)] = db.execute("select inputs from release where round = 1 and step = 1").fetchall()
    claims = {}
    for env in replies:
        env.verify()  # every claim is its device's own, signed
        claims[identity_id(env.ctx.sender)] = (env.body["examples"], env.body["digest"].hex())
    attacker_id = report["devices"][attacker]["id"]
    assert claims[attacker_id][0] == 10_000_000 and len(claims) == 3
    honest = sorted(n for device, (n, _) in claims.items() if device != attacker_id)
    assert honest[-1] < 10_000  # the subjects' true window counts
    cap = 2 * honest[-1]  # 2 x the median of the three claims (the larger honest one)
    weights = dict(json.loads(inputs)["inputs"])
    assert weights[claims[attacker_id][1]] == pytest.approx(cap / (sum(honest) + cap))  # not ~1 ("reported")
    assert "attack.start" in (tmp_path / "run" / "logs" / f"{attacker}.log").read_text()
