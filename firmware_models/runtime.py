"""Run and train a built Starling model with a TFLite interpreter, no TensorFlow.

`TrainableModel` wraps a `.tflite` file written by `firmware_models.build`,
of any family (`firmware_models.families`): a classifier (`imu_cnn`,
`tabular_mlp`) or a reconstruction model (`imu_autoencoder`), told apart by
the outputs of its `infer` signature. The weights live in the interpreter as
resource variables shared by all signatures, so a `train` call changes what
`infer` and `get_weights` see. FedProx runs in the graph: see
`TrainableModel` for the anchor + mu API.

The interpreter comes from LiteRT (`ai_edge_litert`) when installed, else
from `tflite_runtime`; it is imported on first use, so importing this module
costs only numpy. Inference and training run on one thread (`num_threads=1`):
devices share their single spare core with the MQTT loop and sensors, and the
emulator runs many devices side by side.

The graph's batch size is fixed (32 for every family); see `train_step` and
`train_epochs` for how batches smaller than that are handled.

The module also has a tiny flatbuffer reader (`operator_codes`, `custom_ops`,
`op_names`) that lists every operator code in a model, across all of its
subgraphs, so tests and the build can prove there is no Flex op in a model
without TensorFlow.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

SIGNATURES = ("train", "infer", "get_weights", "set_weights")
"""Signatures every trainable model has."""
ANCHOR_SIGNATURE = "set_anchor"
"""The FedProx anchor's signature; models built before in-graph FedProx lack it (and `mu`)."""
CLASSIFICATION, RECONSTRUCTION = "classification", "reconstruction"
_CUSTOM = 32  # BuiltinOperator.CUSTOM in the TFLite schema


def load_interpreter_class() -> type:
    """Return the TFLite `Interpreter` class: LiteRT first, then tflite-runtime.

    Raises ImportError naming both packages when neither is installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    raise ImportError(
        "no TFLite interpreter found: install LiteRT (`pip install ai-edge-litert`) "
        "or tflite-runtime (`pip install tflite-runtime`)"
    )


# --------------------------------------------------------------------------
# Minimal flatbuffer reading of the TFLite schema: Model.operator_codes only.


def _field(buf: bytes, table: int, index: int) -> int | None:
    """Absolute offset of field `index` of the table at `table`, or None if absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vtable_size = struct.unpack_from("<H", buf, vtable)[0]
    entry = 4 + 2 * index
    if entry + 2 > vtable_size:
        return None
    rel = struct.unpack_from("<H", buf, vtable + entry)[0]
    return table + rel if rel else None


def _indirect(buf: bytes, offset: int) -> int:
    return offset + struct.unpack_from("<I", buf, offset)[0]


def operator_codes(model: bytes) -> list[tuple[int, str | None]]:
    """Every operator code of a `.tflite` model as `(builtin_code, custom_code)`.

    Operator codes are model-wide, so this covers every subgraph (every
    signature), unlike the interpreter's `_get_ops_details()` which only sees
    the primary subgraph. A custom op (Flex ones included) has builtin code
    32 and a `custom_code` string such as ``"FlexReluGrad"``.
    """
    buf = bytes(model)
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (missing the TFL3 identifier)")
    root = _indirect(buf, 0)
    codes_at = _field(buf, root, 1)  # Model.operator_codes
    if codes_at is None:
        return []
    vec = _indirect(buf, codes_at)
    count = struct.unpack_from("<I", buf, vec)[0]
    result = []
    for i in range(count):
        table = _indirect(buf, vec + 4 + 4 * i)
        deprecated = _field(buf, table, 0)
        custom = _field(buf, table, 1)
        builtin = _field(buf, table, 3)
        code = max(
            struct.unpack_from("<b", buf, deprecated)[0] if deprecated is not None else 0,
            struct.unpack_from("<i", buf, builtin)[0] if builtin is not None else 0,
        )
        name = None
        if custom is not None:
            start = _indirect(buf, custom)
            length = struct.unpack_from("<I", buf, start)[0]
            name = buf[start + 4 : start + 4 + length].decode("utf-8", "replace")
        result.append((code, name))
    return result


def custom_ops(model: bytes) -> list[str]:
    """Names of the model's custom ops (Flex ops are custom ops named ``Flex*``)."""
    return sorted(name or "<unnamed custom op>" for code, name in operator_codes(model)
                  if code == _CUSTOM or name is not None)


def flex_ops(model: bytes) -> list[str]:
    """Names of the model's Flex (Select TF) ops; empty for a builtin-only model."""
    return [name for name in custom_ops(model) if name.startswith("Flex")]


