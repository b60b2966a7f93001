"""The city tier's scenario settings: [city], label skew between neighbourhoods, the tampered_aggregate gateway
attack, faults in variants; what each gateway's config gets; and the errors that name each field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hw.device_processes import choose_attackers
from hw.fleet import GatewayRun
from hw.fleet_configs import gateway_command, gateway_config
from hw.partition import partition
from hw.scenario import ScenarioError, load_scenario, parse_scenario
from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
CITY = {"fleet": {"gateways": 3, "devices": 9, "subjects": list(range(1, 10))}, "run": {"rounds": 6}}
SKEW = [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 0, 1]]


def test_a_city_table_gets_every_key_with_the_defaults_filled_in():
    s = parse_scenario({**CITY, "city": {"every": 3}})
    assert s.city == {"every": 3, "rule": "weighted", "deadline_s": 60.0, "audit_share": 1.0, "momentum": 0.0}
    s = parse_scenario({**CITY, "city": {"every": 2, "rule": "median", "deadline_s": 5, "audit_share": 0.5,
                                         "momentum": 0.6}})
    assert s.city == {"every": 2, "rule": "median", "deadline_s": 5.0, "audit_share": 0.5, "momentum": 0.6}
    assert isinstance(s.city["deadline_s"], float)
    assert parse_scenario(CITY).city == {}  # no table: no tier
    assert s.to_dict()["city"] == s.city


@pytest.mark.parametrize(("city", "fleet", "match"), [
    ({"every": 3}, {"gateways": 1},
     r"\[city\]: the city tier merges several gateways' models, but fleet\.gateways = 1"),
    ({"rule": "median"}, {}, r"city\.every is required"),
    ({"every": 0}, {}, r"city\.every must be between 1 and run\.rounds = 6"),
    ({"every": 7}, {}, r"city\.every must be between 1 and run\.rounds = 6"),
    ({"every": 3, "rule": "mean"}, {}, r"city\.rule must be one of weighted, median, not 'mean'"),
    ({"every": 3, "deadline_s": 0}, {}, r"city\.deadline_s must be positive"),
    ({"every": 3, "audit_share": 1.5}, {}, r"city\.audit_share must be between 0 and 1"),
    ({"every": 3, "audit_share": -0.1}, {}, r"city\.audit_share must be between 0 and 1"),
    ({"every": 3, "evry": 3}, {}, r"unknown key city\.evry; known: every, rule, deadline_s, audit_share, momentum"),
    ({"every": 3, "momentum": 1.0}, {}, r"city\.momentum must be at least 0 and below 1"),
    ({"every": 3, "momentum": -0.5}, {}, r"city\.momentum must be at least 0 and below 1"),
    ({"every": True}, {}, r"city\.every has the wrong type"),
    ({"every": 3.0}, {}, r"city\.every has the wrong type"),
    ({"every": 3, "rule": 1}, {}, r"city\.rule has the wrong type"),
    ({"every": 3, "deadline_s": float("inf")}, {}, r"city\.deadline_s must be a finite number"),
])
def test_a_bad_city_table_names_the_field(city, fleet, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario({**CITY, "fleet": {**CITY["fleet"], **fleet}, "city": city})


def test_variants_override_the_city_table_key_by_key_and_an_empty_one_drops_it():
    s = parse_scenario({**CITY, "city": {"every": 3, "deadline_s": 10.0}, "variant": [
        {"name": "city"},
        {"name": "median", "city": {"rule": "median"}},
        {"name": "isolated", "city": {}},
        {"name": "one_gateway", "city": {}, "fleet": {"gateways": 1}}]})
    city, median, isolated, one = s.variants
    assert city.city == {"every": 3, "rule": "weighted", "deadline_s": 10.0, "audit_share": 1.0, "momentum": 0.0}
    assert median.city == {**city.city, "rule": "median"}
    assert isolated.city == {} and isolated.gateways == 3
    assert one.city == {} and (one.gateways, one.devices) == (1, 9)  # the same 9 devices on one gateway
    with pytest.raises(ScenarioError, match=r"variant\[0\] \(one\): \[city\]: the city tier merges several"):
        parse_scenario({**CITY, "city": {"every": 3}, "variant": [{"name": "one", "fleet": {"gateways": 1}}]})


def test_a_variant_may_hold_its_own_faults():
    fault = {"kind": "partition", "target": "gw-3", "at_round": 2, "down_s": 30}
    s = parse_scenario({**CITY, "fault": [{"kind": "gateway_restart", "target": "gw-1", "at_round": 1}], "variant": [
        {"name": "base"}, {"name": "partition", "fault": [fault]}, {"name": "calm", "fault": []}]})
    base, cut, calm = s.variants
    assert [f.kind for f in base.faults] == ["gateway_restart"]
    assert [(f.kind, f.target, f.at_round, f.down_s) for f in cut.faults] == [("partition", "gw-3", 2, 30.0)]
    assert calm.faults == ()
    with pytest.raises(ScenarioError, match=r"variant\[0\] \(x\): fault\[0\]\.target must be one of gw-1, gw-2, gw-3"):
        parse_scenario({**CITY, "variant": [{"name": "x", "fault": [{**fault, "target": "gw-9"}]}]})


def test_neighbourhoods_give_each_device_its_neighbourhoods_classes():
    s = parse_scenario({**CITY, "dataset": {"classes_by_neighbourhood": SKEW}})
    assert s.neighbourhoods == tuple(tuple(c) for c in SKEW)
    assert [s.classes_of(i) for i in (0, 1, 2, 3, 8)] == [(0, 1, 2, 3, 4), (2, 3, 4, 5, 6), (4, 5, 6, 0, 1),
                                                         (0, 1, 2, 3, 4), (4, 5, 6, 0, 1)]
    assert parse_scenario(CITY).classes_of(4) is None
    assert s.to_dict()["neighbourhoods"] == SKEW
    one = parse_scenario({**CITY, "fleet": {**CITY["fleet"], "gateways": 1},
                          "dataset": {"classes_by_neighbourhood": SKEW}})
    assert one.classes_of(5) == s.classes_of(5)  # on one gateway a device keeps its neighbourhood


@pytest.mark.parametrize(("skew", "fleet", "match"), [
    ([[0, 1]], {}, r"dataset\.classes_by_neighbourhood must list at least 2 neighbourhoods"),
    ([[0, 1], []], {}, r"dataset\.classes_by_neighbourhood\[1\] must be a non-empty list"),
    ([[0, 1], 3], {}, r"dataset\.classes_by_neighbourhood\[1\] must be a non-empty list"),
    ([[0, 1], [2, 7]], {}, r"dataset\.classes_by_neighbourhood\[1\]: the watch data's classes are 0 to 6"),
    ([[0, -1], [2]], {}, r"dataset\.classes_by_neighbourhood\[0\]: -1 is not a class label"),
    ([[0, True], [2]], {}, r"dataset\.classes_by_neighbourhood\[0\]: True is not a class label"),
    ([[0, "1"], [2]], {}, r"dataset\.classes_by_neighbourhood\[0\]: '1' is not a class label"),
    ([[0, 1, 0], [2]], {}, r"dataset\.classes_by_neighbourhood\[0\] names a class twice"),
    ([[0], [1], [2], [3]], {}, r"4 neighbourhoods for 3 gateways; give one gateway per neighbourhood"),
    ([[0], [1]], {"gateways": 1, "devices": 1, "subjects": [1]}, r"2 neighbourhoods but only 1 devices"),
])
def test_bad_neighbourhoods_name_the_field(skew, fleet, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario({**CITY, "fleet": {**CITY["fleet"], **fleet}, "dataset": {"classes_by_neighbourhood": skew}})
    with pytest.raises(ScenarioError, match=r"dataset\.classes_by_neighbourhood has the wrong type"):
        parse_scenario({**CITY, "dataset": {"classes_by_neighbourhood": "by_gateway"}})


def test_each_device_trains_and_tests_only_on_its_neighbourhoods_classes():
    plain = parse_scenario({"fleet": {"gateways": 2, "devices": 4, "subjects": [1, 2, 3, 4]}})
    skewed = parse_scenario({"fleet": {"gateways": 2, "devices": 4, "subjects": [1, 2, 3, 4]},
                             "dataset": {"classes_by_neighbourhood": [[0, 1, 2], [3, 4, 5, 6]]}})
    for i, (full, kept) in enumerate(zip(partition(plain), partition(skewed))):
        classes = skewed.classes_of(i)
        assert full.name == kept.name
        assert set(kept.y_train.tolist()) == set(classes) and set(kept.y_test.tolist()) == set(classes)
        for split in ("train", "test"):  # every window of its classes, and nothing else, in order
            mask = np.isin(getattr(full, f"y_{split}"), classes)
            assert np.array_equal(getattr(kept, f"x_{split}"), getattr(full, f"x_{split}")[mask])
            assert np.array_equal(getattr(kept, f"y_{split}"), getattr(full, f"y_{split}")[mask])


def test_a_neighbourhood_that_leaves_a_device_without_windows_is_an_error(tmp_path):
    for i in range(2):  # a folder source: device 1 has only class 9
        np.savez(tmp_path / f"d{i}.npz", X=np.zeros((20, 128, 6), np.float32), y=np.full(20, 9 * i, np.int32))
    s = parse_scenario({"fleet": {"gateways": 2, "devices": 2}, "dataset": {
        "source": str(tmp_path), "classes_by_neighbourhood": [[0], [0, 1]]}})
    with pytest.raises(ScenarioError, match=r"classes_by_neighbourhood: d1 \(neighbourhood 1, classes \[0, 1\]\) "
                                            r"keeps 0 train and 0 test windows.*its data has classes \[9\]"):
        partition(s)


def test_a_tampered_aggregate_attack_names_its_gateway_and_takes_no_devices():
    s = parse_scenario({**CITY, "adversary": [
        {"attack": "tampered_aggregate", "target": "gw-2", "scale": 0.1},
        {"attack": "sign_flip", "count": 2}]})
    tampered, flip = s.adversaries
    assert (tampered.on_gateway, tampered.target, tampered.scale, tampered.devices(9)) == (True, "gw-2", 0.1, 0)
    assert not flip.on_gateway
    assert s.gateway_attacks() == {"gw-2": tampered}
    assert tampered.label() == "tampered_aggregate at gw-2 x0.1"
    chosen = choose_attackers(s, [f"d{i}" for i in range(9)])
    assert len(chosen) == 2 and {a.attack for _, a in chosen.values()} == {"sign_flip"}  # no device tampers
    assert s.to_dict()["adversaries"][0] == {"attack": "tampered_aggregate", "scale": 0.1, "target": "gw-2"}


@pytest.mark.parametrize(("table", "match"), [
    ({"attack": "tampered_aggregate"}, (r"adversary\[0\]\.target is required for tampered_aggregate: the gateway that "
                                       r"runs it, one of gw-1, gw-2, gw-3")),
    ({"attack": "tampered_aggregate", "target": "gw-4"}, (r"adversary\[0\]\.target must be one of gw-1, gw-2, gw-3 "
                                                         r"\(fleet\.gateways = 3\), not 'gw-4'")),
    ({"attack": "tampered_aggregate", "target": "2"}, r"adversary\[0\]\.target must be one of"),
    ({"attack": "tampered_aggregate", "target": "gw-1", "fraction": 0.3},
     r"adversary\[0\]: tampered_aggregate is a gateway attack: it takes target \(a gateway\), not fraction or count"),
    ({"attack": "tampered_aggregate", "target": "gw-1", "sigma": 1.0},
     r"adversary\[0\]\.sigma is not a parameter of tampered_aggregate \(it takes scale\)"),
    ({"attack": "tampered_aggregate", "target": "gw-1", "scale": 0}, r"adversary\[0\]\.scale must be positive"),
    ({"attack": "tampered_aggregate", "target": 2}, r"adversary\[0\]\.target has the wrong type"),
    ({"attack": "sign_flip", "count": 1, "target": "gw-1"},
     r"adversary\[0\]\.target: only a gateway attack \(tampered_aggregate\) has a target"),
    ({"attack": "tampered_aggregates", "target": "gw-1"},
     r"unknown attack 'tampered_aggregates'; one of .*under_bound, tampered_aggregate"),
])
def test_a_bad_gateway_attack_names_the_field(table, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario({**CITY, "adversary": [table]})


def test_one_gateway_attack_per_gateway():
    table = {"attack": "tampered_aggregate", "target": "gw-1"}
    with pytest.raises(ScenarioError, match=r"adversary\[1\]\.target: gw-1 already runs a gateway attack"):
        parse_scenario({**CITY, "adversary": [table, table]})


def _gateway(tmp_path: Path, index: int = 0) -> GatewayRun:
    home = tmp_path / f"gw-{index + 1}"
    home.mkdir()
    return GatewayRun(index, f"gw-{index + 1}", Identity.generate(), home, tmp_path / "gw.log", ["subject-01"])


def test_every_gateway_config_gets_the_city_table_and_keeps_every_city_model(tmp_path):
    s = parse_scenario({**CITY, "run": {"rounds": 15}, "city": {"every": 3, "rule": "median", "deadline_s": 10}})
    doc = tomllib.loads(gateway_config(s, _gateway(tmp_path), ("127.0.0.1", 1883), None).read_text())
    assert doc["city"] == {"every": 3, "rule": "median", "deadline_s": 10.0, "audit_share": 1.0, "momentum": 0.0}
    assert doc["blobs"] == {"keep": 17}  # every tag of the run: the city models are read after it
    plain = tomllib.loads(gateway_config(parse_scenario(CITY), _gateway(tmp_path, 1), ("127.0.0.1", 1883),
                                          None).read_text())
    assert "city" not in plain and "blobs" not in plain


def test_the_target_gateway_runs_through_the_tampering_launcher(tmp_path):
    s = parse_scenario({**CITY, "run": {"seed": 2, "rounds": 6},
                        "adversary": [{"attack": "tampered_aggregate", "target": "gw-2", "scale": 0.2}]})
    honest, target = _gateway(tmp_path, 0), _gateway(tmp_path, 1)
    assert gateway_command(s, honest, Path("c.toml"))[1:] == ["-m", "gateway.cli", "run", "--config", "c.toml"]
    cmd = gateway_command(s, target, Path("c.toml"))
    assert cmd[1:3] == ["-m", "hw.tampered_gateway"] and cmd[-3:] == ["run", "--config", "c.toml"]
    assert cmd[cmd.index("--scale") + 1] == "0.2" and cmd[cmd.index("--seed") + 1] == str(2 * 1009 + 1)


def test_the_shipped_city_scenarios_are_valid():
    model = load_scenario(ROOT / "hw" / "scenarios" / "city_model.toml")
    assert [v.name for v in model.variants] == ["city", "isolated", "one_gateway"]
    city, isolated, one = model.variants
    assert (city.gateways, city.devices, city.rounds, city.strategy, city.city["every"]) == (3, 9, 15, "FedAvg", 3)
    assert isolated.city == {} and isolated.gateways == 3
    assert one.city == {} and (one.gateways, one.devices) == (1, 9)
    assert city.neighbourhoods == isolated.neighbourhoods == one.neighbourhoods and len(city.neighbourhoods) == 3
    audit = load_scenario(ROOT / "hw" / "scenarios" / "city_audit.toml")
    clean, tampered, cut = audit.variants
    assert [v.name for v in audit.variants] == ["clean", "tampered", "partition"]
    assert clean.adversaries == () and clean.faults == () and clean.city == tampered.city == cut.city
    assert list(tampered.gateway_attacks()) == ["gw-3"]
    assert [(f.kind, f.target) for f in cut.faults] == [("partition", "gw-3")]
