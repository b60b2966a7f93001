"""The privacy cost of a DP run (gateway/privacy.py): the formula, the config rules, a record that survives restarts."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.task_identity import TaskIdentity
from gateway_helpers import SHAPES, AgentFleet

from gateway import privacy, strategy_state
from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.service import Gateway
from gateway.strategies import make_strategy
from gateway.weights import WeightRule
from hw.broker import Broker
from hw.synthetic import write_manifest
from protocol.keys import Identity

dp_accounting = pytest.importorskip("dp_accounting")
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
FIXED = {"wrapper": "DifferentialPrivacyServerSideFixedClipping",
         "params": {"noise_multiplier": 0.8, "clipping_norm": 1.0, "num_sampled_clients": 3}}
ADAPTIVE = {"wrapper": "DifferentialPrivacyServerSideAdaptiveClipping",
            "params": {"noise_multiplier": 0.5, "num_sampled_clients": 3, "clipped_count_stddev": 1.0}}
NODES = {"min_available_nodes": 3, "min_train_nodes": 3}


def epsilon(multipliers: list[float], delta: float = 1e-5) -> float:
    """Google's dp-accounting directly: Gaussian releases, add-or-remove-one, no amplification."""
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


class Grid:
    """What configure_train needs of a grid: the online node ids."""

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)


def one_round(strategy, round_: int, online=(1, 2, 3)) -> list[Message]:
    """One training round on `online` nodes, every sampled node replying with weight 1; the instructions."""
    arrays = ArrayRecord({k: Array(v) for k, v in WEIGHTS.items()})
    messages = list(strategy.configure_train(round_, arrays, ConfigRecord(), Grid(online)))
    replies = []
    for i, message in enumerate(messages):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v + np.float32(i + 1)) for k, v in WEIGHTS.items()}),
                              "metrics": MetricRecord({"num-examples": 1})})
        replies.append(Message(content, reply_to=message))
    strategy.aggregate_train(round_, replies)
    return messages


# --- the formula ---------------------------------------------------------------------------------


def test_adaptive_clipping_is_accounted_as_one_gaussian_mechanism_below_the_configured_multiplier():
    z_model, sigma_b = 0.5164, 1.0
    z = privacy.effective_noise_multiplier(z_model, sigma_b)
    assert epsilon([z_model, sigma_b]) == pytest.approx(epsilon([z]), rel=1e-6)  # the two releases, as one
    strategy = make_strategy("FedAvg", NODES, {**ADAPTIVE, "params": {**ADAPTIVE["params"], "num_sampled_clients": 20}})
    # Flower splits the configured 0.5 by Andrew et al.'s formula for centred bits (2 sigma_b) ...
    assert strategy.noise_multiplier == pytest.approx((0.5 ** -2 - 2.0 ** -2) ** -0.5)
    # ... but counts plain bits (sensitivity 1): what runs is below 0.5
    assert strategy.accounted_noise_multiplier() == 0.458  # < 0.5
    assert (privacy.round_down(0.45899), privacy.round_down(12.349), privacy.round_down(3.0)) == (0.458, 12.3, 3.0)


# --- the config ----------------------------------------------------------------------------------

GOOD = {
    "gateway": {"name": "gw", "key": "k", "state_dir": "s"},
    "strategy": {"name": "FedAvg", "params": {"min_available_nodes": 3}, "dp": FIXED},
    "aggregation": {"weights": "uniform"},
    "rounds": {"min_devices": 3},
    "enrollment": {"policy": "open"},
}


def changed(section: str, key: str, value, under: str | None = None) -> dict:
    doc = {k: dict(v) for k, v in GOOD.items()}
    if under is None:
        doc[section][key] = value
    else:
        doc[section][under] = {**doc[section][under], key: value}
    return doc


def test_an_accounted_dp_config_parses_and_reports_nothing_spent_yet():
    strategy = parse_config(GOOD).make_strategy()
    assert type(strategy).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert privacy.report(strategy) == {
        "epsilon": 0.0, "delta": 1e-5, "rounds": 0, "noise_multiplier": 0.8,
        "method": "rdp, no-amplification, add-or-remove-one", "population": 3, "max_epsilon": None,
        "wrapper": "DifferentialPrivacyServerSideFixedClipping", "clipping_norm": 1.0}


