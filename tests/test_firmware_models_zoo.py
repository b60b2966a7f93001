"""The model zoo on a plain TFLite interpreter: every family trains, FedProx runs in the graph, `inspect`.

No TensorFlow here: these run under LiteRT and again under tflite-runtime
(numpy<2). Builds and MCU exports are in test_firmware_models_build.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import firmware_models
from firmware_models import families, load_manifest, model_dir
from firmware_models.mlp import window_features
from firmware_models.runtime import ANCHOR_SIGNATURE, SIGNATURES, TrainableModel, custom_ops, op_names
from hw.datasets import load_watch_devices

REPO = Path(__file__).resolve().parents[1]
LR = {"imu_cnn": 0.2, "tabular_mlp": 0.1, "imu_autoencoder": 0.2}


@pytest.fixture(scope="module")
def device():
    return load_watch_devices([1])[0]


def _data(name: str, device) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(x_train, y_train, x_test, y_test) in the model's input form; no labels for the autoencoder."""
    if name == "tabular_mlp":
        return window_features(device.x_train), device.y_train, window_features(device.x_test), device.y_test
    if name == "imu_autoencoder":
        return device.x_train, None, device.x_test, None
    return device.x_train, device.y_train, device.x_test, device.y_test


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


# ----------------------------------------------------------- the artifacts


def test_every_family_is_built_into_the_package():
    assert list(families.FAMILIES) == list(firmware_models.MODELS)
    from firmware_models import cli

    assert cli.FAMILY_NAMES == firmware_models.MODELS  # the CLI's choices, listed without importing numpy
    for name in firmware_models.MODELS:
        assert firmware_models.verify_model_files(name)["family"] == name
    with pytest.raises(ValueError, match="known: imu_cnn"):
        families.get("lstm")


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_manifest_records_the_build_and_describes_the_model(name):
    manifest = load_manifest(name)
    family = families.get(name)
    folder = model_dir(name)
    assert hashlib.sha256((folder / "model.tflite").read_bytes()).hexdigest() == manifest["sha256"]
    assert (folder / "model.tflite").stat().st_size == manifest["model_bytes"] < 400_000
    assert manifest["family"] == manifest["build"]["family"] == name
    assert manifest["task"] == family.task and manifest["version"] == family.version
    build = manifest["build"]
    assert {"options", "seed", "normalization", "tensorflow", "numpy", "command"} <= set(build)
    assert build["command"].startswith(f"starling-models build --family {name} --seed {build['seed']}")
    opts = family.options(build["options"])
    assert opts == build["options"]

    # the weight layout and the initial weights follow from the recorded inputs, without TensorFlow
    layout = family.weight_layout(opts)
    assert [n for n, _ in layout] == sorted(n for n, _ in layout)
    assert [(w["name"], tuple(w["shape"])) for w in manifest["weights"]] == layout
    init = family.initial_weights(opts, build["seed"])
    from firmware_models.build import deterministic_npz

    assert hashlib.sha256(deterministic_npz(init)).hexdigest() == manifest["weights_sha256"]

    model = TrainableModel.from_package(name)
    assert model.task == manifest["task"] and model.supports_proximal
    assert list(model.input_shape) == manifest["input_shape"] == list(family.input_shape(opts))
    assert model.num_classes == manifest["num_classes"] == family.num_classes(opts)
    assert len(manifest["classes"]) == manifest["num_classes"]
    assert model.parameter_count == manifest["parameter_count"]
    assert set(model.interpreter.get_signature_list()) == {*SIGNATURES, ANCHOR_SIGNATURE} == set(manifest["signatures"])
    norm = manifest["normalization"]
    assert len(norm["mean"]) == len(norm["std"]) == model.input_shape[-1] == len(manifest["input_channels"])
    assert all(s > 0 for s in norm["std"]) and norm["source"]
    data = (folder / "model.tflite").read_bytes()
    assert custom_ops(data) == []
    assert len(op_names(data)) == len(manifest["ops"])


