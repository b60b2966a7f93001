"""What needs TensorFlow: reproducible builds of every family and the microcontroller export.

Skipped where TensorFlow is missing (the device environments) and failed there
under STARLING_CI=1 (tests/required_tools.py); run in the build environment
(`make test` makes .venv-build: `pip install .[build]`, which pins the TensorFlow
the committed models were built with, plus pytest). The C header is compiled
with gcc and g++ (hw/install-system.sh installs them).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from required_tools import missing, require

try:
    import tensorflow as tf
except ImportError:
    missing("needs TensorFlow: run these in .venv-build (`make test`), or pip install -e '.[build]'",
            module_level=True)

import firmware_models  # noqa: E402
from firmware_models import cli, families, load_manifest, mcu, model_dir, watch  # noqa: E402
from firmware_models.inspect_model import inspect_file  # noqa: E402
from firmware_models.mlp import window_features  # noqa: E402
from firmware_models.runtime import TrainableModel  # noqa: E402

FILES = ("model.tflite", "weights.npz", "manifest.json")


def _model(path: Path) -> TrainableModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainableModel(path, interpreter_class=mcu.interpreter_class())


# ------------------------------------------------------------------ builds


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_the_recorded_command_rebuilds_the_committed_files_byte_for_byte(name, tmp_path, capsys):
    """The weights never depend on TensorFlow; the model file does, so it is compared under the same version."""
    manifest = load_manifest(name)
    args = shlex.split(manifest["build"]["command"])
    assert args[:2] == ["starling-models", "build"]
    assert cli.main([*args[1:], "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert (tmp_path / "weights.npz").read_bytes() == (model_dir(name) / "weights.npz").read_bytes()
    if manifest["build"]["tensorflow"] != tf.__version__:
        missing(f"{name} was built with TensorFlow {manifest['build']['tensorflow']}, this is {tf.__version__}: "
                f"the model file is compared under the same version (pip install -e '.[build]' pins it)")
    assert (tmp_path / "model.tflite").read_bytes() == (model_dir(name) / "model.tflite").read_bytes()
    rebuilt = json.loads((tmp_path / "manifest.json").read_text())
    if rebuilt["build"]["numpy"] == manifest["build"]["numpy"]:
        assert (tmp_path / "manifest.json").read_bytes() == (model_dir(name) / "manifest.json").read_bytes()
    rebuilt["build"]["numpy"] = manifest["build"]["numpy"]
    assert rebuilt == manifest


def test_build_options_and_a_normalization_file_are_recorded_and_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "fleet.npz"
    np.savez(data, X=rng.normal(loc=5.0, scale=2.0, size=(200, 5)).astype(np.float32))
    outs = [tmp_path / "a", tmp_path / "b"]
    args = ["build", "--family", "tabular_mlp", "--features", "5", "--classes", "3", "--hidden", "8",
            "--normalization", str(data), "--seed", "4"]
    for out in outs:
        assert cli.main([*args, "--out", str(out)]) == 0
    for filename in FILES:
        assert (outs[0] / filename).read_bytes() == (outs[1] / filename).read_bytes(), filename
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    build = manifest["build"]
    assert build["options"] == {"features": 5, "classes": 3, "hidden": [8]} and build["seed"] == 4
    assert build["normalization"] == {"file": "fleet.npz", "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert "--normalization fleet.npz" in build["command"]
    mean = np.asarray(manifest["normalization"]["mean"])
    assert np.all(np.abs(mean - 5.0) < 0.5) and manifest["classes"] == ["class0", "class1", "class2"]
    model = _model(outs[0] / "model.tflite")
    assert model.input_shape == (5,) and model.num_classes == 3
    x = rng.normal(loc=5.0, scale=2.0, size=(96, 5)).astype(np.float32)
    y = (x[:, 0] > 5.0).astype(np.int32) + (x[:, 1] > 5.0)
    losses = model.train_epochs(x, y, epochs=15, lr=0.2, rng=0)
    assert losses[-1] < 0.7 * losses[0]


def test_the_number_of_classes_is_a_build_option_of_the_cnn(tmp_path):
    assert cli.main(["build", "--family", "imu_cnn", "--classes", "4", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shapes = {w["name"]: w["shape"] for w in manifest["weights"]}
    assert shapes["dense_w"] == [64, 4] and shapes["conv1_w"] == [5, 6, 32]
    assert manifest["num_classes"] == 4 and _model(tmp_path / "model.tflite").num_classes == 4


def test_build_refuses_options_the_family_does_not_take(tmp_path, capsys):
    assert cli.main(["build", "--family", "imu_cnn", "--code", "8", "--out", str(tmp_path)]) == 2
    assert "no build option" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------- MCU export


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each family trained briefly on the pooled watch training windows, then exported."""
    out = tmp_path_factory.mktemp("mcu")
    x, y = watch.windows("train")
    results = {}
    for name, lr in (("imu_cnn", 0.2), ("tabular_mlp", 0.1), ("imu_autoencoder", 0.2)):
        model = _model(model_dir(name) / "model.tflite")
        inputs = window_features(x) if name == "tabular_mlp" else x
        model.train_epochs(inputs, y if model.task == "classification" else None, epochs=2, lr=lr, rng=0)
        np.savez(out / f"{name}_weights.npz", **model.get_weights())
        results[name] = (model, mcu.export_mcu(name, out / f"{name}_weights.npz", out))
    return results


