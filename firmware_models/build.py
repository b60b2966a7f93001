"""Build the on-device trainable IMU model (`imu_cnn`) as a TFLite file.

Run at build time only, with TensorFlow installed (`pip install .[build]`):

    starling-models build [--out DIR] [--seed N]

TensorFlow is imported inside the functions that need it, never at module
import, so `starling-models --help` and `import firmware_models.build` work
on a device without it.

What comes out (in `out_dir`):
  * `model.tflite`: one model with four signatures sharing resource
    variables: `train` (one SGD step on a fixed batch of `BATCH_SIZE`),
    `infer` (logits and class probabilities), `get_weights` and
    `set_weights` (weights in and out as named float32 tensors).
  * `weights.npz`: the initial weights, exactly as `get_weights` returns
    them from the built model, written byte-for-byte deterministically.
  * `manifest.json`: digests, shapes, signatures, weight layout, the baked-in
    input normalization and how it was built.

Why the graph looks the way it does: the model must train under the plain
LiteRT / tflite-runtime interpreters with builtin ops only (no Flex / Select
TF ops, which are not in those wheels). Several standard TF ops have
gradients that only exist as Flex ops, so the graph avoids them:
  * ReLU is a `tf.custom_gradient` (`tf.nn.relu`'s gradient is `ReluGrad`);
  * Conv1D is a matmul over patches gathered with `tf.pad` + `tf.slice` +
    `tf.concat` (`tf.nn.conv1d`'s gradients are `Conv2DBackprop*`, and
    strided-slice gradients are `StridedSliceGrad`);
  * max pooling is reshape + `reduce_max` (`MaxPoolGrad` is Flex);
  * the cross-entropy is written out by hand with its gradient
    (softmax - one_hot) as a custom gradient;
  * weights move through `get_weights`/`set_weights` signatures instead of
    TF's Flex-only checkpoint save/restore ops.
After conversion the build lists every operator code in the flatbuffer and
refuses to write anything if a Flex (or any custom) op slipped in.

The per-channel input normalization ((x - mean) / std, computed from all
subjects' training windows of the watch data set) is a constant in the
graph, not a weight: it is part of the model's contract with the sensors and
federated averaging must never move it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from protocol.atomic import write_atomic

MODEL_NAME = "imu_cnn"
MODEL_VERSION = 1
"""Version of the model definition; bump when the graph or its contract changes."""

WINDOW = 128
CHANNELS = 6
BATCH_SIZE = 32
KERNEL = 5
FILTERS = (32, 64)
POOL = 4
SIGNATURE_KEYS = ("train", "infer", "get_weights", "set_weights")
TRAINING_DEFAULTS = {"lr": 0.2, "local_epochs": 2, "batch_size": BATCH_SIZE}
"""Recommended federated settings, measured on the watch data (5 subjects,
FedAvg over 5 rounds of 2 local epochs reaches ~0.79 pooled test accuracy)."""


def weight_layout(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the trainable weights, in the manifest's order.

    Names sort in this same order, so a sorted list of names is stable and
    equal to this one. Conv kernels are `[kernel, in_channels, filters]`.
    """
    f1, f2 = FILTERS
    return [
        ("conv1_b", (f1,)),
        ("conv1_w", (KERNEL, CHANNELS, f1)),
        ("conv2_b", (f2,)),
        ("conv2_w", (KERNEL, f1, f2)),
        ("dense_b", (num_classes,)),
        ("dense_w", (f2, num_classes)),
    ]


