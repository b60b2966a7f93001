"""Any model in a scenario: families of the zoo, a built model's folder, the data it must fit, injected anomalies
and the AUC that scores them (hw/model_tables.py, hw/anomalies.py, hw/partition.py, hw/model_report.py)."""

from __future__ import annotations

import json
import shutil
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from agent.samples import load_replay
from hw.anomalies import DRIFT_SD, KIND_CODES, SPIKE_SD, SPIKES, Anomalies, auc, channel_scale, inject
from hw.model_tables import model_spec
from hw.partition import partition, prepare_devices
from hw.scenario import ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "firmware_models"


def _model_folder(tmp_path: Path, family: str, **manifest_changes) -> Path:
    """A copy of a packaged model as a folder `starling-models build --out DIR` writes; manifest fields changed."""
    folder = tmp_path / f"{family}-built"
    shutil.copytree(PACKAGE / family, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    model_spec.cache_clear()
    return folder


def _data_folder(tmp_path: Path, shape: tuple[int, ...], labels: int | None, files: int = 3, n: int = 12) -> Path:
    folder = tmp_path / f"data-{'x'.join(map(str, shape))}-{labels}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        arrays = {"X": rng.normal(size=(n, *shape)).astype(np.float32)}
        if labels is not None:
            arrays["y"] = np.arange(n) % labels
        np.savez(folder / f"dev{i}.npz", **arrays)
    return folder


# --- the AUC ------------------------------------------------------------------------------------------------------

def _pairwise_auc(scores, positive) -> float:
    """The definition: P(a positive outscores a negative), a tie counting one half."""
    pos, neg = scores[positive], scores[~positive]
    return float(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in product(pos, neg)]))


def test_the_rank_auc_is_the_pairwise_probability_ties_counting_half():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        positive = rng.random(40) < 0.3
        if positive.any() and not positive.all():
            assert auc(scores, positive) == pytest.approx(_pairwise_auc(scores, positive))
    assert auc(np.array([1.0, 2.0, 3.0, 4.0]), np.array([False, False, True, True])) == 1.0
    assert auc(np.array([4.0, 3.0, 2.0, 1.0]), np.array([False, False, True, True])) == 0.0
    assert auc(np.ones(6), np.array([True, False] * 3)) == 0.5
    assert auc(np.arange(5.0), np.zeros(5, bool)) is None and auc(np.arange(5.0), np.ones(5, bool)) is None


# --- the faults -----------------------------------------------------------------------------------------------------

def test_faults_go_into_the_share_of_windows_asked_seeded_each_of_its_kind():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 128, 6)).astype(np.float32)
    scale = channel_scale(x)
    settings = Anomalies(share=0.3)
    faulted, kinds = inject(x, scale, settings, np.random.default_rng(7))
    again, kinds_again = inject(x, scale, settings, np.random.default_rng(7))
    assert np.array_equal(faulted, again) and np.array_equal(kinds, kinds_again)  # seeded
    assert np.array_equal(kinds != 0, np.any(faulted != x, axis=(1, 2)))  # exactly the marked windows changed
    assert int(np.sum(kinds != 0)) == 12 and sorted(np.bincount(kinds)[1:].tolist()) == [4, 4, 4]  # dealt in turn
    for i in np.flatnonzero(kinds == KIND_CODES["stuck"]):  # every channel holds one reading to the window's end
        start = int(np.argmax(np.all(faulted[i] == faulted[i][-1], axis=1)))
        assert start < 64 and np.all(faulted[i, start:] == faulted[i, -1]) and np.array_equal(faulted[i, :start],
                                                                                           x[i, :start])
    for i in np.flatnonzero(kinds == KIND_CODES["spike"]):  # a few samples, each SPIKE_SD deviations off
        moved = np.abs(faulted[i] - x[i]) / scale
        assert np.count_nonzero(moved) == SPIKES and np.allclose(moved[moved > 0], SPIKE_SD, rtol=1e-4)
    for i in np.flatnonzero(kinds == KIND_CODES["drift"]):  # a ramp from 0 to DRIFT_SD deviations, every channel
        ramp = (faulted[i] - x[i]) / scale
        assert np.allclose(ramp[0], 0, atol=1e-4) and np.allclose(np.abs(ramp[-1]), DRIFT_SD, rtol=1e-3)
        assert np.allclose(np.diff(ramp, axis=0), ramp[-1] / 127, atol=1e-3)
    _, one_kind = inject(x, scale, Anomalies(share=0.1, kinds=("spike",), magnitude=2.0), np.random.default_rng(1))
    assert set(np.unique(one_kind)) == {0, KIND_CODES["spike"]} and int(np.sum(one_kind != 0)) == 4
    assert Anomalies(share=0.01).count(3) == 1 and Anomalies(share=0.9).count(3) == 2 and Anomalies().count(1) == 0


