"""Build a model family into a trainable `.tflite` with its weights and manifest (TensorFlow).

Run at build time only, with TensorFlow installed (`pip install .[build]`):

    starling-models build [--family imu_cnn|tabular_mlp|imu_autoencoder]
                          [--classes N] [--features N] [--hidden 32,32] [--code N]
                          [--normalization DATA.npz] [--seed N] [--out DIR]

TensorFlow is imported inside the functions that need it, never at module
import, so `starling-models --help` and `import firmware_models.build` work
on a device without it.

What comes out (in `out_dir`, by default the package folder named after the
family):
  * `model.tflite`: the signatures described in `firmware_models.trainable`
    (`train` with per-call `lr` and FedProx `mu`, `infer`, `get_weights`,
    `set_weights`, `set_anchor`), builtin ops only;
  * `weights.npz`: the initial weights, exactly as `get_weights` returns
    them from the built model, written byte-for-byte deterministically;
  * `manifest.json`: digests, shapes, signatures, weight layout, task, the
    baked-in input normalization, and the build inputs (family, options,
    seed, normalization source, TensorFlow and numpy versions, the command).

A build is reproducible: the same inputs with the same TensorFlow version
give byte-identical files (the tests rebuild the committed models and
compare). After conversion the build lists every operator code in the
flatbuffer and refuses to write anything if a Flex (or any custom) op
slipped in; see `firmware_models.layers` for how the graphs avoid them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from firmware_models import families
from firmware_models.family import CLASSIFICATION, Family
from firmware_models.trainable import SIGNATURE_KEYS
from protocol.atomic import write_atomic

# The imu_cnn constants and helpers the first version of this module had.
MODEL_NAME = "imu_cnn"
MODEL_VERSION = families.IMU_CNN.version
WINDOW, CHANNELS, BATCH_SIZE = 128, 6, 32
TRAINING_DEFAULTS = dict(families.IMU_CNN.training_defaults)


def weight_layout(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """imu_cnn's weight names and shapes (sorted), for `num_classes` classes."""
    return families.IMU_CNN.weight_layout({"classes": num_classes})


def initial_weights(num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """imu_cnn's deterministic initial weights (Glorot-uniform kernels, zero biases)."""
    return families.IMU_CNN.initial_weights({"classes": num_classes}, seed)


def deterministic_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed `.npz` whose bytes depend only on the arrays.

    `np.savez` stamps the current time into the zip entries; this writes the
    same layout (one `.npy` per key) with a fixed timestamp and key order.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in arrays:
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def load_array_file(path: str | Path, keys: tuple[str, ...] = ("x", "X", "x_train")) -> np.ndarray:
    """The first of `keys` in an `.npz` (or the array of a `.npy`), as float32."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        if isinstance(data, np.ndarray):
            return data.astype(np.float32)
        for key in keys:
            if key in data.files:
                return np.asarray(data[key], np.float32)
        raise ValueError(f"{path} has none of the arrays {list(keys)} (it has {data.files})")


def normalization_from_file(path: str | Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (last axis) mean and std of the examples in a data file."""
    x = load_array_file(path)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{path}: examples are {list(x.shape[1:])}, the model takes {list(input_shape)}")
    flat = x.reshape(-1, input_shape[-1]).astype(np.float64)
    return flat.mean(axis=0).astype(np.float32), np.maximum(flat.std(axis=0), 1e-6).astype(np.float32)


def build_command(family: str, opts: Mapping[str, Any], seed: int, normalization: str | None) -> str:
    """The `starling-models build` command line for these inputs (recorded in the manifest)."""
    args = ["starling-models", "build", "--family", family, "--seed", str(seed)]
    for key, value in opts.items():
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        args += [f"--{key}", text]
    if normalization:
        args += ["--normalization", normalization]
    return shlex.join(args)


def _convert(tf: Any, module: Any, workdir: Path) -> bytes:
    saved = workdir / "saved_model"
    tf.saved_model.save(
        module, str(saved),
        signatures={k: getattr(module, k).get_concrete_function() for k in SIGNATURE_KEYS},
    )
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=list(SIGNATURE_KEYS))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_enable_resource_variables = True
    return converter.convert()


