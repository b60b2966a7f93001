"""Nothing accepted is lost: kill -9 of the gateway mid-round, a broker restart mid-round.

Real Mosquitto (with persistence, as shipped), a real gateway process, real
agents (synthetic models: two answer at once, two take a few seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gateway_helpers import AcceptedReceipts, AgentFleet, gateway_config, start_gateway

from hw.broker import Broker
from ledger.store import Ledger
from protocol.keys import Identity

STRATEGY = 'name = "FedAvg"\nparams = { min_available_nodes = 4, min_train_nodes = 4, min_evaluate_nodes = 4 }'
ROUNDS = "num_rounds = 2\ndeadline_s = 60\nmin_devices = 4\nwait_devices_s = 60\nepochs = 1"


def round_one_updates(state: Path) -> tuple[list[bytes], list[list[bytes]]]:
    with Ledger.open(state / "ledger.db") as ledger:
        vertices = list(ledger.vertices())
    devices = [bytes(r[0]) for v in vertices if v.kind == "updates" and v.body["round"] == 1 for r in v.body["records"]]
    inputs = [list(v.body["inputs"]) for v in vertices if v.kind == "aggregate" and v.body["round"] == 1]
    return devices, inputs


def test_kill_9_mid_round_then_restart_keeps_every_accepted_reply_once(tmp_path):
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        gateway = Identity.generate()
        conf = gateway_config(tmp_path, broker, gateway, STRATEGY, ROUNDS)
        receipts = AcceptedReceipts(broker, gateway, "train-1-")
        gateways = [start_gateway(conf)]
        fleet = AgentFleet(tmp_path, broker, gateway, delays=[0, 0, 6.0, 6.0])
        try:
            fast = receipts.wait(2)  # two devices heard "accepted" and forgot their replies
            gateways[0].kill()  # SIGKILL: no clean-up of any kind
            gateways[0].wait(10)
            gateways.append(start_gateway(conf))
            assert gateways[1].wait(120) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
        finally:
            fleet.close()
            receipts.close()
            for process in gateways:
                if process.poll() is None:
                    process.kill()
    devices, inputs = round_one_updates(tmp_path / "state")
    assert sorted(devices) == sorted(d.public_key for d in fleet.devices), "each round-1 update recorded exactly once"
    assert len(inputs) == 1 and len(inputs[0]) == 4, inputs
    assert {d.id for d in fleet.devices} >= fast
    log = (tmp_path / "gateway.log").read_text()
    assert "gateway.resume round=1 accepted=2" in log
    result = json.loads((tmp_path / "state" / "result.json").read_text())
    rounds = [r["round"] for r in result["rounds"]]
    assert rounds == [0, 1, 2], result["rounds"]
    assert result["rounds"][1]["participants"] == 4


def test_a_broker_restart_mid_round_loses_nothing(tmp_path):
    with Broker(tmp_path / "broker", kind="mosquitto", persistent=True) as broker:
        gateway = Identity.generate()
        conf = gateway_config(tmp_path, broker, gateway, STRATEGY, ROUNDS)
        receipts = AcceptedReceipts(broker, gateway, "train-1-")
        process = start_gateway(conf)
        fleet = AgentFleet(tmp_path, broker, gateway, delays=[0, 0, 4.0, 4.0])
        try:
            receipts.wait(2)
            broker.stop()  # the slow devices finish while the broker is away
            time.sleep(5)
            broker.start()  # same port, same persistence file
            assert process.wait(120) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
        finally:
            fleet.close()
            receipts.close()
            if process.poll() is None:
                process.kill()
    devices, inputs = round_one_updates(tmp_path / "state")
    assert sorted(devices) == sorted(d.public_key for d in fleet.devices)
    assert len(inputs) == 1 and len(inputs[0]) == 4