def initial_weights(num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic Glorot-uniform kernels and zero biases from `seed`.

    Uses numpy's PCG64 generator, so the same seed gives the same bytes on
    every machine and TensorFlow version.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in weight_layout(num_classes):
        if name.endswith("_b"):
            weights[name] = np.zeros(shape, dtype=np.float32)
            continue
        if len(shape) == 3:  # conv: receptive field = kernel size
            fan_in, fan_out = shape[0] * shape[1], shape[0] * shape[2]
        else:
            fan_in, fan_out = shape
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return weights


def normalization_stats() -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Class names, channel names and per-channel mean/std of the watch data's training part.

    Read straight from the data file in the `seglearn` wheel (located, not
    imported: importing seglearn pulls in pandas). The statistics cover the
    first 80% of every recording, the part the devices train on (their test
    windows come from the last 20%), so no test sample shapes the model.
    """
    import importlib.util

    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the watch data comes with seglearn: pip install seglearn (or .[build])")
    path = Path(spec.submodule_search_locations[0]) / "data" / "watch_dataset.npy"
    raw = np.load(path, allow_pickle=True).item()
    classes = [str(c) for c in raw["y_labels"]]
    channels = [str(c) for c in raw["X_labels"]]
    flat = np.concatenate([np.asarray(x, np.float64)[: int(len(x) * 0.8)] for x in raw["X"]])
    mean = flat.mean(axis=0).astype(np.float32)
    std = np.maximum(flat.std(axis=0), 1e-6).astype(np.float32)
    return classes, channels, mean, std


def _make_module(tf: Any, init: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray,
                 num_classes: int) -> Any:
    """The tf.Module whose four tf.functions become the TFLite signatures."""
    names = [name for name, _ in weight_layout(num_classes)]
    B, L, C = BATCH_SIZE, WINDOW, CHANNELS

    @tf.custom_gradient
    def relu(x):
        mask = tf.cast(x > 0.0, tf.float32)

        def grad(dy):
            return dy * mask

        return x * mask, grad

    @tf.custom_gradient
    def softmax_xent(logits, onehot):
        """Mean cross-entropy over the batch; gradient softmax - onehot."""
        shifted = logits - tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
        exp = tf.exp(shifted)
        total = tf.reduce_sum(exp, axis=1, keepdims=True)
        log_probs = shifted - tf.math.log(total)
        loss = -tf.reduce_mean(tf.reduce_sum(onehot * log_probs, axis=1))
        probs = exp / total

        def grad(dy):
            return dy * (probs - onehot) / float(B), tf.zeros_like(onehot)

        return loss, grad

    def conv1d_same(x, w, b):
        """'same'-padded stride-1 conv: gather K shifted views, one matmul."""
        k, cin, cout = w.shape
        length = x.shape[1]
        left = (k - 1) // 2
        xp = tf.pad(x, [[0, 0], [left, k - 1 - left], [0, 0]])
        cols = [tf.slice(xp, [0, i, 0], [B, length, cin]) for i in range(k)]
        patches = tf.reshape(tf.concat(cols, axis=2), [B * length, k * cin])
        y = tf.matmul(patches, tf.reshape(w, [k * cin, cout])) + b
        return tf.reshape(y, [B, length, cout])

    def max_pool(x):
        length, ch = x.shape[1], x.shape[2]
        return tf.reduce_max(tf.reshape(x, [B, length // POOL, POOL, ch]), axis=2)

    scale = tf.constant((1.0 / std).reshape(1, 1, C), tf.float32)
    shift = tf.constant((-mean / std).reshape(1, 1, C), tf.float32)

    x_spec = tf.TensorSpec([B, L, C], tf.float32, name="x")
    y_spec = tf.TensorSpec([B], tf.int32, name="y")
    lr_spec = tf.TensorSpec([], tf.float32, name="lr")
    w_specs = {n: tf.TensorSpec(init[n].shape, tf.float32, name=n) for n in names}

    class ImuCnn(tf.Module):
        def __init__(self):
            super().__init__(name=MODEL_NAME)
            self.w = {n: tf.Variable(init[n], name=n, dtype=tf.float32) for n in names}

        def forward(self, x):
            w = self.w
            h = x * scale + shift
            h = max_pool(relu(conv1d_same(h, w["conv1_w"], w["conv1_b"])))
            h = max_pool(relu(conv1d_same(h, w["conv2_w"], w["conv2_b"])))
            h = tf.reduce_mean(h, axis=1)
            return tf.matmul(h, w["dense_w"]) + w["dense_b"]

        @tf.function(input_signature=[x_spec, y_spec, lr_spec])
        def train(self, x, y, lr):
            variables = [self.w[n] for n in names]
            with tf.GradientTape() as tape:
                logits = self.forward(x)
                loss = softmax_xent(logits, tf.one_hot(y, num_classes, dtype=tf.float32))
            grads = tape.gradient(loss, variables)
            for var, g in zip(variables, grads, strict=True):
                var.assign_sub(lr * g)
            return {"loss": loss}

        @tf.function(input_signature=[x_spec])
        def infer(self, x):
            logits = self.forward(x)
            return {"logits": logits, "probs": tf.nn.softmax(logits, axis=-1)}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {n: tf.identity(self.w[n]) for n in names}

        @tf.function(input_signature=[w_specs])
        def set_weights(self, weights):
            for n in names:
                self.w[n].assign(weights[n])
            return {"ok": tf.constant(1, tf.int32)}

    return ImuCnn()


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


def deterministic_npz(arrays: dict[str, np.ndarray]) -> bytes:
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


def build(out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Build `model.tflite`, `weights.npz` and `manifest.json` into `out_dir`.

    Deterministic for a given seed and TensorFlow version. Refuses (raises
    RuntimeError) if the converted model holds any Flex/custom op or does not
    round-trip its own initial weights; nothing is written in that case.
    Returns the manifest.
    """
    try:
        import tensorflow as tf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building models needs TensorFlow: run `pip install .[build]` "
            "(devices only need the built .tflite files)"
        ) from exc

    from firmware_models.runtime import TrainableModel, custom_ops, op_names

    out_dir = Path(out_dir)
    classes, channels, mean, std = normalization_stats()
    num_classes = len(classes)
    init = initial_weights(num_classes, seed)

    workdir = Path(tempfile.mkdtemp(prefix="starling-build-"))
    try:
        module = _make_module(tf, init, mean, std, num_classes)
        model_bytes = _convert(tf, module, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    bad = custom_ops(model_bytes)
    if bad:
        raise RuntimeError(f"refusing to write {MODEL_NAME}: non-builtin ops {bad} (Flex is not allowed)")

    # Load with an interpreter and check the signatures and the initial weights.
    model = TrainableModel(model_content=model_bytes, interpreter_class=_interpreter_class(tf))
    if set(model.interpreter.get_signature_list()) != set(SIGNATURE_KEYS):
        raise RuntimeError(f"converted signatures {model.interpreter.get_signature_list()} != {SIGNATURE_KEYS}")
    weights = model.get_weights()
    for name, value in init.items():
        if not np.array_equal(weights[name], value):
            raise RuntimeError(f"get_weights()[{name!r}] differs from the initial weights")
    probs = model.predict(np.zeros((3, WINDOW, CHANNELS), np.float32))
    if probs.shape != (3, num_classes) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise RuntimeError("infer signature does not return probabilities")

    ordered = {name: weights[name] for name in model.weight_names}
    weights_bytes = deterministic_npz(ordered)
    manifest = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "file": "model.tflite",
        "weights_file": "weights.npz",
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "weights_sha256": hashlib.sha256(weights_bytes).hexdigest(),
        "model_bytes": len(model_bytes),
        "input_shape": [WINDOW, CHANNELS],
        "input_channels": channels,
        "sample_rate_hz": 50,
        "batch_size": BATCH_SIZE,
        "classes": classes,
        "num_classes": num_classes,
        "parameter_count": int(sum(v.size for v in ordered.values())),
        "signatures": _signature_table(model),
        "weights": [
            {"name": n, "shape": list(v.shape), "dtype": v.dtype.name} for n, v in ordered.items()
        ],
        "normalization": {
            "mean": [round(float(v), 7) for v in mean],
            "std": [round(float(v), 7) for v in std],
            "source": "watch data (seglearn wheel), first 80% of every recording, all 10 subjects",
        },
        "architecture": {
            "layers": [
                "normalize (x - mean) / std (constant)",
                f"conv1d k={KERNEL} same, {FILTERS[0]} filters, relu, maxpool {POOL}",
                f"conv1d k={KERNEL} same, {FILTERS[1]} filters, relu, maxpool {POOL}",
                "global average pool",
                f"dense {num_classes}, softmax",
            ],
            "loss": "mean softmax cross-entropy",
            "optimizer": "plain SGD in the train signature (w -= lr * grad)",
        },
        "training": dict(TRAINING_DEFAULTS),
        "ops": op_names(model_bytes, _tf_schema()),
        "build": {"tensorflow": tf.__version__, "numpy": np.__version__, "seed": int(seed)},
    }
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
    """An interpreter for the build-time check: LiteRT if present, else TF's own."""
    try:
        from firmware_models.runtime import load_interpreter_class

        return load_interpreter_class()
    except ImportError:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter
