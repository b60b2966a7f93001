"""Buffered asynchronous rounds (gateway/buffered.py): the weights, the config, a real run, kill -9.

The runs are a real gateway process, a real broker and real agents (synthetic models, gateway_helpers.py):
one device is several times slower than the others, as in the fleets this mode is for.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from gateway_helpers import AcceptedReceipts, AgentFleet, gateway_config, start_gateway

from gateway.buffered import BufferSettings, check_strategy, staleness_weights
from gateway.config import ConfigError, parse_config
from gateway.strategies import make_strategy
from hw.broker import Broker
from ledger.store import Ledger
from protocol.keys import Identity

GOOD = {"gateway": {"name": "gw", "key": "k", "state_dir": "s"}, "strategy": {"name": "FedAvg"},
        "enrollment": {"policy": "open"}}
STRATEGY = 'name = "FedAvg"\nparams = { min_available_nodes = 1, min_train_nodes = 1, min_evaluate_nodes = 1 }'


def rounds(**keys) -> dict:
    return {**GOOD, "rounds": keys}


# --- the weights -------------------------------------------------------------------------------------------------

def test_a_stale_update_weighs_one_over_sqrt_one_plus_its_staleness():
    settings = BufferSettings(buffer=3, max_staleness=2, staleness_exponent=0.5)
    assert staleness_weights(settings, [10, 10, 20], [0, 3, 1]) == pytest.approx([10.0, 5.0, 20 / 2 ** 0.5])
    assert not settings.too_stale(2) and settings.too_stale(3)
    assert staleness_weights(BufferSettings(staleness_exponent=0.0), [7, 7], [0, 4]) == [7.0, 7.0]


def test_strategies_buffered_mode_cannot_serve_are_named_with_the_reason():
    assert check_strategy(make_strategy("FedAvg", {}), None) is None
    assert check_strategy(make_strategy("FedMedian", {}), None) is None
    assert "momentum" in check_strategy(make_strategy("FedAvgM", {}), None)
    assert "optimizer" in check_strategy(make_strategy("FedAdam", {}), None)
    assert "selects" in check_strategy(make_strategy("MultiKrum", {}), None)
    assert "DP" in check_strategy(make_strategy("FedAvg", {}), {"wrapper": "x"})


# --- the config --------------------------------------------------------------------------------------------------

def test_buffered_settings_parse_and_sync_is_the_default():
    assert parse_config(GOOD).buffered is None
    config = parse_config(rounds(mode="buffered", buffer=4, max_staleness=2, staleness_exponent=1.0))
    assert config.buffered == BufferSettings(4, 2, 1.0)


@pytest.mark.parametrize("keys, message", [
    ({"mode": "fedbuff"}, r"rounds\.mode must be one of \('sync', 'buffered'\)"),
    ({"mode": "buffered", "buffer": 0}, r"rounds\.buffer must be 1 to"),
    ({"mode": "buffered", "max_staleness": -1}, r"rounds\.max_staleness must be 0 to"),
    ({"mode": "buffered", "staleness_exponent": -0.5}, r"rounds\.staleness_exponent must be 0 to"),
    ({"buffer": 3}, r'rounds\.buffer is a setting of rounds\.mode = "buffered"'),
])
def test_bad_buffered_settings_are_refused_naming_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(rounds(**keys))


def test_a_strategy_buffered_mode_makes_no_sense_with_is_refused_at_config_time():
    doc = {**rounds(mode="buffered"), "strategy": {"name": "FedAdam"}}
    with pytest.raises(ConfigError, match=r'rounds\.mode = "buffered" does not work with strategy .FedAdam.'):
        parse_config(doc)


# --- real runs ---------------------------------------------------------------------------------------------------

def ledger_vertices(state: Path) -> tuple[list, list]:
    with Ledger.open(state / "ledger.db") as ledger:
        vertices = list(ledger.vertices())
    return [v for v in vertices if v.kind == "updates"], [v for v in vertices if v.kind == "aggregate"]


def run_to_the_end(tmp_path: Path, broker: Broker, gateway: Identity, rounds_: str, delays: list[float],
                   strike=None) -> tuple[AgentFleet, list]:
    conf = gateway_config(tmp_path, broker, gateway, STRATEGY, rounds_)
    processes = [start_gateway(conf)]
    fleet = AgentFleet(tmp_path, broker, gateway, delays=delays)
    try:
        if strike is not None:
            strike(processes[0])
            processes.append(start_gateway(conf))
        assert processes[-1].wait(120) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    finally:
        fleet.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
    return fleet, processes


def test_a_buffered_run_aggregates_every_k_updates_with_one_ledger_aggregate_per_step(tmp_path):
    rounds_ = ('mode = "buffered"\nbuffer = 2\nmax_staleness = 3\nnum_rounds = 5\nevaluate_every = 100\n'
               'deadline_s = 30\nmin_devices = 3\nwait_devices_s = 60\nepochs = 1')
    with Broker(tmp_path / "broker") as broker:
        gateway = Identity.generate()
        run_to_the_end(tmp_path, broker, gateway, rounds_, delays=[0, 0, 1.5])
    result = json.loads((tmp_path / "state" / "result.json").read_text())
    assert result["state"] == "done"
    updates, aggregates = ledger_vertices(tmp_path / "state")
    assert sorted(a.body["round"] for a in aggregates) == [1, 2, 3, 4, 5], "one aggregate per step"
    recorded = {bytes(r[1]) for u in updates for r in u.body["records"]}
    for aggregate in aggregates:
        inputs = aggregate.body["inputs"]
        assert len(inputs) >= 2 and {bytes(d) for d, _ in inputs} <= recorded
        assert sum(w for _, w in inputs) == pytest.approx(1.0)
    log = (tmp_path / "gateway.log").read_text()
    assert "buffer.step step=5" in log
    assert all(len(u.body["records"]) == 1 for u in updates), "each task is its own exchange"
    # a step's participants (status, result.json) are the updates it aggregated, not its last exchange's one
    participants = {r["round"]: r["participants"] for r in result["rounds"] if r["round"] > 0}
    assert participants == {a.body["round"]: len(a.body["inputs"]) for a in aggregates}, result["rounds"]
    training = result["training"]  # (the status has the same section, live)
    assert (training["mode"], training["codec"]) == ("buffered", "i8")
    assert {k: training["buffered"][k] for k in ("buffer", "max_staleness", "stale")} == {
        "buffer": 2, "max_staleness": 3, "stale": log.count("buffer.stale ")}


def test_kill_9_keeps_the_updates_accepted_but_not_yet_aggregated(tmp_path):
    rounds_ = ('mode = "buffered"\nbuffer = 3\nmax_staleness = 3\nnum_rounds = 2\nevaluate_every = 100\n'
               'deadline_s = 30\nmin_devices = 3\nwait_devices_s = 60\nepochs = 1')
    struck: list[bytes] = []
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        gateway = Identity.generate()
        receipts = AcceptedReceipts(broker, gateway)

        def kill_at_the_first_receipt(process):
            struck.append(receipts.first())  # the device heard "accepted": the gateway alone has the update now
            process.kill()  # SIGKILL, with fewer than `buffer` updates buffered
            process.wait(10)
            time.sleep(0.5)

        try:
            run_to_the_end(tmp_path, broker, gateway, rounds_, delays=[0.5, 4.0, 4.0], strike=kill_at_the_first_receipt)
        finally:
            receipts.close()
    log = (tmp_path / "gateway.log").read_text()
    assert "buffer.restored" in log
    updates, aggregates = ledger_vertices(tmp_path / "state")
    recorded = [bytes(r[1]) for u in updates for r in u.body["records"]]
    assert recorded.count(struck[0]) == 1, "recorded once, across the restart"
    aggregated = [bytes(d) for a in aggregates for d, _ in a.body["inputs"]]
    assert struck[0] in aggregated, "the update accepted before kill -9 is in a step's aggregate"
    assert sorted(a.body["round"] for a in aggregates) == [1, 2]
