"""The report's `city` section (hw/city_report.py), made from fabricated gateway results over real things: the real
watch devices' replay files, real IMU CNN weights kept in real blob stores, evaluated by the devices' own code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from firmware_models.runtime import TrainableModel
from gateway.blobs import BlobStore
from hw.city_report import (
    Evaluator,
    Member,
    all_devices_accuracy,
    city_section,
    comparison_view,
    gateway_attack,
    read_results,
)
from hw.datasets import load_device_npz
from hw.partition import prepare_devices
from hw.report import write_html_report
from hw.run_report import final_accuracy
from hw.run_summary import ok, summary
from hw.scenario import parse_scenario
from protocol.schemas import encode_model

SKEW = [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]]
FLEET = {"fleet": {"gateways": 2, "devices": 4, "subjects": [1, 2, 3, 4]}, "run": {"rounds": 4},
         "dataset": {"classes_by_neighbourhood": SKEW}}
IDS = {"gw-1": "a1" * 8, "gw-2": "b2" * 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two gateways' folders, the 4 devices' replay files, an evaluator over them and two real models: the IMU
    CNN's initial weights and the same trained a few steps on one device (so they score differently)."""
    tmp = tmp_path_factory.mktemp("city")
    scenario = parse_scenario({**FLEET, "city": {"every": 2}})
    devices = prepare_devices(scenario, tmp)
    gateway_of = {name: f"gw-{i % 2 + 1}" for i, (name, _) in enumerate(devices)}
    evaluator = Evaluator("imu_cnn", [(name, gateway_of[name], path) for name, path in devices])
    model = TrainableModel.from_package()
    initial = model.get_weights()
    first = load_device_npz(devices[0][1])
    model.train_epochs(first.x_train, first.y_train, epochs=3, batch_size=model.batch_size, lr=0.2, rng=0)
    trained = model.get_weights()
    members = []
    for name in ("gw-1", "gw-2"):
        (tmp / name).mkdir()
        members.append(Member(name, IDS[name], tmp / name))
    return {"scenario": scenario, "devices": devices, "gateway_of": gateway_of, "evaluator": evaluator,
            "initial": initial, "trained": trained, "members": members, "tmp": tmp}


def keep(member: Member, weights: dict, tag: int) -> str:
    """`weights` as the gateway keeps a city model: encoded, in its blob store; the digest in hex."""
    return BlobStore(member.home / "blobs").put(encode_model(weights), tag=tag).hex()


def on_all_devices(world, weights, gateway: str | None = None) -> float:
    """The accuracy of `weights` over the union of the (gateway's) devices' test windows, computed directly."""
    data = [load_device_npz(path) for name, path in world["devices"]
            if gateway is None or world["gateway_of"][name] == gateway]
    model = TrainableModel.from_package()
    model.set_weights(weights)
    return model.evaluate(np.concatenate([d.x_test for d in data]), np.concatenate([d.y_test for d in data]))[1]


def epoch(number: int, round_: int, model: str, inputs: list, left_out: list = ()) -> dict:
    return {"epoch": number, "round": round_, "model": model, "seconds": 0.5,
            "inputs": [{"gateway": IDS[g], "model": "cd" * 32, "weight": w} for g, w in inputs],
            "left_out": [{"gateway": IDS[g], "reason": r} for g, r in left_out]}


def test_the_evaluator_scores_weights_on_the_union_of_every_devices_test_windows(world):
    evaluator = world["evaluator"]
    assert len(evaluator.devices) == 4
    assert evaluator.windows == sum(len(load_device_npz(p).y_test) for _, p in world["devices"])
    for weights in (world["initial"], world["trained"]):
        result = evaluator.evaluate(weights)
        assert result["windows"] == evaluator.windows
        assert result["accuracy"] == pytest.approx(on_all_devices(world, weights), abs=1e-4)
        for gw in ("gw-1", "gw-2"):
            assert result["by_gateway"][gw] == pytest.approx(on_all_devices(world, weights, gw), abs=1e-4)
    assert evaluator.evaluate(world["trained"])["accuracy"] != evaluator.evaluate(world["initial"])["accuracy"]