def test_int8_cnn_agrees_with_the_float_model(exports):
    _, result = exports["imu_cnn"]
    assert result["test_examples"] > 300
    assert result["agreement"] >= 0.95
    assert result["float_acc"] > 0.6
    assert result["int8_acc"] >= result["float_acc"] - 0.03
    assert result["int8_bytes"] < 0.5 * result["float_bytes"]
    # the figures the accuracy bench reports
    assert {"float_acc", "int8_acc", "float_bytes", "int8_bytes"} <= set(result)
    for key in ("float_file", "int8_file"):
        assert Path(result[key]).stat().st_size == result[key.replace("file", "bytes")]


def test_tabular_int8_agrees_and_autoencoder_int8_scores_like_the_float_model(exports):
    assert exports["tabular_mlp"][1]["agreement"] >= 0.9
    ae = exports["imu_autoencoder"][1]
    assert ae["task"] == "reconstruction"
    assert ae["error_rel_diff"] < 0.1 and ae["error_corr"] > 0.95


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_the_float_export_computes_what_the_trained_model_computes(name, exports):
    model, result = exports[name]
    x = watch.windows("test")[0][::7]
    x = window_features(x) if name == "tabular_mlp" else x
    outputs = mcu.run(Path(result["float_file"]).read_bytes(), x)
    if model.task == "classification":
        np.testing.assert_allclose(outputs["probs"], model.predict(x), atol=2e-4)
    else:
        np.testing.assert_allclose(mcu.anomaly_scores(outputs), model.reconstruction_error(x), rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_exports_use_only_tflite_micro_int8_ops_and_inspect_counts_the_same_parameters(name, exports):
    _, result = exports[name]
    assert set(result["ops"]) <= set(mcu.TFLM_OPS)
    report = inspect_file(result["int8_file"])
    assert report["trainable"] is False
    assert report["parameter_count"] == load_manifest(name)["parameter_count"]
    (sig,) = report["signatures"].values()
    (inp,) = sig["inputs"].values()
    assert inp["dtype"] == "int8" and inp["shape"] == [1, *load_manifest(name)["input_shape"]]
    assert inp["scale"] == pytest.approx(result["quantization"]["inputs"][0]["scale"])
    assert all(o["dtype"] == "int8" for o in sig["outputs"].values())


def _c_array(header: str, symbol: str) -> bytes:
    body = re.search(rf"alignas\(16\) const unsigned char {symbol}\[\] = \{{(.*?)\}};", header, re.S).group(1)
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))