def op_names(model: bytes, schema: Any = None) -> list[str]:
    """Sorted names of the model's operator codes (e.g. ``FULLY_CONNECTED``).

    Names come from `schema` (a generated TFLite schema module, such as
    TensorFlow's ``tensorflow.lite.python.schema_py_generated``) or, by
    default, from the one shipped with LiteRT when it can be imported;
    without either, builtin ops are shown as ``BUILTIN_<code>``.
    """
    names: dict[int, str] = {}
    try:
        if schema is None:
            from ai_edge_litert import schema_py_generated as schema

        names = {v: k for k, v in vars(schema.BuiltinOperator).items()
                 if not k.startswith("_") and isinstance(v, int)}
    except Exception:  # noqa: BLE001 - names are cosmetic
        pass
    out = set()
    for code, custom in operator_codes(model):
        if custom is not None:
            out.add(custom)
        else:
            out.add(names.get(code, f"BUILTIN_{code}"))
    return sorted(out)


# --------------------------------------------------------------------------


class TrainableModel:
    """A built Starling model: train it, run it, move its weights and its FedProx anchor.

    Args:
      model_path: path of the `.tflite` file (or pass `model_content`).
      model_content: the model's bytes.
      num_threads: interpreter threads; 1 by default (see the module doc).
      interpreter_class: an `Interpreter` class to use instead of LiteRT /
        tflite-runtime (the build passes TensorFlow's own for its checks).
      manifest: the model's manifest, if known (`from_package` passes it);
        its `task` must agree with the signatures.

    The task (`task`) comes from the `infer` signature's outputs:
      * "classification": `train_step(x, y, lr)` with integer labels,
        `predict` gives class probabilities, `evaluate` gives (loss, accuracy);
      * "reconstruction": `train_step(x, None, lr)` (labels are ignored),
        `predict` gives the reconstruction in input units and
        `reconstruction_error` the per-example anomaly score.
    `metrics(x, y)` works for both (a dict of finite floats).

    FedProx (models with a `set_anchor` signature; `supports_proximal`):
        model.set_weights(global_weights)     # the round's starting point
        model.set_anchor()                    # anchor := current weights (or pass a dict)
        model.train_step(x, y, lr, mu=0.01)   # w -= lr * (grad + mu * (w - anchor))
    `lr` and `mu` are inputs of every step; mu=0 (the default) is plain SGD,
    whatever the anchor. The anchor stays until the next `set_anchor`;
    `set_weights` does not move it. This is the same update as the numpy
    step "w_after_sgd - lr * mu * (w_before - anchor)".

    Not thread-safe: one interpreter, one caller at a time.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_content: bytes | None = None,
        num_threads: int = 1,
        interpreter_class: type | None = None,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if (model_path is None) == (model_content is None):
            raise ValueError("give exactly one of model_path or model_content")
        cls = interpreter_class or load_interpreter_class()
        if model_path is not None:
            self.interpreter = cls(model_path=str(model_path), num_threads=num_threads)
        else:
            self.interpreter = cls(model_content=bytes(model_content), num_threads=num_threads)
        available = self.interpreter.get_signature_list()
        missing = [s for s in SIGNATURES if s not in available]
        if missing:
            raise ValueError(f"model lacks signature(s) {missing}; it has {sorted(available)}")
        keys = SIGNATURES + ((ANCHOR_SIGNATURE,) if ANCHOR_SIGNATURE in available else ())
        self._runners = {s: self.interpreter.get_signature_runner(s) for s in keys}

        train_in = self._runners["train"].get_input_details()
        x_shape = tuple(int(d) for d in train_in["x"]["shape"])
        self._batch_size = x_shape[0]
        self._input_shape = x_shape[1:]
        self._has_mu = "mu" in train_in and ANCHOR_SIGNATURE in self._runners
        self._takes_labels = "y" in train_in
        infer_out = self._runners["infer"].get_output_details()
        if "probs" in infer_out:
            self._task = CLASSIFICATION
            self._num_classes = int(infer_out["probs"]["shape"][-1])
        elif "reconstruction" in infer_out and "error" in infer_out:
            self._task = RECONSTRUCTION
            self._num_classes = 0
        else:
            raise ValueError(f"infer outputs {sorted(infer_out)} are neither probs nor reconstruction + error")
        if manifest is not None and manifest.get("task", CLASSIFICATION) != self._task:
            raise ValueError(f"manifest says task {manifest.get('task')!r}, the model's signatures say {self._task!r}")
        self.manifest = dict(manifest) if manifest is not None else None
        set_in = self._runners["set_weights"].get_input_details()
        self._weight_shapes = {
            name: tuple(int(d) for d in set_in[name]["shape"]) for name in sorted(set_in)
        }
        self._weight_names = tuple(sorted(self._weight_shapes))

    @classmethod
    def from_package(cls, name: str = "imu_cnn", **kwargs: Any) -> TrainableModel:
        """Load a model shipped in the `firmware_models` package by name (with its manifest)."""
        from firmware_models import load_manifest, model_dir

        manifest = load_manifest(name)
        return cls(model_dir(name) / manifest.get("file", "model.tflite"), manifest=manifest, **kwargs)

    # ------------------------------------------------------------------ facts

    @property
    def task(self) -> str:
        """"classification" or "reconstruction"."""
        return self._task

    @property
    def batch_size(self) -> int:
        """The batch size fixed in the graph (every `train`/`infer` call uses it)."""
        return self._batch_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(128, 6)`` or ``(24,)``."""
        return self._input_shape

    @property
    def num_classes(self) -> int:
        """Number of classes of a classifier; 0 for a reconstruction model."""
        return self._num_classes

    @property
    def supports_proximal(self) -> bool:
        """True when FedProx runs in the graph (`set_anchor` and a `mu` input to `train`)."""
        return self._has_mu

    @property
    def weight_names(self) -> tuple[str, ...]:
        """Weight names in a stable (sorted) order."""
        return self._weight_names

    @property
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._weight_shapes)

    @property
    def parameter_count(self) -> int:
        return int(sum(int(np.prod(s)) for s in self._weight_shapes.values()))

    # ---------------------------------------------------------------- weights

    def get_weights(self) -> dict[str, np.ndarray]:
        """A copy of the current weights, float32, keyed by name in `weight_names` order."""
        out = self._runners["get_weights"]()
        return {n: np.array(out[n], dtype=np.float32, copy=True) for n in self._weight_names}

    def _checked(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = set(weights)
        expected = set(self._weight_names)
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise ValueError(f"weight names do not match the model: missing {missing}, unexpected {extra}")
        arrays = {}
        for name in self._weight_names:
            value = np.asarray(weights[name])
            if value.shape != self._weight_shapes[name]:
                raise ValueError(
                    f"weight {name!r} has shape {value.shape}, the model needs {self._weight_shapes[name]}"
                )
            if not np.issubdtype(value.dtype, np.floating) and not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"weight {name!r} has non-numeric dtype {value.dtype}")
            value = np.ascontiguousarray(value, dtype=np.float32)
            if not np.all(np.isfinite(value)):
                raise ValueError(f"weight {name!r} has non-finite values")
            arrays[name] = value
        return arrays

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all weights. Names must match exactly, shapes too, values finite.

        Raises ValueError (naming the problem) before touching the model.
        The FedProx anchor is not changed (see `set_anchor`).
        """
        self._runners["set_weights"](**self._checked(weights))

    def set_anchor(self, weights: Mapping[str, np.ndarray] | None = None) -> None:
        """Set the FedProx anchor: `weights` (same checks as `set_weights`), or the current weights if None.

        Set it once per round to the round's global weights; `train_step`'s
        `mu` then pulls the weights towards it.
        """
        if not self._has_mu:
            raise ValueError("this model has no in-graph proximal term (built before set_anchor); rebuild it")
        arrays = self._checked(weights) if weights is not None else self.get_weights()
        self._runners[ANCHOR_SIGNATURE](**arrays)

    # --------------------------------------------------------------- training

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1 + len(self._input_shape) or x.shape[1:] != self._input_shape:
            raise ValueError(f"x must be [n, {', '.join(map(str, self._input_shape))}], got {list(x.shape)}")
        return x

    def _check_xy(self, x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        x = self._check_x(x)
        if y is None or self._task == RECONSTRUCTION:
            return x, None
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must be [{x.shape[0]}] to match x, got {list(y.shape)}")
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= self._num_classes):
            raise ValueError(f"y must hold integer class indices in [0, {self._num_classes})")
        return x, y.astype(np.int32)

    def train_step(self, x: np.ndarray, y: np.ndarray | None, lr: float, mu: float = 0.0) -> float:
        """One SGD step on one batch; returns the batch's mean data loss before the step.

        `x` holds 1..`batch_size` examples; `y` their labels (a classifier
        needs them; a reconstruction model ignores them, pass None). `lr` is
        the step size and `mu` the FedProx strength, both per call: the step
        is ``w -= lr * (grad + mu * (w - anchor))`` (see `set_anchor`).

        A batch smaller than the graph's fixed batch is filled by repeating
        its own examples cyclically (example i goes to slot i, i + n, ...),
        so the step only ever sees real data; those examples weigh a little
        more in that step.
        """
        x, y = self._check_xy(x, y)
        if self._task == CLASSIFICATION and y is None:
            raise ValueError("a classifier's train_step needs labels y")
        n = x.shape[0]
        if not 1 <= n <= self._batch_size:
            raise ValueError(f"train_step takes 1..{self._batch_size} examples, got {n} (use train_epochs)")
        lr, mu = float(lr), float(mu)
        if not np.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not np.isfinite(mu) or mu < 0:
            raise ValueError(f"mu must be a finite number >= 0, got {mu}")
        if mu and not self._has_mu:
            raise ValueError("this model has no in-graph proximal term (built before set_anchor); rebuild it")
        if n < self._batch_size:
            idx = np.arange(self._batch_size) % n
            x = x[idx]
            y = y[idx] if y is not None else None
        inputs: dict[str, Any] = {"x": x, "lr": np.float32(lr)}
        if self._takes_labels:
            inputs["y"] = y
        if self._has_mu:
            inputs["mu"] = np.float32(mu)
        return float(self._runners["train"](**inputs)["loss"])

    def train_epochs(
        self,
        x: np.ndarray,
        y: np.ndarray | None,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.2,
        rng: np.random.Generator | int | None = None,
        mu: float = 0.0,
    ) -> list[float]:
        """Train `epochs` shuffled passes over (x, y); returns each epoch's mean batch loss.

        Each epoch draws a fresh permutation from `rng` and cuts it into full
        batches; the last partial batch is completed with the first examples
        of the same permutation (wrap-around), so every example is used at
        least once per epoch and every step is a full, real-data batch.
        `batch_size` must equal the graph's fixed batch size (it is a
        parameter only so that callers state what they assume). `mu` is the
        FedProx strength of every step (set the anchor first).
        """
        x, y = self._check_xy(x, y)
        if batch_size != self._batch_size:
            raise ValueError(f"this model's batch size is fixed at {self._batch_size} in the graph, got {batch_size}")
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        n = x.shape[0]
        if n == 0:
            raise ValueError("no training examples")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        bs = self._batch_size
        steps = -(-n // bs)
        losses = []
        for _ in range(epochs):
            order = rng.permutation(n)
            order = np.resize(order, steps * bs) if n >= bs else order
            epoch = []
            for s in range(steps):
                idx = order[s * bs : (s + 1) * bs]
                epoch.append(self.train_step(x[idx], y[idx] if y is not None else None, lr, mu))
            losses.append(float(np.mean(epoch)))
        return losses

    # -------------------------------------------------------------- inference

    def _infer(self, x: np.ndarray, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """Output `key` of `infer` for every example, run in zero-padded full batches."""
        n, bs = x.shape[0], self._batch_size
        out = np.empty((n, *shape), dtype=np.float32)
        for start in range(0, n, bs):
            chunk = x[start : start + bs]
            m = chunk.shape[0]
            if m < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - m,) + self._input_shape, np.float32)])
            out[start : start + m] = self._runners["infer"](x=chunk)[key][:m]
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """For any n (0 included): class probabilities `[n, num_classes]` of a classifier,
        the reconstruction `[n, *input_shape]` (input units) of a reconstruction model. float32.

        Runs full batches; the last partial one is zero-padded and the padding
        rows are dropped from the result.
        """
        x = self._check_x(x)
        if self._task == CLASSIFICATION:
            return self._infer(x, "probs", (self._num_classes,))
        return self._infer(x, "reconstruction", self._input_shape)

    def reconstruction_error(self, x: np.ndarray) -> np.ndarray:
        """Per-example mean squared reconstruction error (normalized units), float32 `[n]`: the anomaly score."""
        if self._task != RECONSTRUCTION:
            raise ValueError("reconstruction_error needs a reconstruction model; this one is a classifier")
        return self._infer(self._check_x(x), "error", ())

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """A classifier's mean cross-entropy loss and accuracy over (x, y) (see `metrics` for any task)."""
        if self._task != CLASSIFICATION:
            raise ValueError("evaluate needs a classifier; use metrics() for a reconstruction model")
        x, y = self._check_xy(x, y)
        if y is None:
            raise ValueError("evaluate needs labels y")
        if x.shape[0] == 0:
            raise ValueError("no evaluation examples")
        probs = self.predict(x)
        picked = probs[np.arange(y.shape[0]), y].astype(np.float64)
        loss = float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
        accuracy = float(np.mean(np.argmax(probs, axis=1) == y))
        return loss, accuracy

    def metrics(self, x: np.ndarray, y: np.ndarray | None = None) -> dict[str, float]:
        """Finite evaluation figures for any task.

        Classifier: ``{"loss", "accuracy"}`` (needs y). Reconstruction model:
        ``{"loss"}`` = mean reconstruction error, ``"error_p95"`` = its 95th
        percentile over the examples (labels ignored).
        """
        if self._task == CLASSIFICATION:
            loss, accuracy = self.evaluate(x, y)
            return {"loss": loss, "accuracy": accuracy}
        x = self._check_x(x)
        if x.shape[0] == 0:
            raise ValueError("no evaluation examples")
        err = self.reconstruction_error(x).astype(np.float64)
        return {"loss": float(err.mean()), "error_p95": float(np.percentile(err, 95))}