@pytest.mark.parametrize("doc, match", [
    (changed("aggregation", "weights", "capped"), r'aggregation\.weights = .capped. cannot go.*"uniform"'),
    (changed("rounds", "min_devices", 2), r"rounds\.min_devices \(2\) must be at least.*num_sampled_clients \(3\)"),
    (changed("strategy", "name", "FedAdam"), r"strategy\.name: .*FedAvg's mean.*FedAdam"),
    (changed("strategy", "name", "Krum"), r"strategy\.name: .*accounting = false"),
    (changed("strategy", "params", {"fraction_train": 0.5}), r"strategy\.params\.fraction_train must stay 1\.0"),
    (changed("strategy", "params", {"min_available_nodes": 9}), r"strategy\.params\.min_available_nodes \(9\)"),
    (changed("strategy", "params", {"min_train_nodes": 4}), r"strategy\.params\.min_train_nodes \(4\)"),
    (changed("strategy", "population_size", 2, under="dp"), r"strategy\.dp\.population_size \(2\) is smaller"),
    (changed("strategy", "population_size", 2.5, under="dp"), r"strategy\.dp\.population_size must be a whole"),
    (changed("strategy", "target_delta", 0.0, under="dp"), r"strategy\.dp\.target_delta must be strictly between"),
    (changed("strategy", "target_delta", "1e-5", under="dp"), r"strategy\.dp\.target_delta must be a finite number"),
    (changed("strategy", "max_epsilon", -1.0, under="dp"), r"strategy\.dp\.max_epsilon must be positive"),
    (changed("strategy", "accounting", "yes", under="dp"), r"strategy\.dp\.accounting must be true or false"),
    (changed("strategy", "sampling", "poisson", under="dp"), r"strategy\.dp takes `wrapper`, a `params` table and"),
    (changed("strategy", "params", {**FIXED["params"], "accountant": 1}, under="dp"),
     r"strategy\.dp\.params\.accountant: the gateway gives"),
    (changed("strategy", "params", {**FIXED["params"], "num_sampled_clients": 3.0}, under="dp"),
     r"strategy\.dp\.params\.num_sampled_clients must be a whole number"),
    (changed("strategy", "dp", {**ADAPTIVE, "params": {"noise_multiplier": 1.0, "num_sampled_clients": 3}}),
     r"strategy\.dp\.params: .*refused them.*clipped_count_stddev"),  # Flower's own rule (sigma_b = m/20)
])
def test_a_dp_config_that_cannot_be_accounted_is_refused_naming_the_fields(doc, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(doc)


def test_without_accounting_or_without_noise_there_is_no_accountant_and_no_report():
    off = changed("strategy", "accounting", False, under="dp")
    off["aggregation"]["weights"], off["strategy"]["name"] = "capped", "FedAdam"  # both fine without accounting
    for doc in (off, changed("strategy", "params", {**FIXED["params"], "noise_multiplier": 0.0}, under="dp")):
        strategy = parse_config(doc).make_strategy()
        assert getattr(strategy, "accountant", None) is None and privacy.report(strategy) is None
        assert type(strategy).__module__.startswith("flwr.")  # Flower's wrapper, untouched


def test_a_gateway_config_built_in_code_is_checked_when_its_strategy_is_made(tmp_path):
    config = GatewayConfig(name="gw", key=tmp_path / "k", state_dir=tmp_path, strategy_dp=FIXED, min_devices=3,
                           strategy_params=NODES)  # weights: the default "capped"
    with pytest.raises(ConfigError, match=r"aggregation\.weights"):
        config.make_strategy()


# --- the wrappers and the accountant's record ------------------------------------------------------


@pytest.mark.parametrize("dp", [FIXED, ADAPTIVE], ids=["fixed", "adaptive"])
def test_the_accountant_is_saved_with_the_state_and_a_restarted_gateway_goes_on_spending(dp):
    steady = make_strategy("FedAvg", NODES, dp)
    for r in (1, 2):
        one_round(steady, r)
    saved = strategy_state.capture(steady)
    assert privacy.report(steady)["rounds"] == 2
    restarted = make_strategy("FedAvg", NODES, dp)
    assert "accountant" in strategy_state.restore(restarted, saved)
    assert privacy.report(restarted)["epsilon"] == privacy.report(steady)["epsilon"] > 0
    for strategy in (steady, restarted):
        one_round(strategy, 3)
    assert privacy.report(restarted)["rounds"] == 3
    if dp is FIXED:  # (adaptive: each round's multiplier depends on the noisy count)
        assert privacy.report(restarted)["epsilon"] == pytest.approx(epsilon([0.8] * 3), rel=1e-9)
    assert privacy.report(restarted)["epsilon"] > privacy.report(make_strategy("FedAvg", NODES, dp))["epsilon"]


def test_the_record_stays_small_however_long_the_gateway_runs():
    accountant = privacy.FleetAccountant(privacy.PrivacySettings(), 3)
    for _ in range(2000):
        accountant.compose(accountant.event(0.9, 3))
    accountant.compose(accountant.event(0.9, 2))
    state = accountant.state_dict()
    assert len(state["compositions"]) == 2 and accountant.num_releases == 2001
    assert accountant.get_epsilon(1e-5) == pytest.approx(epsilon([0.9] * 2001), rel=1e-9)
    again = privacy.FleetAccountant(privacy.PrivacySettings(), 3)
    again.load_state_dict(state)
    assert again.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    with pytest.raises(ValueError):
        again.load_state_dict({**state, "config": {**state["config"], "sampling_method": "poisson"}})


def test_the_population_is_the_enrolled_devices_or_the_configured_size():
    enrolled = [2]
    accountant = privacy.FleetAccountant(privacy.PrivacySettings(), 3, lambda: enrolled[0])
    assert accountant.config.population_size == 3  # never below the sample
    enrolled[0] = 40
    accountant.compose(accountant.event(1.0, 3))
    assert accountant.config.population_size == 40
    fixed = privacy.FleetAccountant(privacy.PrivacySettings(population_size=500), 3, lambda: 40)
    assert fixed.config.population_size == 500


@pytest.mark.parametrize("dp", [FIXED, ADAPTIVE], ids=["fixed", "adaptive"])
def test_exactly_m_devices_train_and_a_round_with_fewer_online_is_skipped_without_spending(dp):
    strategy = make_strategy("FedAvg", NODES, dp)
    sent = one_round(strategy, 1, online=range(1, 11))
    assert len({m.metadata.dst_node_id for m in sent}) == 3  # 3 of the 10 online
    assert one_round(strategy, 2, online=(1, 2)) == []  # fewer than m online: no task
    assert privacy.report(strategy)["rounds"] == 1
    one_round(strategy, 3)
    assert privacy.report(strategy)["rounds"] == 2


def test_a_round_beyond_max_epsilon_is_not_started():
    strategy = make_strategy("FedAvg", NODES, {**FIXED, "max_epsilon": (epsilon([0.8] * 2) + epsilon([0.8] * 3)) / 2})
    one_round(strategy, 1)
    one_round(strategy, 2)
    with pytest.raises(PrivacyBudgetExhausted):  # (Flower's check, with the gateway's accountant)
        one_round(strategy, 3)
    z = make_strategy("FedAvg", NODES, ADAPTIVE).accounted_noise_multiplier()
    adaptive = make_strategy("FedAvg", NODES, {**ADAPTIVE, "max_epsilon": epsilon([z]) / 2})
    with pytest.raises(PrivacyBudgetExhausted):  # (the gateway's own check, the same rule)
        one_round(adaptive, 1)
    assert privacy.report(adaptive)["rounds"] == 0


# --- through the real gateway: stopped after 2 rounds, started again for a third ---------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as running:
        yield running


@pytest.mark.parametrize("wrapper", ["DifferentialPrivacyServerSideFixedClipping",
                                     "DifferentialPrivacyClientSideAdaptiveClipping"])
def test_a_restarted_gateway_reports_the_privacy_of_every_release_of_its_lineage(broker, tmp_path, wrapper):
    gw_key = Identity.generate()
    gw_key.save(tmp_path / "gw.key")
    params = {"noise_multiplier": 0.8, "num_sampled_clients": 3}
    params.update({"clipping_norm": 1.0} if "Fixed" in wrapper else {"clipped_count_stddev": 1.0})
    config = GatewayConfig(
        name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
        broker_port=broker.port, manifest=write_manifest(tmp_path / "model", SHAPES), strategy_params=NODES,
        strategy_dp={"wrapper": wrapper, "params": params}, num_rounds=2, deadline_s=30, lr=0.5, min_devices=3,
        wait_devices_s=30, policy="open", weights=WeightRule("uniform"), gossip=False)
    fleet = AgentFleet(tmp_path, broker, gw_key, [0.0, 0.0, 0.0])
    try:
        results = []
        for rounds in (2, 3):
            result: dict = {}
            gateway = Gateway(dataclasses.replace(config, num_rounds=rounds), gw_key)
            thread = threading.Thread(target=lambda g=gateway, out=result: out.update(g.run(threading.Event())),
                                      daemon=True)
            thread.start()
            thread.join(120)
            assert result.get("state") == "done", result
            results.append(result)
    finally:
        fleet.close()
    first, second = results[0]["privacy"], results[1]["privacy"]
    assert (first["rounds"], second["rounds"]) == (2, 3)  # the second run went on from the saved record
    assert second["epsilon"] > first["epsilon"] > 0
    assert [r["participants"] for r in results[1]["rounds"] if r["round"]] == [3, 3, 3]
    if "Fixed" in wrapper:
        assert first["epsilon"] == pytest.approx(epsilon([0.8] * 2), rel=1e-9)
        assert second["epsilon"] == pytest.approx(epsilon([0.8] * 3), rel=1e-9)
