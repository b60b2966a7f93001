"""The privacy cost of a DP run (gateway/privacy.py): the formula, the config rules, a record that survives restarts."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from gateway_helpers import ROOT, SHAPES, AgentFleet, gateway_config

from gateway import privacy, strategy_state
from gateway.config import ConfigError, GatewayConfig, load_config, parse_config
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
        "wrapper": "DifferentialPrivacyServerSideFixedClipping", "clipping_norm": 1.0, "budget_spent": False}


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


def test_a_spent_budget_is_known_before_the_round_the_wrapper_would_refuse_and_reported():
    strategy = make_strategy("FedAvg", NODES, {**FIXED, "max_epsilon": (epsilon([0.8] * 2) + epsilon([0.8] * 3)) / 2})
    for r in (1, 2):
        assert privacy.budget_spent(strategy) is None
        one_round(strategy, r)
    assert privacy.report(strategy)["budget_spent"] is False
    reason = privacy.budget_spent(strategy)  # what the engine asks before it waits for round 3
    assert reason is not None and "max_epsilon" in reason and "2 releases" in reason
    assert privacy.report(strategy)["budget_spent"] is True
    with pytest.raises(PrivacyBudgetExhausted):  # the wrapper's own check agrees
        one_round(strategy, 3)
    z = make_strategy("FedAvg", NODES, ADAPTIVE).accounted_noise_multiplier()
    assert privacy.budget_spent(make_strategy("FedAvg", NODES, {**ADAPTIVE, "max_epsilon": epsilon([z]) / 2}))
    assert privacy.budget_spent(make_strategy("FedAvg", NODES, ADAPTIVE)) is None  # no max_epsilon: no limit
    assert privacy.budget_spent(make_strategy("FedAvg", NODES)) is None  # nothing accounted


def test_a_changed_strategy_gets_back_the_privacy_record_and_none_of_the_old_strategys_state():
    defense = {"median_multiple": 1.5, "centered_clipping": True}  # UpdateBound's momentum: state of its own
    before = make_strategy("FedAvg", NODES, FIXED, defense=defense)
    for r in (1, 2):
        one_round(before, r)
    saved = strategy_state.capture(before)
    assert before.momentum is not None
    after = make_strategy("FedProx", {**NODES, "proximal_mu": 0.1}, FIXED, defense=defense)
    assert strategy_state.restore(after, saved, privacy_only=True) == ["strategy.accountant"]
    assert after.momentum is None  # the strategy's own state stays behind
    assert privacy.report(after)["rounds"] == 2
    assert privacy.report(after)["epsilon"] == pytest.approx(epsilon([0.8] * 2), rel=1e-9)
    # A [defense] added since the save moves the DP wrapper one level down: its record is found all the same.
    plain = make_strategy("FedAvg", NODES, FIXED)
    for r in (1, 2):
        one_round(plain, r)
    moved = make_strategy("FedAvg", NODES, FIXED, defense=defense)
    assert strategy_state.restore(moved, strategy_state.capture(plain)) == ["strategy.accountant"]
    assert privacy.report(moved)["rounds"] == 2


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


def run_gateway(config: GatewayConfig, identity: Identity, timeout: float = 60) -> tuple[dict, Gateway]:
    """`Gateway.run` in a thread, stopped after `timeout` at the latest (a test never hangs)."""
    result: dict = {}
    gateway, stop = Gateway(config, identity), threading.Event()
    thread = threading.Thread(target=lambda: result.update(gateway.run(stop)), daemon=True)
    thread.start()
    thread.join(timeout)
    stop.set()
    thread.join(30)
    return result, gateway


def logged(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(what + " ")]


def test_a_gateway_whose_strategy_changed_between_runs_goes_on_spending_from_the_saved_record(broker, tmp_path,
                                                                                               caplog):
    gw_key = Identity.generate()
    gw_key.save(tmp_path / "gw.key")
    config = GatewayConfig(
        name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
        broker_port=broker.port, manifest=write_manifest(tmp_path / "model", SHAPES), strategy_params=NODES,
        strategy_dp=FIXED, num_rounds=2, deadline_s=30, lr=0.5, min_devices=3, wait_devices_s=30, policy="open",
        weights=WeightRule("uniform"), gossip=False)
    fleet = AgentFleet(tmp_path, broker, gw_key, [0.0, 0.0, 0.0])
    try:
        first, _ = run_gateway(config, gw_key)
        assert first.get("state") == "done", first
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="starling.gateway"):
            second, _ = run_gateway(dataclasses.replace(config, strategy="FedProx", num_rounds=3,
                                                        strategy_params={**NODES, "proximal_mu": 0.1}), gw_key)
    finally:
        fleet.close()
    assert second.get("state") == "done", second
    assert (first["privacy"]["rounds"], second["privacy"]["rounds"]) == (2, 3)  # not 1: the record came along
    assert second["privacy"]["epsilon"] == pytest.approx(epsilon([0.8] * 3), rel=1e-9)
    assert logged(caplog, "strategy.state_not_restored") == [
        "strategy.state_not_restored reason=\"strategy changed\" was=FedAvg now=FedProx"]
    assert logged(caplog, "privacy.state_restored") == [
        "privacy.state_restored reason=\"strategy changed\" attributes=accountant"]
    assert not logged(caplog, "strategy.state_restored")


def test_a_spent_privacy_budget_ends_the_gateway_done_and_a_restart_ends_it_again_with_exit_0(broker, tmp_path,
                                                                                              caplog):
    """A service (no round count) with max_epsilon between 2 and 3 releases: 2 rounds, then a clean end."""
    gw_key = Identity.generate()
    limit = float(epsilon([0.8] * 2) + epsilon([0.8] * 3)) / 2
    conf = gateway_config(
        tmp_path, broker, gw_key,
        'name = "FedAvg"\nparams = { min_available_nodes = 3, min_train_nodes = 3 }\n'
        f'dp = {{ wrapper = "DifferentialPrivacyServerSideFixedClipping", max_epsilon = {limit!r}, '
        "params = { noise_multiplier = 0.8, clipping_norm = 1.0, num_sampled_clients = 3 } }",
        "deadline_s = 30\nmin_devices = 3\nwait_devices_s = 30\nlr = 0.5\n"
        '[aggregation]\nweights = "uniform"\n[ledger]\ngossip = false')
    config = load_config(conf)
    assert config.num_rounds is None and config.strategy_dp["max_epsilon"] == limit
    fleet = AgentFleet(tmp_path, broker, gw_key, [0.0, 0.0, 0.0])
    try:
        with caplog.at_level(logging.INFO, logger="starling.gateway"):
            first, gateway = run_gateway(config, gw_key)
        # ... and started again (as systemd would, or an operator): it publishes its model and ends at once.
        again = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)], cwd=ROOT,
                               capture_output=True, text=True, timeout=60, check=False)
    finally:
        fleet.close()
    assert first.get("state") == "done" and first["failure"] is None, first
    assert [r["round"] for r in first["rounds"]] == [0, 1, 2]
    assert first["privacy"]["rounds"] == 2 and first["privacy"]["budget_spent"] is True
    status = gateway.board.status()  # (what the retained status topic says)
    assert (status["state"], status["reason"]) == ("done", "privacy_budget_spent")
    assert [r["round"] for r in status["history"]] == [0, 1, 2]  # round 3 never began
    [line] = logged(caplog, "privacy.budget_spent")
    assert f"round=3 model={first['model']['digest'][:16]} version={first['model']['version']}" in line
    assert not logged(caplog, "gateway.failed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("privacy.budget_spent") == 1 and "gateway.stop state=done" in again.stderr
    assert "model.released" in again.stderr  # the last model published afresh (a new expiry), no new one
    second = json.loads((tmp_path / "state" / "result.json").read_text())
    assert (second["state"], second["privacy"]["rounds"], second["privacy"]["budget_spent"]) == ("done", 2, True)
    assert second["model"] == first["model"] and second["rounds"] == first["rounds"]


class SpentAfterOneRound(FedAvg):
    """A user's strategy with a privacy accountant of its own, which refuses round 2 (Flower's exception)."""

    def configure_train(self, server_round, arrays, config, grid):
        if server_round >= 2:
            raise PrivacyBudgetExhausted("the strategy's own accountant refuses the release")
        return super().configure_train(server_round, arrays, config, grid)


def test_a_strategy_that_raises_privacy_budget_exhausted_ends_the_gateway_done_too(broker, tmp_path, caplog):
    gw_key = Identity.generate()
    gw_key.save(tmp_path / "gw.key")
    config = GatewayConfig(
        name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
        broker_port=broker.port, manifest=write_manifest(tmp_path / "model", SHAPES),
        strategy=f"{__name__}:SpentAfterOneRound", strategy_params={"min_available_nodes": 2}, deadline_s=30,
        min_devices=2, wait_devices_s=30, policy="open", gossip=False)  # no round count: a service
    fleet = AgentFleet(tmp_path, broker, gw_key, [0.0, 0.0])
    try:
        with caplog.at_level(logging.INFO, logger="starling.gateway"):
            result, gateway = run_gateway(config, gw_key)
    finally:
        fleet.close()
    assert (result.get("state"), result.get("failure"), result.get("privacy")) == ("done", None, None), result
    status = gateway.board.status()
    assert (status["state"], status["reason"]) == ("done", "privacy_budget_spent")
    assert [r["round"] for r in status["history"]] == [0, 1]  # round 2 began, but nothing of it ran
    [line] = logged(caplog, "privacy.budget_spent")
    assert "round=2 " in line and "the strategy's own accountant refuses the release" in line
