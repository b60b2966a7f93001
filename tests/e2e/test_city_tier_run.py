"""The city tier end to end through the real emulator: gateways that merge their models into one city model
every few rounds, the report's `city` section, and a gateway that tampers with its aggregates.

Every part is real (Mosquitto, gateway and agent processes, TFLite training, ledger gossip, the blob exchange,
the peers' recomputes); the runs are tiny (four rounds, a city epoch every two) so each stays under a minute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from emulation import emulate

from firmware_models.runtime import TrainableModel
from gateway.blobs import BlobStore
from hw.datasets import load_device_npz
from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10
from protocol.schemas import decode_model

SKEW = [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]]


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("city-tier")
    return tmp_path, *emulate(tmp_path, f"""
[run]
name = "tiny-city-tier"
rounds = 4
timeout_s = 90
[fleet]
gateways = 2
devices_per_gateway = 2
subjects = [1, 2, 3, 4]
[dataset]
classes_by_neighbourhood = {json.dumps(SKEW)}
[training]
epochs = 1
lr = 0.2
deadline_s = 20
[city]
every = 2
deadline_s = 8.0
""", timeout=150)


def test_the_gateways_end_every_epoch_on_one_city_model(city):
    tmp_path, done, report = city
    assert done.returncode == 0, done.stderr[-4000:]
    assert "gw-1 city epoch 1 (round 2)" in done.stderr and "gw-2 city epoch 2 (round 4)" in done.stderr
    section = report["city"]
    assert section["tier"] is True and (section["every"], section["rule"]) == (2, "weighted")
    assert [(e["epoch"], e["round"]) for e in section["epochs"]] == [(1, 2), (2, 4)]
    for epoch in section["epochs"]:
        assert epoch["agreed"] is True and set(epoch["digests"]) == {"gw-1", "gw-2"}, epoch
        assert sorted(i["gateway"] for i in epoch["inputs"]) == ["gw-1", "gw-2"] and epoch["left_out"] == []
        assert 0 <= epoch["accuracy"] <= 1
    assert set(section["final_digests"]) == {"gw-1", "gw-2"}
    assert len(set(section["final_digests"].values())) == 1  # one city model
    final = section["final_digests"]["gw-1"]
    assert final == section["epochs"][-1]["digests"]["gw-1"]
    for name, gateway in report["gateways"].items():  # ... which each gateway went on from: its last release
        assert gateway["model"]["digest"] == final, name
        assert gateway["state"] == "done"
    assert section["audits"]["mismatch"] == 0 and section["audits"]["checked"] > 0 and section["flagged"] == {}
    config = tomllib.loads((tmp_path / "run" / "gateways" / "gw-1" / "gateway.toml").read_text())
    assert config["city"] == {"every": 2, "rule": "weighted", "deadline_s": 8.0, "audit_share": 1.0, "momentum": 0.0}
    assert "<h2>City</h2>" in (tmp_path / "report.html").read_text()


def test_the_headline_is_the_city_models_accuracy_on_every_device(city):
    tmp_path, _, report = city
    section = report["city"]
    assert report["final_accuracy"] == section["final_accuracy"] is not None
    # Recomputed here from the gateway's blob store and every device's replay file: the same figure.
    store = BlobStore(tmp_path / "run" / "gateways" / "gw-2" / "blobs", read_only=True)
    weights = decode_model(store.get(bytes.fromhex(section["final_digests"]["gw-2"])))
    devices = [load_device_npz(path) for path in sorted((tmp_path / "run" / "data").glob("*.npz"))]
    assert len(devices) == section["devices"] == 4
    for i, device in enumerate(devices):  # each device kept to its neighbourhood's classes (i mod 2)
        assert set(device.y_train.tolist()) | set(device.y_test.tolist()) <= set(SKEW[i % 2])
    model = TrainableModel.from_package()
    model.set_weights(weights)
    x, y = np.concatenate([d.x_test for d in devices]), np.concatenate([d.y_test for d in devices])
    accuracy = model.evaluate(x, y)[1]
    assert section["final_accuracy"] == pytest.approx(accuracy, abs=1e-3)
    assert sum(len(d.y_test) for d in devices) == section["windows"]


def test_a_gateway_that_tampers_with_its_aggregates_is_flagged_and_left_out(tmp_path):
    done, report = emulate(tmp_path, """
[run]
name = "tiny-city-tampered"
rounds = 4
timeout_s = 90
[fleet]
gateways = 3
devices_per_gateway = 2
subjects = [1, 2, 3, 4, 5, 6]
[training]
epochs = 1
lr = 0.2
deadline_s = 20
[city]
every = 2
deadline_s = 8.0
[[adversary]]
attack = "tampered_aggregate"
target = "gw-3"
""", timeout=150)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "tamper.aggregate round=1" in (tmp_path / "run" / "logs" / "gw-3.log").read_text()  # the launcher ran it
    (attack,) = report["attacks"]
    assert attack["target"] == "gw-3" and attack["flagged_by"] == ["gw-1", "gw-2"], attack
    assert attack["as_expected"] is True, attack
    section = report["city"]
    assert section["flagged"]["gw-3"]["accusers"] == ["gw-1", "gw-2"]
    assert section["audits"]["by_gateway"]["gw-1"]["mismatch"] >= 1
    last = section["epochs"][-1]
    assert {"gateway": "gw-3", "reason": "flagged"} in last["left_out"], last
    assert "gw-3" not in {i["gateway"] for i in last["inputs"]}
    assert len(set(section["final_digests"].values())) == 1  # the city still agrees, without gw-3's models
    assert report["final_accuracy"] == section["final_accuracy"] is not None