def test_an_autoencoder_scenario_writes_faulted_test_windows_and_their_kinds_beside_the_agents_arrays(tmp_path):
    s = parse_scenario({"fleet": {"devices": 2}, "training": {"model": "imu_autoencoder"},
                        "dataset": {"anomalies": {"share": 0.25, "kinds": ["spike", "drift"]}}})
    clean = partition(parse_scenario({"fleet": {"devices": 2}, "training": {"model": "imu_autoencoder"}}))
    for (name, path), device in zip(prepare_devices(s, tmp_path), clean):
        with np.load(path) as npz:
            kinds = npz["anomaly_test"]
            x_test, x_train = npz["x_test"], npz["x_train"]
        assert len(kinds) == device.num_test and int(np.sum(kinds != 0)) == round(0.25 * device.num_test)
        assert set(np.unique(kinds)) == {0, KIND_CODES["spike"], KIND_CODES["drift"]}
        assert np.array_equal(x_test[kinds == 0], device.x_test[kinds == 0])  # normal windows as recorded
        assert np.array_equal(x_train, device.x_train)  # train windows never touched
        assert load_replay(path, (128, 6)).x_test.shape == x_test.shape  # the agent still reads its file
    assert s.to_dict()["anomalies"] == {"share": 0.25, "kinds": ("spike", "drift"), "magnitude": 1.0}


# --- models of the zoo and built folders --------------------------------------------------------------------------

def test_every_family_of_the_zoo_can_be_named_and_its_manifest_says_what_it_takes():
    cnn = parse_scenario({"training": {"model": "imu_cnn"}}).model_spec
    ae = parse_scenario({"training": {"model": "imu_autoencoder"}}).model_spec
    mlp = parse_scenario({"training": {"model": "tabular_mlp"}}).model_spec
    assert (cnn.task, cnn.input_shape, cnn.classes, cnn.packaged) == ("classification", (128, 6), 7, True)
    assert (ae.task, ae.input_shape, ae.classes) == ("reconstruction", (128, 6), 0)
    assert (mlp.task, mlp.input_shape, mlp.classes) == ("classification", (24,), 7)


def test_the_tabular_model_gets_each_watch_window_summarised_to_its_features():
    devices = partition(parse_scenario({"fleet": {"devices": 2}, "training": {"model": "tabular_mlp"}}))
    windows = partition(parse_scenario({"fleet": {"devices": 2}}))
    from firmware_models.mlp import window_features

    assert devices[0].x_train.shape[1:] == (24,)
    assert np.array_equal(devices[0].x_test, window_features(windows[0].x_test))


def test_a_built_model_folder_is_named_by_its_path_relative_to_the_scenario(tmp_path):
    folder = _model_folder(tmp_path, "imu_cnn", num_classes=6, classes=[f"c{i}" for i in range(6)])
    data = _data_folder(tmp_path, (128, 6), labels=6)
    (tmp_path / "s.toml").write_text(f'[dataset]\nsource = "{data.name}"\n[fleet]\ndevices = 3\n'
                                     f'[training]\nmodel = "{folder.name}"\n')
    s = load_scenario(tmp_path / "s.toml")
    assert s.model == str(folder) and s.model_spec.classes == 6 and not s.model_spec.packaged
    assert "6 classes, from" in s.model_spec.label


@pytest.mark.parametrize("shape, labels, model, message", [
    ((128, 3), 6, ("imu_cnn", {}), r"the data's windows are \[128, 3\], the model \(imu_cnn\) takes \[128, 6\]"),
    ((128, 6), 6, ("imu_autoencoder", {"input_shape": [64, 6]}),
     r"the data's windows are \[128, 6\], the model \(imu_autoencoder, reconstruction, from .*\) takes \[64, 6\]"),
    ((128, 6), 7, ("imu_cnn", {"num_classes": 6}),
     r"the data's labels are 0 to 6 \(7 classes\), the model \(imu_cnn, 6 classes, from .*\) has 6 classes "
     r"\(0 to 5\); 6 is not one of them"),
    ((128, 6), None, ("imu_cnn", {}), r"has a file without labels \(y\), and the model \(imu_cnn\) is a classifier"),
    ((20,), 3, ("tabular_mlp", {}), r"the data's windows are \[20\], the model \(tabular_mlp\) takes \[24\]"),
])
def test_data_that_does_not_fit_the_model_is_refused_at_load_naming_both(tmp_path, shape, labels, model, message):
    family, changes = model
    name = str(_model_folder(tmp_path, family, **changes)) if changes else family
    source = _data_folder(tmp_path, shape, labels)
    with pytest.raises(ScenarioError, match=message):
        parse_scenario({"fleet": {"devices": 3}, "dataset": {"source": str(source)}, "training": {"model": name}})


def test_unlabelled_data_trains_an_autoencoder(tmp_path):
    source = _data_folder(tmp_path, (128, 6), labels=None)
    s = parse_scenario({"fleet": {"devices": 3}, "dataset": {"source": str(source)},
                        "training": {"model": "imu_autoencoder"}})
    devices = partition(s)
    assert [d.num_train + d.num_test for d in devices] == [12, 12, 12]
    assert all(not d.y_train.any() and not d.y_test.any() for d in devices)