def test_every_epochs_city_model_is_read_from_the_blob_stores_and_evaluated_on_all_devices(world):
    gw1, gw2 = world["members"]
    initial = keep(gw1, world["initial"], 1)
    assert keep(gw2, world["initial"], 1) == initial
    trained = keep(gw1, world["trained"], 2)  # gw-2's store lacks it: read from gw-1's
    results = {name: {"city": {
        "every": 2, "rule": "weighted",
        "epochs": [epoch(1, 2, initial, [("gw-1", 0.6), ("gw-2", 0.4)]),
                   epoch(2, 4, trained, [("gw-1", 1.0)], [("gw-2", "flagged")])],
        "flagged": {IDS["gw-2"]: {"vertex": "ee" * 32, "kind": "aggregate", "reason": "recomputed digest differs",
                                  "accusers": [IDS["gw-1"]]}},  # the ledger's evidence: both see it
        "alone": 0,
        "audits": {"checked": 2, "match": 1 if name == "gw-1" else 2, "mismatch": 1 if name == "gw-1" else 0,
                   "unverifiable": 0, "missing_inputs": 0}}} for name in ("gw-1", "gw-2")}
    lines = []
    city = city_section(world["scenario"], world["members"], results, world["evaluator"], lines.append)
    assert city["tier"] is True and (city["every"], city["rule"]) == (2, "weighted")
    assert (city["devices"], city["windows"]) == (4, world["evaluator"].windows)
    first, second = city["epochs"]
    assert (first["epoch"], first["round"], first["agreed"]) == (1, 2, True)
    assert first["digests"] == {"gw-1": initial, "gw-2": initial}
    assert first["inputs"] == [{"gateway": "gw-1", "model": "cd" * 32, "weight": 0.6},
                               {"gateway": "gw-2", "model": "cd" * 32, "weight": 0.4}]  # ids -> names
    assert first["accuracy"] == pytest.approx(on_all_devices(world, world["initial"]), abs=1e-4)
    assert second["left_out"] == [{"gateway": "gw-2", "reason": "flagged"}]
    assert second["accuracy"] == pytest.approx(on_all_devices(world, world["trained"]), abs=1e-4)
    assert second["by_gateway"]["gw-2"] == pytest.approx(on_all_devices(world, world["trained"], "gw-2"), abs=1e-4)
    assert "models" not in second  # one digest: nothing to tell apart
    assert city["final_digests"] == {"gw-1": trained, "gw-2": trained}
    assert city["final_accuracy"] == second["accuracy"]
    assert city["flagged"] == {"gw-2": {"accusers": ["gw-1"], "seen_by": ["gw-1", "gw-2"], "kind": "aggregate",
                                        "reason": "recomputed digest differs", "vertex": "ee" * 32}}
    assert city["alone"] == {"gw-1": 0, "gw-2": 0}
    assert city["audits"]["checked"] == 4 and city["audits"]["mismatch"] == 1 and city["audits"]["match"] == 3
    assert city["audits"]["by_gateway"]["gw-1"]["mismatch"] == 1
    assert "missing_models" not in city
    assert any(line.startswith("starling-emulate: city epoch 2 (round 4): one model at every gateway, 1 inputs, "
                               "left out gw-2, accuracy on all devices") for line in lines)

    report = {"city": city, "gateways": {"gw-1": {}, "gw-2": {}}, "rounds": [{"round": 4, "accuracy": 0.99}]}
    assert final_accuracy(report) == city["final_accuracy"]  # the headline: the city model's, not a gateway's
    assert all_devices_accuracy(report) == city["final_accuracy"]
    assert comparison_view(city) == {"tier": True, "final_accuracy": city["final_accuracy"],
                                     "distinct_final_digests": 1, "flagged": ["gw-2"], "epochs": 2}


def test_gateways_that_disagree_are_shown_model_by_model(world):
    gw1, gw2 = world["members"]
    initial, trained = keep(gw1, world["initial"], 1), keep(gw2, world["trained"], 1)
    results = {"gw-1": {"city": {"epochs": [epoch(1, 2, initial, [("gw-1", 1.0)], [("gw-2", "no_offer")])]}},
               "gw-2": {"city": {"epochs": [epoch(1, 2, trained, [("gw-2", 1.0)], [("gw-1", "no_offer")])]}}}
    city = city_section(world["scenario"], world["members"], results, world["evaluator"])
    (only,) = city["epochs"]
    assert only["agreed"] is False and only["digests"] == {"gw-1": initial, "gw-2": trained}
    assert only["models"][initial]["gateways"] == ["gw-1"] and only["models"][trained]["gateways"] == ["gw-2"]
    acc_initial, acc_trained = (on_all_devices(world, world[k]) for k in ("initial", "trained"))
    assert only["models"][initial]["accuracy"] == pytest.approx(acc_initial, abs=1e-4)
    assert only["models"][trained]["accuracy"] == pytest.approx(acc_trained, abs=1e-4)
    assert city["final_digests"] == {"gw-1": initial, "gw-2": trained}
    assert city["final_accuracy"] == pytest.approx((acc_initial + acc_trained) / 2, abs=1e-4)  # the mean of both
    report = {"city": city, "gateways": {"gw-1": {"state": "done", "ledger": {"verified": True}},
                                         "gw-2": {"state": "done", "ledger": {"verified": True}}}}
    assert not ok(report)  # a city that ends on two models has not done its job
    assert ok({**report, "city": {**city, "final_digests": {"gw-1": trained, "gw-2": trained}}})


