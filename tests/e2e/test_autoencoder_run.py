"""The autoencoder end to end: imu_autoencoder trained by real agents on watch windows without their labels, a
share of each device's test windows faulted, and the report's reconstruction loss and anomaly AUC per round
(hw/model_report.py) from each round's model in the gateway's blob store."""

from __future__ import annotations

import re

import numpy as np
import pytest
from emulation import emulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("autoencoder")
    done, report = emulate(tmp, """
[run]
name = "autoencoder"
rounds = 2
timeout_s = 150
[fleet]
devices = 3
subjects = [1, 2, 3]
[dataset]
anomalies = { share = 0.25, kinds = ["spike", "drift"] }
[training]
model = "imu_autoencoder"
epochs = 1
lr = 0.2
deadline_s = 40
""")
    return tmp, done, report


def test_the_devices_train_the_autoencoder_every_round_without_labels(run):
    _, done, report = run
    assert done.returncode == 0, done.stderr[-4000:]
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["participants"] for r in rounds[1:]] == [3, 3] and not report["rejections"]
    assert all(r["accuracy"] is None and r["loss"] > 0 for r in rounds)  # no accuracy: a reconstruction error
    assert re.search(r"round 2/2  loss \d\.\d{4}  participants 3", done.stderr)  # the progress line says so


def test_each_round_has_its_models_reconstruction_loss_and_anomaly_auc(run):
    _, done, report = run
    rounds = report["rounds"]
    assert all(isinstance(r["reconstruction_loss"], float) and 0.0 <= r["anomaly_auc"] <= 1.0 for r in rounds)
    assert rounds[2]["reconstruction_loss"] < rounds[0]["reconstruction_loss"]  # it learned the fleet's windows
    assert rounds[2]["anomaly_auc"] > 0.75  # spikes and drift stand out of what it learned
    # the devices' own loss covers their faulted windows too: above the loss on the normal ones
    assert rounds[2]["loss"] > rounds[2]["reconstruction_loss"]
    assert f"anomaly AUC {rounds[2]['anomaly_auc']:.3f}" in done.stderr


def test_the_anomalies_section_matches_the_faults_in_the_devices_files(run):
    tmp, _, report = run
    section = report["anomalies"]
    kinds = np.concatenate([np.load(path)["anomaly_test"] for path in sorted((tmp / "run" / "data").glob("*.npz"))])
    assert section["windows"] == len(kinds) and sum(section["faulted"].values()) == int(np.sum(kinds > 0))
    assert set(section["faulted"]) == {"spike", "drift"} and "missing_models" not in section
    last = section["gateways"]["gw-1"]
    assert last["round"] == 2 and last["anomaly_auc"] == report["rounds"][2]["anomaly_auc"]
    assert set(last["by_kind"]) == {"spike", "drift"}
    page = (tmp / "report.html").read_text()
    assert "Reconstruction and anomalies" in page and (tmp / "report_plots" / "model.png").exists()
