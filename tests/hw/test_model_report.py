"""A reconstruction model's figures in the report: every round's model, from the gateway's blob store, scored on
the devices' faulted test windows (hw/model_report.py), and drawn on report.html."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from firmware_models.runtime import TrainableModel
from gateway.blobs import BlobStore
from hw.anomalies import KIND_CODES, auc
from hw.model_report import add_model_figures
from hw.partition import prepare_devices
from hw.scenario import parse_scenario
from protocol.schemas import encode_model


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two devices with faulted test windows, a gateway whose lineage released a model in rounds 0 and 1 (none in
    round 2), and a report the emulator built: scored by add_model_figures."""
    tmp = tmp_path_factory.mktemp("model_report")
    scenario = parse_scenario({"fleet": {"devices": 2}, "training": {"model": "imu_autoencoder"},
                               "dataset": {"anomalies": {"share": 0.3, "kinds": ["spike", "drift"]}}})
    devices = prepare_devices(scenario, tmp / "run")
    model = TrainableModel.from_package("imu_autoencoder")
    first = model.get_weights()
    rng = np.random.default_rng(0)
    second = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in first.items()}
    store = BlobStore(tmp / "gw" / "blobs")
    digests = [store.put(encode_model(w), tag=i + 1).hex() for i, w in enumerate((first, second))]
    rounds = [{"round": r, "accuracy": None, "loss": 0.5} for r in range(3)]
    report = {"rounds": rounds, "gateways": {"gw-1": {"rounds": rounds, "lineage": {"releases": [
        {"model": digests[1], "round": 1}, {"model": digests[0], "round": 0}]}}}}
    gateway = SimpleNamespace(name="gw-1", home=tmp / "gw", devices=[name for name, _ in devices])
    said: list[str] = []
    add_model_figures(report, scenario, [gateway], devices, said.append)
    x = np.concatenate([np.load(path)["x_test"] for _, path in devices])
    kinds = np.concatenate([np.load(path)["anomaly_test"] for _, path in devices])
    return SimpleNamespace(report=report, weights=(first, second), x=x, kinds=kinds, model=model, said=said,
                           tmp=tmp)


def test_each_round_gets_its_models_loss_on_normal_windows_and_auc_on_the_faulted_ones(scored):
    rounds = scored.report["rounds"]
    for r, weights in ((0, scored.weights[0]), (1, scored.weights[1])):
        scored.model.set_weights(weights)
        errors = scored.model.reconstruction_error(scored.x)
        assert rounds[r]["reconstruction_loss"] == pytest.approx(errors[scored.kinds == 0].mean(), abs=1e-4)
        assert rounds[r]["anomaly_auc"] == pytest.approx(auc(errors, scored.kinds > 0), abs=1e-4)
    # round 2 released nothing: its evaluation was of round 1's model, and so are its figures
    assert {k: rounds[2][k] for k in ("reconstruction_loss", "anomaly_auc")} == \
        {k: rounds[1][k] for k in ("reconstruction_loss", "anomaly_auc")}
    assert rounds[0]["anomaly_auc"] != rounds[1]["anomaly_auc"]
    assert scored.report["gateways"]["gw-1"]["rounds"] is rounds


def test_the_anomalies_section_counts_the_faults_and_scores_the_last_round_by_kind(scored):
    section = scored.report["anomalies"]
    faulted = {kind: int(np.sum(scored.kinds == KIND_CODES[kind])) for kind in ("spike", "drift")}
    assert section["faulted"] == faulted and section["windows"] == len(scored.kinds)
    assert (section["share"], section["kinds"], section["magnitude"]) == (0.3, ["spike", "drift"], 1.0)
    last = section["gateways"]["gw-1"]
    assert last["round"] == 2 and last["anomaly_auc"] == scored.report["rounds"][2]["anomaly_auc"]
    scored.model.set_weights(scored.weights[1])
    errors = scored.model.reconstruction_error(scored.x)
    for kind in ("spike", "drift"):
        pick = (scored.kinds == 0) | (scored.kinds == KIND_CODES[kind])
        assert last["by_kind"][kind] == pytest.approx(auc(errors[pick], scored.kinds[pick] > 0), abs=1e-4)
    assert "missing_models" not in section and "error" not in section
    assert any("of 2 devices" in line for line in scored.said)


def test_a_round_model_no_blob_store_holds_is_named_and_left_unscored(scored, tmp_path):
    scenario = parse_scenario({"fleet": {"devices": 2}, "training": {"model": "imu_autoencoder"},
                               "dataset": {"anomalies": {}}})
    devices = prepare_devices(scenario, tmp_path / "run")
    rounds = [{"round": 0}]
    report = {"rounds": rounds, "gateways": {"gw-1": {"rounds": rounds, "lineage": {"releases": [
        {"model": "ab" * 32, "round": 0}]}}}}
    gateway = SimpleNamespace(name="gw-1", home=scored.tmp / "gw", devices=[name for name, _ in devices])
    add_model_figures(report, scenario, [gateway], devices)
    assert report["anomalies"]["missing_models"] == ["ab" * 32] and "anomaly_auc" not in rounds[0]


def test_a_classifier_run_gets_no_reconstruction_figures(tmp_path):
    scenario = parse_scenario({"fleet": {"devices": 2}})
    report = {"rounds": [{"round": 0, "accuracy": 0.2}], "gateways": {}}
    add_model_figures(report, scenario, [], [])
    assert report == {"rounds": [{"round": 0, "accuracy": 0.2}], "gateways": {}}


def test_the_page_draws_the_loss_and_auc_and_tables_the_auc_by_kind(scored, tmp_path):
    pytest.importorskip("matplotlib")
    from hw.report import write_html_report

    written = write_html_report(scored.report, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Reconstruction and anomalies</h2>" in page and "AUC drift" in page
    assert any(p.name == "model.png" for p in written)
    auc_cell = f"{scored.report['anomalies']['gateways']['gw-1']['anomaly_auc']:.3f}"
    assert auc_cell in page
    plain = tmp_path / "plain.html"
    write_html_report({"rounds": [{"round": 0, "accuracy": 0.5}]}, plain)
    assert "Reconstruction and anomalies" not in plain.read_text()