def test_a_model_no_store_holds_is_reported_missing(world):
    results = {"gw-1": {"city": {"epochs": [epoch(1, 2, "0f" * 32, [])]}}, "gw-2": {}}
    city = city_section(world["scenario"], world["members"], results, world["evaluator"])
    assert city["epochs"][0]["accuracy"] is None and city["epochs"][0]["agreed"] is False
    assert city["missing_models"] == ["0f" * 32]
    assert city["final_accuracy"] is None and city["final_digests"] == {"gw-1": "0f" * 32}


def test_a_gateway_without_the_city_tier_is_named_as_the_problem(world):
    city = city_section(world["scenario"], world["members"], {"gw-1": {}, "gw-2": {"city": None}},
                        world["evaluator"])
    assert city["epochs"] == [] and city["final_accuracy"] is None and "no gateway's result.json" in city["problem"]
    assert not ok({"city": city, "gateways": {"gw-1": {"state": "done", "ledger": {"verified": True}}}})


def test_without_the_tier_each_gateways_final_model_is_evaluated_on_all_devices(world):
    isolated = parse_scenario(FLEET)
    for member, key in zip(world["members"], ("initial", "trained")):
        np.savez(member.home / "model.npz", **world[key])
        (member.home / "result.json").write_text(json.dumps({"model": {"digest": f"{key}-digest"}}))
    results = read_results(world["members"])
    lines = []
    city = city_section(isolated, world["members"], results, world["evaluator"], lines.append)
    acc = {gw: on_all_devices(world, world[key]) for gw, key in (("gw-1", "initial"), ("gw-2", "trained"))}
    assert city["tier"] is False
    assert city["isolated_accuracy"] == {gw: pytest.approx(a, abs=1e-4) for gw, a in acc.items()}
    assert city["isolated_mean"] == pytest.approx(sum(acc.values()) / 2, abs=1e-4)
    assert city["models"] == {"gw-1": "initial-digest", "gw-2": "trained-digest"}
    assert city["isolated_by_gateway"]["gw-2"]["gw-1"] == pytest.approx(
        on_all_devices(world, world["trained"], "gw-1"), abs=1e-4)
    assert len(lines) == 2 and lines[0].startswith("starling-emulate: gw-1's final model on all devices: accuracy")
    gateways = {"gw-1": {"rounds": [{"round": 4, "accuracy": 0.9}]},
                "gw-2": {"rounds": [{"round": 4, "accuracy": 0.8}]}}
    report = {"city": city, "gateways": gateways}
    assert final_accuracy(report) == pytest.approx(0.85)  # the headline without the tier: as before
    assert all_devices_accuracy(report) == city["isolated_mean"]
    assert comparison_view(city) == {"tier": False, "isolated_mean": city["isolated_mean"]}


def test_one_gateway_has_no_city_section_and_the_synthetic_model_no_accuracy(world):
    one = parse_scenario({**FLEET, "fleet": {**FLEET["fleet"], "gateways": 1}})
    assert city_section(one, world["members"][:1], {}, world["evaluator"]) is None
    assert all_devices_accuracy({"rounds": [{"round": 4, "accuracy": 0.7}, {"round": 5, "accuracy": None}]}) == 0.7
    synthetic = parse_scenario({"fleet": {"gateways": 2, "devices": 4, "runner": "pool"},
                                "training": {"model": "synthetic"}, "city": {"every": 2}})
    gw1 = world["members"][0]
    digest = keep(gw1, world["initial"], 1)
    city = city_section(synthetic, world["members"], {"gw-1": {"city": {"epochs": [epoch(1, 2, digest, [])]}}}, None)
    assert city["note"].startswith("training.model = 'synthetic'") and city["epochs"][0]["accuracy"] is None
    assert "missing_models" not in city and city["final_digests"] == {"gw-1": digest}


