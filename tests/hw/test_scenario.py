"""Scenario files: the new fleet, dataset, adversary and variant settings, and the errors that name each field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hw.device_processes import choose_attackers
from hw.partition import MIN_TRAIN, dirichlet_indices, load_folder_devices, partition
from hw.scenario import ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_one_gateway_per_subject_and_no_attackers():
    s = parse_scenario({})
    assert (s.gateways, s.devices, s.partition, s.adversaries, s.variants) == (1, 5, "subject", (), ())


def test_devices_are_split_over_the_gateways_round_robin():
    s = parse_scenario({"fleet": {"gateways": 3, "devices": 8}, "dataset": {"partition": "dirichlet"}})
    assert [s.devices_of(g) for g in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    s = parse_scenario({"fleet": {"gateways": 2, "devices_per_gateway": 2}})
    assert s.devices == 4 and [len(s.devices_of(g)) for g in range(2)] == [2, 2]


def test_adversaries_and_their_parameters():
    s = parse_scenario({"fleet": {"devices": 10}, "adversary": [
        {"attack": "sign_flip", "fraction": 0.3}, {"attack": "scaling", "count": 1, "scale": 5},
        {"attack": "sybil", "count": 1, "payload": "none"}]})
    assert [(a.attack, a.devices(10)) for a in s.adversaries] == [("sign_flip", 3), ("scaling", 1), ("sybil", 1)]
    assert s.adversaries[1].scale == 5.0 and s.adversaries[2].payload == "none"
    assert parse_scenario({"fleet": {"devices": 3}, "adversary": [{"attack": "replay", "fraction": 0.1}]}
                          ).adversaries[0].devices(3) == 1  # a fraction rounds to at least one device


def test_each_attacker_runs_hw_adversary_and_a_boosted_sign_flip_scales_by_minus_its_scale():
    s = parse_scenario({"fleet": {"devices": 10}, "adversary": [
        {"attack": "sign_flip", "count": 1}, {"attack": "sign_flip", "count": 1, "scale": 4},
        {"attack": "gaussian_noise", "count": 1, "sigma": 0.5}, {"attack": "sybil", "count": 1, "payload": "none"}]})
    plain, boosted, noise, sybil = (a.command("a.toml") for a in s.adversaries)
    assert plain[1:] == ["-m", "hw.adversary", "--attack", "sign_flip", "--config", "a.toml", "--log-level", "INFO"]
    assert boosted[boosted.index("--attack") + 1] == "scaling" and boosted[boosted.index("--scale") + 1] == "-4.0"
    assert noise[noise.index("--sigma") + 1] == "0.5" and "--scale" not in noise
    assert sybil[sybil.index("--sybil-payload") + 1] == "none"
    assert [a.label() for a in s.adversaries] == ["sign_flip 1 device", "sign_flip x4 1 device",
                                                  "gaussian_noise 1 device", "sybil 1 device"]


def test_attackers_are_a_seeded_disjoint_choice():
    s = parse_scenario({"fleet": {"devices": 10}, "adversary": [{"attack": "sign_flip", "fraction": 0.3},
                                                                  {"attack": "free_rider", "count": 2}]})
    names = [f"d{i}" for i in range(10)]
    chosen = choose_attackers(s, names)
    assert chosen == choose_attackers(s, names)
    assert sorted(a.attack for _, a in chosen.values()) == ["free_rider"] * 2 + ["sign_flip"] * 3
    other = parse_scenario({"run": {"seed": 1}, "fleet": {"devices": 10},
                            "adversary": [{"attack": "sign_flip", "fraction": 0.3}, {"attack": "free_rider", "count": 2}]})
    assert choose_attackers(other, names) != chosen


def test_variants_override_the_base_section_by_section():
    s = parse_scenario({
        "run": {"name": "cmp", "rounds": 3},
        "fleet": {"devices": 10},
        "strategy": {"name": "FedAvg", "params": {"min_available_nodes": 10}},
        "adversary": [{"attack": "sign_flip", "fraction": 0.3}],
        "variant": [{"name": "clean", "adversary": []},
                    {"name": "fedavg"},
                    {"name": "median", "strategy": {"name": "FedMedian"}}],
    })
    clean, fedavg, median = s.variants
    assert [v.name for v in s.variants] == ["clean", "fedavg", "median"]
    assert clean.adversaries == () and fedavg.adversaries == s.adversaries and median.adversaries == s.adversaries
    assert median.strategy == "FedMedian" and median.strategy_params == {"min_available_nodes": 10}
    assert all(v.rounds == 3 and v.variants == () for v in s.variants)
    assert s.to_dict()["variants"] == ["clean", "fedavg", "median"]


@pytest.mark.parametrize("doc, match", [
    ({"fleet": {"gateways": 0}}, r"fleet\.gateways must be between 1"),
    ({"fleet": {"gateways": 3, "devices": 2}}, r"fleet\.devices: 2 devices for 3 gateways"),
    ({"fleet": {"gateways": 2, "devices": 5, "devices_per_gateway": 2}}, r"fleet\.devices = 5 contradicts"),
    ({"fleet": {"devices_per_gateway": 0}}, r"fleet\.devices_per_gateway must be positive"),
    ({"fleet": {"gateways": "2"}}, r"fleet\.gateways has the wrong type"),
    ({"fleet": {"devices": 12}}, r"fleet\.devices: the watch data has 10 subjects"),
    ({"fleet": {"subjects": [1, 1]}}, r"fleet\.subjects names a subject twice"),
    ({"dataset": {"partition": "random"}}, r"dataset\.partition must be one of subject, dirichlet"),
    ({"dataset": {"alpha": 0.5}}, r'dataset\.alpha only applies to partition = "dirichlet"'),
    ({"dataset": {"partition": "dirichlet", "alpha": 0}}, r"dataset\.alpha must be positive"),
    ({"dataset": {"test_fraction": 1.0}}, r"dataset\.test_fraction must be between 0 and 1"),
    ({"adversary": {"attack": "sign_flip"}}, r"adversary must be an array of tables"),
    ({"adversary": [{"fraction": 0.2}]}, r"adversary\[0\]\.attack is required"),
    ({"adversary": [{"attack": "bribe", "fraction": 0.2}]}, r"adversary\[0\]\.attack: unknown attack 'bribe'"),
    ({"adversary": [{"attack": "sign_flip"}]}, r"adversary\[0\]: give either fraction .* or count, not neither"),
    ({"adversary": [{"attack": "sign_flip", "fraction": 0.2, "count": 1}]}, r"adversary\[0\]: .* not both"),
    ({"adversary": [{"attack": "sign_flip", "fraction": 1.5}]}, r"adversary\[0\]\.fraction must be in \(0, 1\]"),
    ({"adversary": [{"attack": "sign_flip", "count": 0}]}, r"adversary\[0\]\.count must be at least 1"),
    ({"adversary": [{"attack": "sign_flip", "count": 1, "sigma": 3}]},
     r"adversary\[0\]\.sigma is not a parameter of sign_flip \(it takes scale\)"),
    ({"adversary": [{"attack": "replay", "count": 1, "scale": 3}]},
     r"adversary\[0\]\.scale is not a parameter of replay \(it takes none\)"),
    ({"adversary": [{"attack": "scaling", "count": 1, "scale": -1}]}, r"adversary\[0\]\.scale must be positive"),
    ({"adversary": [{"attack": "sybil", "count": 1, "payload": "steal"}]}, r"adversary\[0\]\.payload must be one of"),
    ({"adversary": [{"attack": "sign_flip", "count": 1, "targets": "x"}]}, r"unknown key adversary\[0\]\.targets"),
    ({"fleet": {"devices": 3}, "adversary": [{"attack": "sign_flip", "count": 2}, {"attack": "replay", "count": 2}]},
     r"adversary: 4 attacking devices, but the fleet has only 3"),
    ({"variant": []}, r"variant must be a non-empty array"),
    ({"variant": [{"strategy": {"name": "FedAvg"}}]}, r"variant\[0\]\.name is required"),
    ({"variant": [{"name": "a b"}]}, r"variant\[0\]\.name 'a b': use letters"),
    ({"variant": [{"name": "a"}, {"name": "a"}]}, r"variant\[1\]\.name 'a' is used twice"),
    ({"variant": [{"name": "a", "run": {"rounds": 2}}]}, r"variant\[0\]\.run: a variant cannot change \[run\]"),
    ({"variant": [{"name": "a", "strategi": {}}]}, r"unknown key variant\[0\]\.strategi"),
    ({"variant": [{"name": "a", "training": {"lr": 0}}]}, r"variant\[0\] \(a\): training\.lr must be positive"),
    ({"variant": [{"name": "a", "adversary": [{"attack": "nope", "count": 1}]}]},
     r"variant\[0\] \(a\): adversary\[0\]\.attack: unknown attack"),
])
def test_every_bad_field_is_named(doc, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario(doc)


def test_dirichlet_partition_is_seeded_skewed_and_gives_everyone_enough():
    y_train = np.repeat(np.arange(7), 100)
    y_test = np.repeat(np.arange(7), 20)
    a = dirichlet_indices(y_train, y_test, 20, 0.1, seed=3)
    b = dirichlet_indices(y_train, y_test, 20, 0.1, seed=3)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    train = np.concatenate([t for t, _ in a])
    assert sorted(train.tolist()) == list(range(700))  # every window dealt exactly once
    assert all(len(t) >= MIN_TRAIN and len(s) >= 1 for t, s in a)
    classes = [len(np.unique(y_train[t])) for t, _ in a]
    assert np.mean(classes) < 4  # alpha = 0.1: most devices see few of the 7 classes
    wide = dirichlet_indices(y_train, y_test, 20, 100.0, seed=3)
    assert np.mean([len(np.unique(y_train[t])) for t, _ in wide]) > 6
    with pytest.raises(ScenarioError, match="too few windows"):
        dirichlet_indices(np.zeros(10, int), np.zeros(10, int), 5, 1.0, seed=0)


def test_dirichlet_over_the_watch_data_makes_any_number_of_devices():
    s = parse_scenario({"fleet": {"devices": 12, "gateways": 2}, "dataset": {"partition": "dirichlet", "alpha": 0.5}})
    devices = partition(s)
    assert [d.name for d in devices][:2] == ["device-001", "device-002"] and len(devices) == 12
    assert all(d.num_train >= MIN_TRAIN and d.num_test >= 1 for d in devices)
    assert devices[0].x_train.shape[1:] == (128, 6)


def test_a_folder_of_x_y_files_is_split_into_local_train_and_test(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        np.savez(tmp_path / f"dev{i}.npz", X=rng.normal(size=(20, 128, 6)).astype(np.float32),
                 y=rng.integers(0, 7, 20))
    np.savez(tmp_path / "zbad.npz", Z=np.zeros(3))
    with pytest.raises(ScenarioError, match=r"zbad\.npz has arrays \['Z'\]; expected X and y"):
        load_folder_devices(tmp_path, 0.25, 0)
    (tmp_path / "zbad.npz").unlink()
    devices = load_folder_devices(tmp_path, 0.25, 0)
    assert [(d.name, d.num_train, d.num_test) for d in devices] == [(f"dev{i}", 15, 5) for i in range(3)]
    s = parse_scenario({"fleet": {"devices": 4}, "dataset": {"source": str(tmp_path)}})
    with pytest.raises(ScenarioError, match="dataset.source has 3 devices' files for 4 devices"):
        partition(s)


def test_the_shipped_scenarios_are_valid():
    for path in sorted((ROOT / "hw" / "scenarios").glob("*.toml")):
        load_scenario(path)


@pytest.mark.parametrize("fleet, training, message", [
    ({"runner": "threads"}, {}, "fleet.runner must be one of process, pool"),
    ({"runner": "pool", "pool_size": 0}, {}, "fleet.pool_size must be positive"),
    ({}, {"model": "resnet"}, "training.model must be a model family \\(imu_cnn, tabular_mlp, imu_autoencoder\\)"),
    ({}, {"model": "synthetic"}, 'training.model = "synthetic" runs in device pools'),
])
def test_runner_and_model_choices_are_checked(fleet, training, message):
    with pytest.raises(ScenarioError, match=message):
        parse_scenario({"fleet": {"devices": 3, **fleet}, "training": training})


def test_the_shipped_city_runs_500_devices_in_pools_on_three_gateways():
    city = load_scenario(Path(__file__).resolve().parents[2] / "hw" / "scenarios" / "city.toml")
    assert (city.gateways, city.devices, city.runner, city.model) == (3, 501, "pool", "synthetic")


# --- [aggregation] and [defense]: into every gateway's config ------------------------------------

TRUST = {
    "fleet": {"devices": 10},
    "strategy": {"name": "MultiKrum", "params": {"num_malicious_nodes": 3, "num_nodes_to_select": 7}},
    "aggregation": {"weights": "capped", "median_multiple": 1.5},
    "defense": {"median_multiple": 2.0, "centered_clipping": True},
    "adversary": [{"attack": "crafted", "fraction": 0.3}],
    "variant": [{"name": "base"},
                {"name": "reported", "aggregation": {"weights": "reported"}, "defense": {"norm_bound": 1.0}},
                {"name": "bare", "aggregation": {}, "defense": {}}],
}


def test_aggregation_and_defense_tables_reach_every_gateway_config_and_variants_override_them(tmp_path):
    from gateway.config import load_config
    from gateway.weights import WeightRule
    from hw.fleet import GatewayRun
    from hw.fleet_configs import gateway_config
    from protocol.keys import Identity

    s = parse_scenario(TRUST)
    assert s.aggregation == {"weights": "capped", "median_multiple": 1.5}
    base, reported, bare = s.variants
    assert base.defense == {"median_multiple": 2.0, "centered_clipping": True}
    # A variant's table overrides key by key; an empty one drops the base's (the gateway's defaults).
    assert reported.aggregation == {"weights": "reported", "median_multiple": 1.5}
    assert reported.defense == {"median_multiple": 2.0, "centered_clipping": True, "norm_bound": 1.0}
    assert (bare.aggregation, bare.defense) == ({}, {}) and bare.defense_label() is None
    assert reported.defense_label() == ("weights reported; aggregation median_multiple=1.5; "
                                        "defense median_multiple=2.0, centered_clipping=True, norm_bound=1.0")
    for variant, rule, defense in ((reported, "reported", reported.defense), (bare, "capped", None)):
        home = tmp_path / variant.name
        home.mkdir()
        g = GatewayRun(0, "gw-1", Identity.generate(), home, home / "log", [f"d{i}" for i in range(10)])
        g.identity.save(g.key)
        config = load_config(gateway_config(variant, g, ("127.0.0.1", 1883), None))  # the gateway's own reader
        assert config.weights.rule == rule and config.defense == defense
        assert config.weights.median_multiple == (1.5 if variant is reported else WeightRule().median_multiple)
        assert type(config.make_strategy()).__name__ == ("UpdateBound" if defense else "MultiKrum")


def test_crafted_attackers_get_their_gateway_rendezvous_folder_colluders_and_fleet_size():
    s = parse_scenario({"fleet": {"devices": 10}, "adversary": [
        {"attack": "crafted", "fraction": 0.3, "z": 0.8}, {"attack": "inflate_examples", "count": 1, "scale": 0.1},
        {"attack": "under_bound", "count": 1, "bound_multiple": 1.5}]})
    crafted, inflate, under = s.adversaries
    cmd = crafted.command("a.toml", collude="/run/collusion/gw-1", colluders=3, fleet=10)
    assert cmd[cmd.index("--collude") + 1] == "/run/collusion/gw-1" and cmd[cmd.index("--colluders") + 1] == "3"
    assert cmd[cmd.index("--fleet-size") + 1] == "10" and cmd[cmd.index("--z") + 1] == "0.8"
    cmd = inflate.command("a.toml", collude="/x")  # only crafted attackers collude
    assert cmd[cmd.index("--scale") + 1] == "0.1" and "--collude" not in cmd
    assert under.command("a.toml")[-2:] == ["--bound-multiple", "1.5"]
    assert [a.label() for a in s.adversaries] == ["crafted 30%", "inflate_examples x0.1 1 device", "under_bound 1 device"]


@pytest.mark.parametrize("doc, match", [
    ({"aggregation": "capped"}, r"\[aggregation\] must be a table"),
    ({"aggregation": {"weights": "trusted"}}, r"aggregation\.weights must be one of"),
    ({"aggregation": {"weight": "capped"}}, r"unknown key aggregation\.weight; known: max_examples, median_multiple"),
    ({"aggregation": {"max_examples": 0}}, r"aggregation\.max_examples must be at least 1"),
    ({"aggregation": {"max_examples": 1.5}}, r"aggregation\.max_examples must be int"),
    ({"aggregation": {"median_multiple": 0.5}}, r"aggregation\.median_multiple must be at least 1"),
    ({"defense": {"median_multiple": -1}}, r"defense: UpdateBound refused them: .*not negative"),
    ({"defense": {"median_multiple": 0}}, r"defense: UpdateBound refused them: set norm_bound or median_multiple"),
    ({"defense": {"norm_bounds": 1.0}}, r"unknown key defense\.norm_bounds; known: centered_clipping"),
    ({"defense": {"centered_clipping": "yes"}}, r"defense\.centered_clipping must be true or false"),
    ({"defense": {"norm_bound": True}}, r"defense\.norm_bound must be a number"),
    ({"defense": {"median_multiple": 2.0}, "strategy": {"name": "Nope"}}, r"strategy\.name: 'Nope' is not a Flower"),
    ({"variant": [{"name": "a", "defense": {"norm_bound": -1.0}}]}, r"variant\[0\] \(a\): defense: UpdateBound"),
    ({"variant": [{"name": "a", "aggregation": {"weights": 3}}]}, r"variant\[0\] \(a\): aggregation\.weights must be str"),
    ({"adversary": [{"attack": "crafted", "count": 1, "scale": 2}]},
     r"adversary\[0\]\.scale is not a parameter of crafted \(it takes z\)"),
    ({"adversary": [{"attack": "crafted", "count": 1, "z": -1}]}, r"adversary\[0\]\.z must not be negative"),
    ({"adversary": [{"attack": "inflate_examples", "count": 1, "claim": 10_000_001}]},
     r"adversary\[0\]\.claim must be at most 10000000"),
    ({"adversary": [{"attack": "under_bound", "count": 1, "bound_multiple": 0}]},
     r"adversary\[0\]\.bound_multiple must be positive"),
])
def test_bad_aggregation_defense_and_attack_parameters_are_named(doc, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario(doc)


def test_personalization_is_parsed_as_the_agent_parses_it_and_a_variant_can_drop_it():
    base = {"run": {"rounds": 1}, "fleet": {"devices": 2}, "personalization": {"steps": 20, "lr": 0.05},
            "variant": [{"name": "tuned"}, {"name": "more", "personalization": {"steps": 80}},
                        {"name": "plain", "personalization": {}}]}
    scenario = parse_scenario(base)
    assert (scenario.personalization.steps, scenario.personalization.lr) == (20, 0.05)
    tuned, more, plain = scenario.variants
    assert tuned.personalization == scenario.personalization
    assert (more.personalization.steps, more.personalization.lr) == (80, 0.05)
    assert plain.personalization is None
    assert scenario.to_dict()["personalization"] == {"steps": 20, "lr": 0.05, "weights": ()}
    assert parse_scenario({"fleet": {"devices": 2}}).personalization is None


@pytest.mark.parametrize("doc, match", [
    ({"personalization": {"steps": 0}}, r"personalization\.steps must be between 1 and 10000"),
    ({"personalization": {"rate": 1}}, r"personalization\.rate"),
    ({"personalization": {}, "training": {"model": "imu_autoencoder"}},
     r"\[personalization\] tunes a classifier .* 'imu_autoencoder' is not one"),
])
def test_bad_personalization_is_named(doc, match):
    with pytest.raises(ScenarioError, match=match):
        parse_scenario({"fleet": {"devices": 2}, **doc})
