"""firmware_models: the built imu_cnn model, its manifest, and training it under LiteRT.

The other families, FedProx in the graph and `inspect` are in
test_firmware_models_zoo.py; what needs TensorFlow (builds, MCU export) in
test_firmware_models_build.py.
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
from firmware_models import load_manifest, model_dir
from firmware_models.runtime import (
    ANCHOR_SIGNATURE,
    SIGNATURES,
    TrainableModel,
    custom_ops,
    flex_ops,
    op_names,
    operator_codes,
)
from hw.datasets import load_watch_devices

REPO = Path(__file__).resolve().parents[1]
MODEL = model_dir("imu_cnn") / "model.tflite"
WEIGHTS = model_dir("imu_cnn") / "weights.npz"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest("imu_cnn")


@pytest.fixture()
def model() -> TrainableModel:
    return TrainableModel.from_package("imu_cnn")


@pytest.fixture(scope="module")
def device():
    return load_watch_devices([1])[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _initial_weights() -> dict[str, np.ndarray]:
    with np.load(WEIGHTS, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# ------------------------------------------------------------- the artifacts


def test_files_match_the_manifest_digests(manifest):
    assert manifest["name"] == "imu_cnn"
    assert _sha256(MODEL) == manifest["sha256"]
    assert _sha256(WEIGHTS) == manifest["weights_sha256"]
    assert MODEL.stat().st_size == manifest["model_bytes"]
    assert firmware_models.verify_model_files("imu_cnn") == manifest


def test_manifest_describes_the_model(manifest, model):
    assert manifest["input_shape"] == [128, 6] and list(model.input_shape) == [128, 6]
    assert manifest["batch_size"] == model.batch_size == 32
    assert manifest["classes"] == ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"]
    assert manifest["num_classes"] == model.num_classes == 7
    assert [w["name"] for w in manifest["weights"]] == list(model.weight_names)
    for w in manifest["weights"]:
        assert tuple(w["shape"]) == model.weight_shapes[w["name"]] and w["dtype"] == "float32"
    sizes = sum(int(np.prod(w["shape"])) for w in manifest["weights"])
    assert manifest["parameter_count"] == sizes == model.parameter_count
    assert 10_000 <= sizes <= 40_000
    assert len(manifest["normalization"]["mean"]) == len(manifest["normalization"]["std"]) == 6
    assert all(s > 0 for s in manifest["normalization"]["std"])


def test_signatures_have_the_manifest_shapes(manifest, model):
    interp = model.interpreter
    keys = (*SIGNATURES, ANCHOR_SIGNATURE)
    assert set(interp.get_signature_list()) == set(keys) == set(manifest["signatures"])
    for key in keys:
        runner = interp.get_signature_runner(key)
        for side, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details())):
            expected = manifest["signatures"][key][side]
            assert set(details) == set(expected), (key, side)
            for name, d in details.items():
                assert list(d["shape"]) == expected[name]["shape"], (key, name)
                assert np.dtype(d["dtype"]).name == expected[name]["dtype"], (key, name)
    train = manifest["signatures"]["train"]
    assert train["inputs"]["x"]["shape"] == [32, 128, 6] and train["inputs"]["y"]["dtype"] == "int32"
    assert train["inputs"]["lr"]["shape"] == train["inputs"]["mu"]["shape"] == []
    assert train["outputs"]["loss"]["shape"] == train["outputs"]["proximal"]["shape"] == []
    assert manifest["signatures"]["set_anchor"]["inputs"] == manifest["signatures"]["set_weights"]["inputs"]


def test_weights_npz_is_what_get_weights_returns(model, manifest):
    init = _initial_weights()
    got = model.get_weights()
    assert list(init) == list(got) == [w["name"] for w in manifest["weights"]]
    for name in init:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], init[name])


def test_no_flex_or_custom_ops(manifest):
    data = MODEL.read_bytes()
    assert custom_ops(data) == [] and flex_ops(data) == []
    names = op_names(data)
    assert not any(n.startswith("Flex") for n in names)
    try:
        import ai_edge_litert.schema_py_generated  # noqa: F401  (op names come from LiteRT's schema)
    except ImportError:  # tflite-runtime ships no schema: builtin ops show as codes, one per manifest name
        assert len(names) == len(manifest["ops"])
    else:
        assert not any(n.startswith("BUILTIN_") for n in names)
        assert {"ASSIGN_VARIABLE", "READ_VARIABLE", "FULLY_CONNECTED"} <= set(names)
        assert names == manifest["ops"]
    # the primary subgraph seen by the interpreter agrees
    interp = TrainableModel(MODEL).interpreter
    interp.allocate_tensors()
    assert all(not op["op_name"].startswith("Flex") for op in interp._get_ops_details())


def test_op_code_reader_agrees_with_the_schema_and_catches_flex():
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    import flatbuffers

    data = MODEL.read_bytes()
    parsed = schema.Model.GetRootAs(data, 0)
    from_schema = [
        (max(parsed.OperatorCodes(i).BuiltinCode(), parsed.OperatorCodes(i).DeprecatedBuiltinCode()),
         parsed.OperatorCodes(i).CustomCode())
        for i in range(parsed.OperatorCodesLength())
    ]
    assert operator_codes(data) == [(c, n.decode() if n else None) for c, n in from_schema]

    # the same model with a Flex op code added must be caught
    tampered = schema.ModelT.InitFromObj(parsed)
    flex = schema.OperatorCodeT()
    flex.builtinCode = flex.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    flex.customCode = "FlexReluGrad"
    tampered.operatorCodes.append(flex)
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(tampered.Pack(builder), file_identifier=b"TFL3")
    bad = bytes(builder.Output())
    assert flex_ops(bad) == ["FlexReluGrad"] and custom_ops(bad) == ["FlexReluGrad"]
    with pytest.raises(ValueError, match="TFL3"):
        operator_codes(b"\x00" * 16)


# --------------------------------------------------------------- the runtime


def test_runtime_never_imports_tensorflow():
    code = (
        "import sys, numpy as np\n"
        "from firmware_models.runtime import TrainableModel\n"
        "import firmware_models.build, firmware_models.cli\n"
        "m = TrainableModel.from_package()\n"
        "x = np.random.default_rng(0).normal(size=(40, 128, 6)).astype(np.float32)\n"
        "m.train_step(x[:32], np.arange(32) % 7, 0.1); m.predict(x)\n"
        "print('tensorflow' in sys.modules, m.interpreter.__class__.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    tf_loaded, interp_module = out.stdout.split()
    assert tf_loaded == "False"
    assert interp_module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def test_package_import_is_stdlib_only():
    code = "import sys; before = set(sys.modules); import firmware_models; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    new = eval(out.stdout)  # a printed list of module names
    assert not any(m.split(".")[0] in ("numpy", "tensorflow", "ai_edge_litert", "tflite_runtime") for m in new)


def test_get_set_weights_round_trip(model):
    rng = np.random.default_rng(7)
    new = {n: rng.normal(size=s).astype(np.float32) for n, s in model.weight_shapes.items()}
    model.set_weights(new)
    got = model.get_weights()
    for n in new:
        np.testing.assert_array_equal(got[n], new[n])
    # get_weights hands out copies
    got["dense_b"][:] = 123.0
    assert not np.any(model.get_weights()["dense_b"] == 123.0)


def test_set_weights_rejects_bad_input_and_leaves_the_model_alone(model):
    before = model.get_weights()
    good = {n: v.copy() for n, v in before.items()}
    with pytest.raises(ValueError, match="missing"):
        model.set_weights({n: v for n, v in good.items() if n != "conv1_w"})
    with pytest.raises(ValueError, match="unexpected"):
        model.set_weights({**good, "extra": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        model.set_weights({**good, "dense_w": np.zeros((7, 64), np.float32)})
    nan = good["conv2_b"].copy()
    nan[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.set_weights({**good, "conv2_b": nan})
    after = model.get_weights()
    for n in before:
        np.testing.assert_array_equal(after[n], before[n])


def _reference_probs(weights: dict[str, np.ndarray], norm: dict, x: np.ndarray) -> np.ndarray:
    """The documented architecture in plain numpy (float64)."""

    def conv_same(h, k, b):
        kk = k.shape[0]
        left = (kk - 1) // 2
        hp = np.pad(h, ((0, 0), (left, kk - 1 - left), (0, 0)))
        return sum(hp[:, i : i + h.shape[1]] @ k[i] for i in range(kk)) + b

    def pool4(h):
        return h.reshape(h.shape[0], h.shape[1] // 4, 4, h.shape[2]).max(axis=2)

    w = {n: v.astype(np.float64) for n, v in weights.items()}
    h = (x.astype(np.float64) - np.array(norm["mean"])) / np.array(norm["std"])
    h = pool4(np.maximum(conv_same(h, w["conv1_w"], w["conv1_b"]), 0))
    h = pool4(np.maximum(conv_same(h, w["conv2_w"], w["conv2_b"]), 0))
    z = h.mean(axis=1) @ w["dense_w"] + w["dense_b"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_returns_probabilities_for_any_n(model, device, manifest):
    rng = np.random.default_rng(1)
    model.set_weights({n: rng.normal(scale=0.2, size=s).astype(np.float32) for n, s in model.weight_shapes.items()})
    x = device.x_test[:45]
    probs = model.predict(x)
    assert probs.shape == (45, 7) and probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, _reference_probs(model.get_weights(), manifest["normalization"], x), atol=1e-5)
    np.testing.assert_allclose(model.predict(x[40:41]), probs[40:41], atol=1e-6)
    assert model.predict(x[:0]).shape == (0, 7)
    with pytest.raises(ValueError):
        model.predict(np.zeros((3, 64, 6), np.float32))


def test_train_step_is_sgd_on_the_cross_entropy(model, device, manifest):
    """One step moves each weight by -lr * dLoss/dw (checked by finite differences)."""
    x, y = device.x_train[:32], device.y_train[:32]
    w0 = {n: v.astype(np.float64) for n, v in model.get_weights().items()}
    norm = manifest["normalization"]

    def loss(w):
        p = _reference_probs(w, norm, x)
        return -np.mean(np.log(p[np.arange(32), y]))

    lr = 1e-3
    reported = model.train_step(x, y, lr)
    assert reported == pytest.approx(loss(w0), rel=1e-4)
    w1 = model.get_weights()
    for name in ("conv1_w", "conv2_b", "dense_w", "dense_b"):
        step = (w0[name] - w1[name]) / lr
        idx = np.unravel_index(np.argmax(np.abs(step)), step.shape)
        plus = {n: v.copy() for n, v in w0.items()}
        minus = {n: v.copy() for n, v in w0.items()}
        plus[name][idx] += 1e-4
        minus[name][idx] -= 1e-4
        numeric = (loss(plus) - loss(minus)) / 2e-4
        assert step[idx] == pytest.approx(numeric, rel=2e-2, abs=1e-4), name
        assert abs(step[idx]) > 1e-3, name


def test_partial_batch_is_filled_by_repeating_its_examples(device):
    a, b = TrainableModel(MODEL), TrainableModel(MODEL)
    x, y = device.x_train[:5], device.y_train[:5]
    idx = np.arange(32) % 5
    assert a.train_step(x, y, 0.1) == pytest.approx(b.train_step(x[idx], y[idx], 0.1), abs=1e-6)
    for n, v in a.get_weights().items():
        np.testing.assert_allclose(v, b.get_weights()[n], atol=1e-6)
    with pytest.raises(ValueError):
        a.train_step(device.x_train[:33], device.y_train[:33], 0.1)
    with pytest.raises(ValueError):
        a.train_step(x, np.full(5, 7), 0.1)  # label out of range
    with pytest.raises(ValueError):
        a.train_epochs(x, y, epochs=1, batch_size=16)


def test_training_on_real_windows_learns(model, device):
    chance = 1.0 / 7
    loss0, acc0 = model.evaluate(device.x_test, device.y_test)
    losses = model.train_epochs(device.x_train, device.y_train, epochs=6, batch_size=32, lr=0.2, rng=0)
    loss1, acc1 = model.evaluate(device.x_test, device.y_test)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert loss1 < 0.5 * loss0
    assert acc1 > max(0.6, acc0 + 0.3) and acc1 > 3 * chance


def test_training_is_deterministic_given_the_rng(device):
    a, b = TrainableModel(MODEL), TrainableModel(MODEL)
    la = a.train_epochs(device.x_train[:100], device.y_train[:100], epochs=2, lr=0.2, rng=3)
    lb = b.train_epochs(device.x_train[:100], device.y_train[:100], epochs=2, lr=0.2, rng=np.random.default_rng(3))
    assert la == lb
    c = TrainableModel(MODEL)
    assert c.train_epochs(device.x_train[:100], device.y_train[:100], epochs=2, lr=0.2, rng=4) != la  # shuffled


def test_federated_averaging_over_five_subjects_beats_chance():
    """5 devices, 5 rounds of 2 local epochs, example-weighted FedAvg (the recommended settings)."""
    fleet = load_watch_devices([1, 2, 3, 4, 5])
    model = TrainableModel(MODEL)
    global_w = model.get_weights()
    x_test = np.concatenate([d.x_test for d in fleet])
    y_test = np.concatenate([d.y_test for d in fleet])
    accuracies = []
    for rnd in range(5):
        updates = []
        for i, dev in enumerate(fleet):
            model.set_weights(global_w)
            model.train_epochs(dev.x_train, dev.y_train, epochs=2, lr=0.2, rng=100 * rnd + i)
            updates.append((model.get_weights(), dev.num_train))
        total = sum(n for _, n in updates)
        global_w = {k: (sum(w[k].astype(np.float64) * n for w, n in updates) / total).astype(np.float32)
                    for k in global_w}
        model.set_weights(global_w)
        accuracies.append(model.evaluate(x_test, y_test)[1])
    assert accuracies[-1] >= 0.6, accuracies
    assert accuracies[-1] > accuracies[0]


# ------------------------------------------------------------ build and cli


def test_build_module_reproduces_the_weights_file_without_tensorflow(manifest):
    from firmware_models import build  # without TensorFlow: see test_runtime_never_imports_tensorflow

    init = build.initial_weights(manifest["num_classes"], seed=manifest["build"]["seed"])
    stored = _initial_weights()
    assert list(init) == list(stored)
    for n in init:
        np.testing.assert_array_equal(init[n], stored[n])
    blob = build.deterministic_npz(init)
    assert blob == build.deterministic_npz(init)
    assert hashlib.sha256(blob).hexdigest() == manifest["weights_sha256"]
    other = build.initial_weights(manifest["num_classes"], seed=manifest["build"]["seed"] + 1)
    assert not np.array_equal(other["conv1_w"], init["conv1_w"])


def test_cli_help_and_info(capsys):
    from firmware_models import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "build" in capsys.readouterr().out
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256_ok"] and info["weights_sha256_ok"] and info["parameter_count"] > 0
    assert cli.main(["info", "no_such_model"]) == 1


def test_cli_build_without_tensorflow_says_how_to_get_it(capsys, tmp_path):
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorFlow is installed here")
    from firmware_models import cli

    assert cli.main(["build", "--out", str(tmp_path)]) == 2
    assert "pip install .[build]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_interpreter_is_the_one_this_environment_promises():
    """`make test` runs these tests under LiteRT and again under tflite-runtime (numpy<2)."""
    import os

    from firmware_models.runtime import load_interpreter_class

    package = load_interpreter_class().__module__.split(".")[0]
    assert package == os.environ.get("STARLING_EXPECT_INTERPRETER", package)
    assert package in ("ai_edge_litert", "tflite_runtime")
    if package == "tflite_runtime":
        assert int(np.__version__.split(".")[0]) < 2  # tflite-runtime 2.14 is built against numpy 1.x