def test_a_gateway_attack_is_as_expected_when_every_peer_flagged_its_target(world):
    three = [*world["members"], Member("gw-3", "c3" * 8, world["tmp"] / "gw-3")]
    adversary = parse_scenario({"fleet": {"gateways": 3, "devices": 3}, "adversary": [
        {"attack": "tampered_aggregate", "target": "gw-2", "scale": 0.05}]}).adversaries[0]
    evidence = {IDS["gw-2"]: {"kind": "aggregate", "accusers": [IDS["gw-1"], "c3" * 8]}}
    late = {"city": {"flagged": evidence,  # left out from epoch 2 on: flagged after epoch 1
                     "epochs": [epoch(1, 3, "aa" * 32, [("gw-1", 0.5), ("gw-2", 0.5)]),
                                epoch(2, 6, "bb" * 32, [("gw-1", 1.0)], [("gw-2", "flagged")])]}}
    entry = gateway_attack(adversary, three, {"gw-1": late, "gw-3": late, "gw-2": {}})
    assert entry["target"] == "gw-2" and entry["scale"] == 0.05 and entry["expected"] == ["flagged"]
    assert entry["flagged_by"] == ["gw-1", "gw-3"] and entry["as_expected"] is True
    assert entry["left_out"] == {gw: [{"epoch": 2, "reason": "flagged"}] for gw in ("gw-1", "gw-3")}
    assert entry["devices"] == [] and entry["accepted"] == 0
    still_in = {"city": {"flagged": {}, "epochs": [epoch(1, 3, "aa" * 32, [("gw-1", 0.5), ("gw-2", 0.5)])]}}
    partly = gateway_attack(adversary, three, {"gw-1": late, "gw-3": still_in})
    assert partly["flagged_by"] == ["gw-1", "gw-3"]  # the ledger's evidence, as gw-1 sees it
    assert partly["as_expected"] is False  # but gw-3 still merged its model
    assert gateway_attack(adversary, three, {})["as_expected"] is False  # no city tier: nobody kept it out
    text = summary({"rounds": [], "seconds": 3, "ledger": {"height": 1, "verified": True}, "gateways": {},
                     "attacks": [entry]}, world["tmp"] / "r.json")
    assert "attack tampered_aggregate at gw-2: flagged by gw-1, gw-3: yes" in text


def test_the_html_report_shows_the_city_compactly(world, tmp_path):
    city = {"tier": True, "every": 3, "rule": "weighted", "audit_share": 1.0, "devices": 9, "windows": 420,
            "epochs": [{"epoch": 1, "round": 3, "digests": {"gw-1": "ab" * 32, "gw-2": "ab" * 32}, "agreed": True,
                        "inputs": [{"gateway": "gw-1", "weight": 300.0}, {"gateway": "gw-2", "weight": 100.0}],
                        "left_out": [], "accuracy": 0.61},
                       {"epoch": 2, "round": 6, "digests": {"gw-1": "cd" * 32, "gw-2": "ef" * 32}, "agreed": False,
                        "inputs": [{"gateway": "gw-1", "weight": 1.0}],
                        "left_out": [{"gateway": "gw-2", "reason": "no_offer"}], "accuracy": 0.72}],
            "final_digests": {"gw-1": "cd" * 32, "gw-2": "ef" * 32}, "final_accuracy": 0.7,
            "flagged": {"gw-2": {"accusers": ["gw-1"], "kind": "aggregate", "reason": "digest differs"}},
            "alone": {"gw-1": 0, "gw-2": 1},
            "audits": {"checked": 4, "match": 3, "mismatch": 1, "unverifiable": 0, "missing_inputs": 0}}
    rounds = [{"round": r, "accuracy": 0.5 + r / 20, "participants": 2, "seconds": 1.0} for r in range(7)]
    report = {"scenario": "c", "final_accuracy": 0.7, "city": city, "rounds": rounds,
              "gateways": {"gw-1": {"rounds": rounds}, "gw-2": {"rounds": rounds}}}
    written = write_html_report(report, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>City</h2>" in page and "A city epoch every 3 rounds, rule weighted" in page
    assert "final accuracy (the city model, on all devices)</td><td>0.700" in page
    assert 'class="good">one</span> (abababababab)' in page  # epoch 1: one model
    assert "cdcdcdcdcdcd: gw-1; efefefefefef: gw-2" in page  # epoch 2: which gateway has which
    assert "gw-1 0.75, gw-2 0.25" in page  # the shares of the examples each offer weighs
    assert "gw-2 (no_offer)" in page and "gw-1 1.00" in page
    assert '<span class="bad">2 digests</span>' in page and "gw-2 by gw-1 (aggregate: digest differs)" in page
    assert "epochs merged alone (no record)</td><td>gw-2 1" in page
    assert "checked 4, match 3, mismatch 1" in page and "9 devices, 420 windows" in page
    assert any(p.name == "accuracy.png" for p in written)
    isolated = {**report, "final_accuracy": 0.9,
                "city": {"tier": False, "isolated_accuracy": {"gw-1": 0.41, "gw-2": 0.45}, "isolated_mean": 0.43}}
    write_html_report(isolated, tmp_path / "isolated.html")
    page = (tmp_path / "isolated.html").read_text()
    assert "No city tier: each gateway's final model, on every device of the city." in page
    assert "<td><b>mean</b></td><td class=\"n\">0.430</td>" in page
    failed = {**report, "city": {"tier": True, "error": "OSError: disk"}}
    write_html_report(failed, tmp_path / "failed.html")
    assert "The city evaluation failed: OSError: disk" in (tmp_path / "failed.html").read_text()
