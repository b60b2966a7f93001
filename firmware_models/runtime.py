"""Run and train a built Starling model with a TFLite interpreter, no TensorFlow.

`TrainableModel` wraps a `.tflite` file that has the four signatures written
by `firmware_models.build`: `train`, `infer`, `get_weights`, `set_weights`.
The weights live in the interpreter as resource variables shared by all four
signatures, so a `train` call changes what `infer` and `get_weights` see.

The interpreter comes from LiteRT (`ai_edge_litert`) when installed, else
from `tflite_runtime`; it is imported on first use, so importing this module
costs only numpy. Inference and training run on one thread (`num_threads=1`):
devices share their single spare core with the MQTT loop and sensors, and the
emulator runs many devices side by side.

The graph's batch size is fixed (32 for `imu_cnn`); see `train_step` and
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
    """A TFLite model with `train`/`infer`/`get_weights`/`set_weights` signatures.

    Args:
      model_path: path of the `.tflite` file (or pass `model_content`).
      model_content: the model's bytes.
      num_threads: interpreter threads; 1 by default (see the module doc).
      interpreter_class: an `Interpreter` class to use instead of LiteRT /
        tflite-runtime (the build passes TensorFlow's own for its checks).

    Not thread-safe: one interpreter, one caller at a time.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_content: bytes | None = None,
        num_threads: int = 1,
        interpreter_class: type | None = None,
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
        self._runners = {s: self.interpreter.get_signature_runner(s) for s in SIGNATURES}

        train_in = self._runners["train"].get_input_details()
        x_shape = tuple(int(d) for d in train_in["x"]["shape"])
        self._batch_size = x_shape[0]
        self._input_shape = x_shape[1:]
        infer_out = self._runners["infer"].get_output_details()
        self._num_classes = int(infer_out["probs"]["shape"][-1])
        set_in = self._runners["set_weights"].get_input_details()
        self._weight_shapes = {
            name: tuple(int(d) for d in set_in[name]["shape"]) for name in sorted(set_in)
        }
        self._weight_names = tuple(sorted(self._weight_shapes))

    @classmethod
    def from_package(cls, name: str = "imu_cnn", **kwargs: Any) -> TrainableModel:
        """Load a model shipped in the `firmware_models` package by name."""
        from firmware_models import model_dir

        return cls(model_dir(name) / "model.tflite", **kwargs)

    # ------------------------------------------------------------------ facts

    @property
    def batch_size(self) -> int:
        """The batch size fixed in the graph (every `train`/`infer` call uses it)."""
        return self._batch_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(128, 6)``."""
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

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

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all weights. Names must match exactly, shapes too, values finite.

        Raises ValueError (naming the problem) before touching the model.
        """
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
        self._runners["set_weights"](**arrays)

    # --------------------------------------------------------------- training

    def _check_xy(self, x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1 + len(self._input_shape) or x.shape[1:] != self._input_shape:
            raise ValueError(f"x must be [n, {', '.join(map(str, self._input_shape))}], got {list(x.shape)}")
        if y is None:
            return x, None
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must be [{x.shape[0]}] to match x, got {list(y.shape)}")
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= self._num_classes):
            raise ValueError(f"y must hold integer class indices in [0, {self._num_classes})")
        return x, y.astype(np.int32)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One SGD step on one batch; returns the batch's mean loss before the step.

        `x` holds 1..`batch_size` examples. A batch smaller than the graph's
        fixed batch is filled by repeating its own examples cyclically
        (example i goes to slot i, i + n, i + 2n, ...), so the step only ever
        sees real data; those examples weigh a little more in that step.
        """
        x, y = self._check_xy(x, y)
        n = x.shape[0]
        if not 1 <= n <= self._batch_size:
            raise ValueError(f"train_step takes 1..{self._batch_size} examples, got {n} (use train_epochs)")
        lr = float(lr)
        if not np.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if n < self._batch_size:
            idx = np.arange(self._batch_size) % n
            x, y = x[idx], y[idx]
        out = self._runners["train"](x=x, y=y, lr=np.float32(lr))
        return float(out["loss"])

    def train_epochs(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.2,
        rng: np.random.Generator | int | None = None,
    ) -> list[float]:
        """Train `epochs` shuffled passes over (x, y); returns each epoch's mean batch loss.

        Each epoch draws a fresh permutation from `rng` and cuts it into full
        batches; the last partial batch is completed with the first examples
        of the same permutation (wrap-around), so every example is used at
        least once per epoch and every step is a full, real-data batch.
        `batch_size` must equal the graph's fixed batch size (it is a
        parameter only so that callers state what they assume).
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
            epoch = [self.train_step(x[order[s * bs : (s + 1) * bs]], y[order[s * bs : (s + 1) * bs]], lr)
                     for s in range(steps)]
            losses.append(float(np.mean(epoch)))
        return losses

    # -------------------------------------------------------------- inference

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 `[n, num_classes]`, for any n (0 included).

        Runs full batches; the last partial one is zero-padded and the padding
        rows are dropped from the result.
        """
        x, _ = self._check_xy(x, None)
        n, bs = x.shape[0], self._batch_size
        out = np.empty((n, self._num_classes), dtype=np.float32)
        for start in range(0, n, bs):
            chunk = x[start : start + bs]
            m = chunk.shape[0]
            if m < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - m,) + self._input_shape, np.float32)])
            out[start : start + m] = self._runners["infer"](x=chunk)["probs"][:m]
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy loss and accuracy over (x, y)."""
        x, y = self._check_xy(x, y)
        if x.shape[0] == 0:
            raise ValueError("no evaluation examples")
        probs = self.predict(x)
        picked = probs[np.arange(y.shape[0]), y].astype(np.float64)
        loss = float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
        accuracy = float(np.mean(np.argmax(probs, axis=1) == y))
        return loss, accuracy