def test_a_manifest_task_that_contradicts_the_signatures_is_refused():
    path = model_dir("imu_autoencoder") / "model.tflite"
    with pytest.raises(ValueError, match="task"):
        TrainableModel(path, manifest={"task": "classification"})


def test_family_options_are_checked():
    assert families.get("tabular_mlp").options({"hidden": "16, 8", "features": 10})["hidden"] == [16, 8]
    with pytest.raises(ValueError, match="no build option"):
        families.get("imu_cnn").options({"code": 4})
    with pytest.raises(ValueError, match="classes"):
        families.get("imu_cnn").options({"classes": 1})
    with pytest.raises(ValueError, match="hidden"):
        families.get("tabular_mlp").options({"hidden": []})
    layout = families.get("tabular_mlp").weight_layout(families.get("tabular_mlp").options({"hidden": [5] * 9}))
    assert [n for n, _ in layout] == sorted(n for n, _ in layout)  # 9 layers still sort in layer order


def test_window_features_are_per_channel_mean_std_min_max(device):
    x = device.x_train[:3]
    f = window_features(x)
    assert f.shape == (3, 24) and f.dtype == np.float32
    np.testing.assert_allclose(f[:, :6], x.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f[:, 18:], x.max(axis=1))
    names = load_manifest("tabular_mlp")["input_channels"]
    assert names[:2] == ["ax_mean", "ay_mean"] and names[-1] == "wz_max"


# ----------------------------------------------------------------- training


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_each_family_trains_with_the_loss_going_down(name, device):
    model = TrainableModel.from_package(name)
    x, y, x_test, y_test = _data(name, device)
    before = model.metrics(x_test, y_test)
    losses = model.train_epochs(x, y, epochs=6, lr=LR[name], rng=0)
    after = model.metrics(x_test, y_test)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert after["loss"] < 0.85 * before["loss"], (before, after)
    assert all(np.isfinite(v) for v in after.values())


def test_tabular_mlp_learns_the_exercises_from_window_features(device):
    model = TrainableModel.from_package("tabular_mlp")
    x, y, x_test, y_test = _data("tabular_mlp", device)
    model.train_epochs(x, y, epochs=8, lr=0.1, rng=0)
    loss, accuracy = model.evaluate(x_test, y_test)
    assert accuracy > 0.7 and model.predict(x_test).shape == (len(x_test), 7)


def test_autoencoder_scores_noisy_windows_as_anomalies(device):
    """Trained on one subject's raw windows (no labels), it reconstructs unseen normal windows
    far better than the same windows from a noisy sensor or with channels swapped."""
    model = TrainableModel.from_package("imu_autoencoder")
    model.train_epochs(device.x_train, None, epochs=6, lr=0.2, rng=0)
    normal = model.reconstruction_error(device.x_test)
    std = np.asarray(model.manifest["normalization"]["std"], np.float32)
    noisy = device.x_test + np.random.default_rng(0).normal(size=device.x_test.shape).astype(np.float32) * std
    swapped = device.x_test[:, :, ::-1]
    for anomalous in (model.reconstruction_error(noisy), model.reconstruction_error(swapped)):
        assert anomalous.mean() > 2 * normal.mean()
        assert np.mean(anomalous > np.median(normal)) > 0.9