def _signature_table(model: Any) -> dict[str, Any]:
    table = {}
    for key in SIGNATURE_KEYS:
        runner = model.interpreter.get_signature_runner(key)

        def describe(details: dict[str, dict]) -> dict[str, Any]:
            return {
                n: {"shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
                for n, d in sorted(details.items())
            }

        table[key] = {"inputs": describe(runner.get_input_details()),
                      "outputs": describe(runner.get_output_details())}
    return table


def _exact(values: np.ndarray) -> list[float]:
    """float32 values as JSON numbers that read back to the same float32."""
    return [float(v) for v in np.asarray(values, np.float32)]


def _check_model(model: Any, family: Family, opts: Mapping[str, Any], init: Mapping[str, np.ndarray]) -> None:
    if set(model.interpreter.get_signature_list()) != set(SIGNATURE_KEYS):
        raise RuntimeError(f"converted signatures {model.interpreter.get_signature_list()} != {SIGNATURE_KEYS}")
    weights = model.get_weights()
    for name, value in init.items():
        if not np.array_equal(weights[name], value):
            raise RuntimeError(f"get_weights()[{name!r}] differs from the initial weights")
    x = np.zeros((3, *family.input_shape(opts)), np.float32)
    if family.task == CLASSIFICATION:
        probs = model.predict(x)
        if probs.shape != (3, family.num_classes(opts)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
            raise RuntimeError("infer signature does not return probabilities")
    else:
        if model.predict(x).shape != x.shape or model.reconstruction_error(x).shape != (3,):
            raise RuntimeError("infer signature does not return a reconstruction and an error per example")


def build(out_dir: str | Path | None = None, seed: int = 0, family: str = MODEL_NAME,
          options: Mapping[str, Any] | None = None, normalization: str | Path | None = None) -> dict[str, Any]:
    """Build `model.tflite`, `weights.npz` and `manifest.json` of `family` into `out_dir`.

    `options` override the family's build options (e.g. ``{"classes": 5}``);
    `normalization` is a data file (`.npz` with `x`, `X` or `x_train`) whose
    per-channel mean/std replace the family's default. Deterministic for the
    same inputs and TensorFlow version. Raises RuntimeError, writing
    nothing, if the converted model holds any Flex/custom op or does not
    round-trip its own initial weights. Returns the manifest.
    """
    try:
        import tensorflow as tf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building models needs TensorFlow: run `pip install .[build]` "
            "(devices only need the built .tflite files)"
        ) from exc

    from firmware_models import model_dir
    from firmware_models.runtime import TrainableModel, custom_ops, op_names
    from firmware_models.trainable import make_module

    fam = families.get(family)
    opts = fam.options(options)
    out_dir = Path(out_dir) if out_dir is not None else model_dir(fam.name)
    input_shape = fam.input_shape(opts)
    if normalization is not None:
        mean, std = normalization_from_file(normalization, input_shape)
        norm_source = f"per-channel statistics of {Path(normalization).name}"
        norm_input = {"file": Path(normalization).name,
                      "sha256": hashlib.sha256(Path(normalization).read_bytes()).hexdigest()}
    else:
        mean, std, norm_source = fam.default_normalization(opts)
        norm_input = {"default": norm_source}
    init = fam.initial_weights(opts, seed)

    workdir = Path(tempfile.mkdtemp(prefix="starling-build-"))
    try:
        model_bytes = _convert(tf, make_module(fam, opts, init, mean, std), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    bad = custom_ops(model_bytes)
    if bad:
        raise RuntimeError(f"refusing to write {fam.name}: non-builtin ops {bad} (Flex is not allowed)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TF's own interpreter (no LiteRT here) warns that it is deprecated
        model = TrainableModel(model_content=model_bytes, interpreter_class=_interpreter_class(tf))
    _check_model(model, fam, opts, init)

    weights = model.get_weights()
    ordered = {name: weights[name] for name in model.weight_names}
    weights_bytes = deterministic_npz(ordered)
    manifest: dict[str, Any] = {
        "name": fam.name,
        "family": fam.name,
        "task": fam.task,
        "version": fam.version,
        "file": "model.tflite",
        "weights_file": "weights.npz",
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "weights_sha256": hashlib.sha256(weights_bytes).hexdigest(),
        "model_bytes": len(model_bytes),
        "input_shape": list(input_shape),
        "input_channels": fam.input_names(opts),
    }
    if len(input_shape) == 2:
        manifest["sample_rate_hz"] = 50
    manifest.update({
        "batch_size": fam.batch_size,
        "classes": fam.class_names(opts),
        "num_classes": fam.num_classes(opts),
        "parameter_count": int(sum(v.size for v in ordered.values())),
        "signatures": _signature_table(model),
        "weights": [{"name": n, "shape": list(v.shape), "dtype": v.dtype.name} for n, v in ordered.items()],
        "normalization": {"mean": _exact(mean), "std": _exact(std), "source": norm_source},
        "architecture": fam.architecture(opts),
        "training": dict(fam.training_defaults),
        "ops": op_names(model_bytes, _tf_schema()),
        "build": {
            "family": fam.name,
            "options": opts,
            "seed": int(seed),
            "normalization": norm_input,
            "tensorflow": tf.__version__,
            "numpy": np.__version__,
            "command": build_command(fam.name, opts, seed, norm_input.get("file")),
        },
    })
    write_atomic(out_dir / "model.tflite", model_bytes)
    write_atomic(out_dir / "weights.npz", weights_bytes)
    write_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _tf_schema() -> Any:
    """TensorFlow's generated TFLite schema module (for op names), or None."""
    try:
        from tensorflow.lite.python import schema_py_generated

        return schema_py_generated
    except ImportError:
        return None


def _interpreter_class(tf: Any) -> type:
    """An interpreter for the build-time checks: LiteRT if present, else TF's own."""
    try:
        from firmware_models.runtime import load_interpreter_class

        return load_interpreter_class()
    except ImportError:
        return tf.lite.Interpreter