def test_neighbourhood_classes_must_be_classes_of_the_model(tmp_path):
    folder = _model_folder(tmp_path, "imu_cnn", num_classes=5)
    with pytest.raises(ScenarioError, match=r"classes_by_neighbourhood names class 6; the model .* has 5 classes"):
        parse_scenario({"fleet": {"devices": 2}, "training": {"model": str(folder)},
                        "dataset": {"classes_by_neighbourhood": [[0, 1], [5, 6]]}})
    s = parse_scenario({"fleet": {"devices": 2}, "training": {"model": str(folder)},  # 5 and 6 left out: fits
                        "dataset": {"classes_by_neighbourhood": [[0, 1], [2, 4]]}})
    assert s.model_spec.classes == 5


@pytest.mark.parametrize("model, message", [
    ("nothing-here", r"training.model must be a model family .*'nothing-here' is none of them"),
    ("empty", r"training.model: .*empty has no manifest.json, model.tflite, weights.npz"),
])
def test_a_model_that_is_neither_a_family_nor_a_built_folder_is_refused(tmp_path, model, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "s.toml").write_text(f'[training]\nmodel = "{model}"\n')
    with pytest.raises(ScenarioError, match=message):
        load_scenario(tmp_path / "s.toml")


def test_a_folder_whose_files_are_not_its_manifests_is_refused(tmp_path):
    folder = _model_folder(tmp_path, "imu_cnn")
    (folder / "weights.npz").write_bytes(b"other weights")
    with pytest.raises(ScenarioError, match=r"weights.npz is not the file its manifest names"):
        parse_scenario({"training": {"model": str(folder)}})


@pytest.mark.parametrize("model, anomalies, message", [
    ("imu_cnn", {}, r"dataset.anomalies: .*training.model \(imu_cnn\) is a classifier"),
    ("imu_autoencoder", {"share": 1.0}, r"dataset.anomalies.share must be between 0 and 1"),
    ("imu_autoencoder", {"kinds": ["spike", "spike"]}, "names a kind twice"),
    ("imu_autoencoder", {"kinds": []}, "must list some of stuck, spike, drift"),
    ("imu_autoencoder", {"magnitude": 0}, "magnitude must be a positive number"),
    ("imu_autoencoder", {"magnitude": float("inf")}, "magnitude must be a positive number, got inf"),
    ("imu_autoencoder", {"shares": 0.2}, "unknown key dataset.anomalies.shares; known: share, kinds, magnitude"),
    ("imu_autoencoder", {"share": "lots"}, r"dataset.anomalies.share has the wrong type \(str\)"),
])
def test_anomaly_settings_are_checked_naming_the_field(model, anomalies, message):
    with pytest.raises(ScenarioError, match=message):
        parse_scenario({"training": {"model": model}, "dataset": {"anomalies": anomalies}})


def test_the_shipped_anomalies_scenario_runs_the_autoencoder_on_faulted_watch_windows():
    s = load_scenario(ROOT / "hw" / "scenarios" / "anomalies.toml")
    assert s.model == "imu_autoencoder" and s.source == "watch" and s.anomalies is not None
    assert s.model_spec.task == "reconstruction"


def test_a_real_device_joins_a_run_whose_model_is_a_folder_with_the_folder_from_its_join_kit(tmp_path):
    from agent.config import load_config
    from agent.model_source import model_source
    from hw.hil import VoucherDesk, write_join_kit
    from protocol.keys import Identity

    classes = ["sit", "stand", "walk", "stairs-up", "stairs-down", "bike", "run"]  # imu_cnn's 7, named anew
    folder = _model_folder(tmp_path, "imu_cnn", classes=classes)
    s = parse_scenario({"fleet": {"devices": 2}, "training": {"model": str(folder)}})
    gateway, pi = Identity.generate(), tmp_path / "pi"
    kit = write_join_kit(tmp_path / "kit", "10.0.0.5", 1883, [{"name": "gw-1", "id": gateway.id,
                         "public_key": gateway.public_key.hex()}], s.model, None, VoucherDesk(tmp_path / "d"),
                         root=pi)
    assert sorted(p.name for p in (kit.folder / "model").iterdir()) == ["manifest.json", "model.tflite",
                                                                       "weights.npz"]
    steps = kit.steps.read_text()
    assert "sudo cp -r ~/starling-hil/model /etc/starling/model" in steps and "--model" not in steps
    shutil.copytree(kit.folder / "model", pi / "etc/starling/model")  # that step, on the device
    config = load_config(kit.config)
    assert config.model_path == pi / "etc/starling/model"
    source = model_source(config)  # what `starling-agent run` loads there
    assert source.manifest["classes"] == classes and source.load().num_classes == 7
    # The kit written again for a model of the zoo names it, with no folder left over.
    kit = write_join_kit(tmp_path / "kit", "10.0.0.5", 1883, [{"name": "gw-1", "id": gateway.id,
                         "public_key": gateway.public_key.hex()}], "imu_cnn", None, VoucherDesk(tmp_path / "d"),
                         root=pi)
    assert not (kit.folder / "model").exists() and load_config(kit.config).model == "imu_cnn"