def test_reconstruction_model_api(device):
    model = TrainableModel.from_package("imu_autoencoder")
    manifest = model.manifest
    assert model.task == "reconstruction" and model.num_classes == 0 and manifest["classes"] == []
    x = device.x_test[:37]
    rec = model.predict(x)
    assert rec.shape == x.shape and rec.dtype == np.float32
    err = model.reconstruction_error(x)
    assert err.shape == (37,) and np.all(err >= 0)
    # the error is the mean squared difference in normalized units, of the same reconstruction
    mean, std = (np.asarray(manifest["normalization"][k]) for k in ("mean", "std"))
    expected = (((rec - mean) / std - (x - mean) / std) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(err, expected, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(model.reconstruction_error(x[36:37]), err[36:37], rtol=1e-5)
    assert model.predict(x[:0]).shape == (0, 128, 6)
    metrics = model.metrics(x)
    assert set(metrics) == {"loss", "error_p95"} and metrics["loss"] == pytest.approx(float(err.mean()), rel=1e-5)
    labels_ignored = TrainableModel.from_package("imu_autoencoder")
    assert model.train_step(x[:32], None, 0.1) == pytest.approx(labels_ignored.train_step(x[:32], np.zeros(32), 0.1))
    with pytest.raises(ValueError, match="metrics"):
        model.evaluate(x, np.zeros(37, np.int32))
    classifier = TrainableModel.from_package("imu_cnn")
    with pytest.raises(ValueError, match="labels"):
        classifier.train_step(x[:32], None, 0.1)
    with pytest.raises(ValueError, match="reconstruction"):
        classifier.reconstruction_error(x)


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_the_learning_rate_is_an_input_of_every_step(name, device):
    x, y, _, _ = _data(name, device)
    y = None if y is None else y[:32]
    deltas = {}
    for lr in (0.0, 0.05, 0.1):
        model = TrainableModel.from_package(name)
        w0 = model.get_weights()
        model.train_step(x[:32], y, lr)
        deltas[lr] = {k: v - w0[k] for k, v in model.get_weights().items()}
    assert all(np.all(d == 0) for d in deltas[0.0].values())  # lr 0: no change at all
    assert _distance(deltas[0.05], {k: 0 * v for k, v in deltas[0.05].items()}) > 1e-4
    for k in deltas[0.1]:  # one step from the same weights: twice the rate, twice the move
        np.testing.assert_allclose(deltas[0.1][k], 2 * deltas[0.05][k], rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------ FedProx


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_a_large_mu_keeps_the_weights_near_the_anchor(name, device):
    x, y, _, _ = _data(name, device)
    moved = {}
    for mu in (0.0, 1.0, 4.0):
        model = TrainableModel.from_package(name)
        anchor = model.get_weights()
        model.set_anchor(anchor)
        model.train_epochs(x, y, epochs=2, lr=LR[name], rng=0, mu=mu)
        moved[mu] = _distance(model.get_weights(), anchor)
    assert moved[0.0] > moved[1.0] > moved[4.0] > 0
    assert moved[4.0] < 0.5 * moved[0.0], moved


def test_the_in_graph_proximal_step_is_the_agents_numpy_step(device):
    """w - lr * (grad + mu * (w - anchor)) == numpy: plain SGD step, then - lr * mu * (w_before - anchor)."""
    x, y = device.x_train[:32], device.y_train[:32]
    lr, mu = 0.1, 0.5
    rng = np.random.default_rng(3)
    a, b = TrainableModel.from_package("imu_cnn"), TrainableModel.from_package("imu_cnn")
    start = a.get_weights()
    anchor = {k: v + rng.normal(scale=0.05, size=v.shape).astype(np.float32) for k, v in start.items()}
    a.set_anchor(anchor)
    b.set_anchor(anchor)
    loss_a = a.train_step(x, y, lr, mu=mu)
    loss_b = b.train_step(x, y, lr)  # mu = 0 ignores the anchor
    assert loss_a == pytest.approx(loss_b, rel=1e-6)  # the reported loss is the data loss
    sgd = b.get_weights()
    expected = {k: sgd[k] - lr * mu * (start[k] - anchor[k]) for k in sgd}
    got = a.get_weights()
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)

    # the train signature also reports the proximal term mu/2 * ||w - anchor||^2 before the step
    runner = TrainableModel.from_package("imu_cnn")
    runner.set_anchor(anchor)
    out = runner._runners["train"](x=x, y=y.astype(np.int32), lr=np.float32(0.0), mu=np.float32(mu))
    assert float(out["proximal"]) == pytest.approx(0.5 * mu * _distance(start, anchor) ** 2, rel=1e-4)


def test_mu_zero_ignores_the_anchor_and_set_weights_keeps_it(device):
    x, y = device.x_train[:32], device.y_train[:32]
    plain, far = TrainableModel.from_package("imu_cnn"), TrainableModel.from_package("imu_cnn")
    far.set_anchor({k: np.full(s, 3.0, np.float32) for k, s in far.weight_shapes.items()})
    plain.train_step(x, y, 0.1)
    far.train_step(x, y, 0.1, mu=0.0)
    for k, v in plain.get_weights().items():
        np.testing.assert_array_equal(far.get_weights()[k], v)

    # set_anchor() with no argument anchors at the current weights: the first step pays no penalty
    model, reference = TrainableModel.from_package("imu_cnn"), TrainableModel.from_package("imu_cnn")
    w0 = model.get_weights()
    model.set_anchor()
    model.train_step(x, y, 0.1, mu=10.0)
    reference.train_step(x, y, 0.1)
    for k, v in reference.get_weights().items():
        np.testing.assert_allclose(model.get_weights()[k], v, atol=1e-7)
    # set_weights moves the weights, never the anchor: the pull is still towards w0
    shifted = {k: v + 0.01 for k, v in w0.items()}
    model.set_weights(shifted)
    reference.set_weights(shifted)
    model.train_step(x, y, 0.05, mu=10.0)
    reference.train_step(x, y, 0.05)
    for k, v in reference.get_weights().items():
        np.testing.assert_allclose(model.get_weights()[k] - v, -0.05 * 10.0 * (shifted[k] - w0[k]), atol=1e-5)


def test_bad_anchor_and_mu_are_refused(device):
    model = TrainableModel.from_package("tabular_mlp")
    good = model.get_weights()
    with pytest.raises(ValueError, match="missing"):
        model.set_anchor({k: v for k, v in good.items() if k != "out_b"})
    with pytest.raises(ValueError, match="non-finite"):
        model.set_anchor({**good, "out_b": np.full(7, np.inf, np.float32)})
    x, y = window_features(device.x_train[:4]), device.y_train[:4]
    for mu in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="mu"):
            model.train_step(x, y, 0.1, mu=mu)


# ------------------------------------------------------------------ inspect


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_inspect_reports_signatures_ops_parameters_and_size(name, capsys):
    from firmware_models import cli

    manifest = load_manifest(name)
    path = model_dir(name) / "model.tflite"
    assert cli.main(["inspect", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"] == manifest["model_bytes"] and report["sha256"] == manifest["sha256"]
    assert report["trainable"] is True
    assert report["parameter_count"] == manifest["parameter_count"]
    assert report["signatures"] == manifest["signatures"]  # read from the flatbuffer, same as the interpreter's
    assert report["ops"] == op_names(path.read_bytes())
    assert report["subgraphs"] >= 5 and report["operators"] > 20


def test_inspect_runs_without_tensorflow_and_refuses_a_non_model(tmp_path):
    bad = tmp_path / "not_a_model.tflite"
    bad.write_bytes(b"\x00" * 64)
    code = ("import sys; from firmware_models import cli\n"
            f"rc = cli.main(['inspect', {str(model_dir('imu_cnn') / 'model.tflite')!r}])\n"
            f"rc_bad = cli.main(['inspect', {str(bad)!r}])\n"
            "print(rc, rc_bad, 'tensorflow' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "0 1 False"
    assert json.loads(done.stdout)["parameter_count"] == load_manifest("imu_cnn")["parameter_count"]


def test_export_mcu_without_tensorflow_says_how_to_get_it(capsys, tmp_path):
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorFlow is installed here")
    from firmware_models import cli

    rc = cli.main(["export-mcu", "--model", "imu_cnn", "--weights", str(model_dir("imu_cnn") / "weights.npz"),
                   "--out", str(tmp_path)])
    assert rc == 2 and "pip install .[build]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