@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_the_c_header_holds_the_int8_model_and_its_quantization(name, exports, tmp_path):
    _, result = exports[name]
    header = Path(result["header"]).read_text()
    model = Path(result["int8_file"]).read_bytes()
    assert _c_array(header, f"{name}_int8_tflite") == model
    assert f"const unsigned int {name}_int8_tflite_len = {len(model)};" in header
    prefix = name.upper()
    macros = dict(re.findall(rf"#define ({prefix}_\w+) (.+?)(?:\s+/\*.*)?$", header, re.M))
    quant = result["quantization"]
    assert float(macros[f"{prefix}_INPUT_SCALE"].rstrip("f")) == pytest.approx(quant["inputs"][0]["scale"])
    assert int(macros[f"{prefix}_INPUT_ZERO_POINT"].strip("()")) == quant["inputs"][0]["zero_point"]
    first = quant["outputs"][0]
    assert float(macros[f"{prefix}_OUTPUT_SCALE"].rstrip("f")) == pytest.approx(first["scale"])
    assert int(macros[f"{prefix}_OUTPUT_ZERO_POINT"].strip("()")) == first["zero_point"]
    arena = int(macros[f"{prefix}_TENSOR_ARENA_SIZE"])
    assert arena == result["arena_bytes"] and arena % 1024 == 0
    assert result["activations_peak_bytes"] < arena < 64 * 1024
    for op in result["ops"]:
        assert f"{mcu.TFLM_OPS[op]}()" in header


@pytest.mark.parametrize("compiler", ["g++", "gcc"])
@pytest.mark.parametrize("name", firmware_models.MODELS)
def test_the_c_header_compiles_as_cpp_and_c11_and_the_array_has_the_stated_length(name, compiler, exports, tmp_path):
    require(shutil.which(compiler) is not None, f"needs {compiler} to compile the C header (hw/install-system.sh)")
    _, result = exports[name]
    length = len(Path(result["int8_file"]).read_bytes())
    suffix, flags, check = {
        "g++": ("cc", ["-std=c++17"], f'static_assert(sizeof({name}_int8_tflite) == {length}, "length");'),
        "gcc": ("c", ["-std=c11"], f'_Static_assert(sizeof({name}_int8_tflite) == {length}, "length");'),
    }[compiler]
    source = tmp_path / f"use.{suffix}"
    source.write_text(f'#include "{result["header"]}"\n{check}\n'
                      f"int main(void) {{ return {name}_int8_tflite[4] == 'T' ? 0 : 1; }}\n")
    done = subprocess.run([compiler, *flags, "-Wall", "-Werror", "-o", str(tmp_path / f"a_{suffix}"), str(source)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert subprocess.run([str(tmp_path / f"a_{suffix}")], timeout=30).returncode == 0


def test_the_arena_estimate_covers_the_largest_activation(exports):
    _, result = exports["imu_cnn"]
    # conv1's output is 128 x 32 int8: the planner needs at least it plus its input at once
    assert result["activations_peak_bytes"] >= 128 * 32 + 128 * 6
    summary = json.loads(Path(result["summary"]).read_text())
    assert summary["arena_bytes"] == result["arena_bytes"] and summary["int8_sha256"] == result["int8_sha256"]


def test_cli_export_with_a_calibration_file(exports, tmp_path, capsys):
    x = window_features(watch.windows("train")[0][:200])
    np.savez(tmp_path / "calibration.npz", x=x)
    weights = Path(exports["tabular_mlp"][1]["int8_file"]).parent / "tabular_mlp_weights.npz"
    args = ["export-mcu", "--model", "tabular_mlp", "--weights", str(weights), "--out", str(tmp_path / "out"),
            "--calibration", str(tmp_path / "calibration.npz"), "--name", "air"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["calibration_examples"] == 200 and printed["agreement"] >= 0.9
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "air_float.tflite", "air_int8.h", "air_int8.tflite", "air_mcu.json"]
    assert "AIR_INPUT_SCALE" in (tmp_path / "out" / "air_int8.h").read_text()

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{w["name"]: np.zeros(w["shape"], np.float32) for w in load_manifest("imu_cnn")["weights"]})
    bad = ["export-mcu", "--model", "tabular_mlp", "--weights", str(wrong), "--out", str(tmp_path / "bad")]
    assert cli.main(bad) == 2
    assert "do not match" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_family_registry_has_an_mcu_graph_for_every_family():
    for family in families.FAMILIES.values():
        assert type(family).mcu_forward is not families.Family.mcu_forward
