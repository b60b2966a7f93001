"""What a model family is: the shared shape of `imu_cnn`, `tabular_mlp` and `imu_autoencoder`.

A family knows its build options, input shape, weight layout and initial
weights (numpy only), its default input normalization and reference data,
and two forward passes written with TensorFlow at build time:

  * `forward`, for the on-device trainable graph: only ops whose gradients
    are TFLite builtins (see `firmware_models.layers`), at a fixed batch;
  * `mcu_forward`, for the inference-only microcontroller export: ordinary
    ops TFLite Micro has int8 kernels for (CONV_2D, MAX_POOL_2D, ...), batch 1.

Both take the weights as a dict of tensors and the already normalized input,
so the graph around them (normalization, loss, SGD with the proximal term,
signatures; see `firmware_models.trainable` and `firmware_models.mcu`) is the
same for every family. This module imports only numpy: a device can list
the families and their weight layouts without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

CLASSIFICATION = "classification"
RECONSTRUCTION = "reconstruction"
TASKS = (CLASSIFICATION, RECONSTRUCTION)


def glorot_weights(layout: list[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels and zero biases (names ending `_b`), drawn in layout order.

    Uses numpy's PCG64 generator, so a seed gives the same bytes on every
    machine and TensorFlow version. A 3-d kernel is a conv `[k, in, out]`
    whose fans count the kernel taps.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in layout:
        if name.endswith("_b"):
            weights[name] = np.zeros(shape, dtype=np.float32)
            continue
        if len(shape) == 3:
            fan_in, fan_out = shape[0] * shape[1], shape[0] * shape[2]
        else:
            fan_in, fan_out = shape
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return weights


class Family:
    """Base class of a model family; subclasses fill in the class attributes and methods."""

    name: str = ""
    task: str = CLASSIFICATION
    version: int = 1
    """Version of the family's graph and contract; bump when either changes."""
    batch_size: int = 32
    option_defaults: Mapping[str, Any] = {}
    training_defaults: Mapping[str, Any] = {}

    # ------------------------------------------------------------- options

    def options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The full, validated build options: defaults overridden by `given` (None values ignored)."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = sorted(set(given) - set(self.option_defaults))
        if unknown:
            raise ValueError(f"{self.name} has no build option(s) {unknown}; it takes {sorted(self.option_defaults)}")
        opts = {**self.option_defaults, **given}
        self._check(opts)
        return opts

    def _check(self, opts: dict[str, Any]) -> None:
        """Raise ValueError for options the family cannot build."""

    # ---------------------------------------------------- shapes and weights

    def input_shape(self, opts: Mapping[str, Any]) -> tuple[int, ...]:
        raise NotImplementedError

    def weight_layout(self, opts: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
        """`(name, shape)` of every trainable weight, sorted by name (the runtime's order)."""
        raise NotImplementedError

    def initial_weights(self, opts: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
        return glorot_weights(self.weight_layout(opts), seed)

    def num_classes(self, opts: Mapping[str, Any]) -> int:
        """Classes of a classifier; 0 for a reconstruction model."""
        return int(opts["classes"]) if self.task == CLASSIFICATION else 0

    # ------------------------------------------------------------------ data

    def input_names(self, opts: Mapping[str, Any]) -> list[str]:
        """Names of the input's last axis (sensor channels or features)."""
        raise NotImplementedError

    def class_names(self, opts: Mapping[str, Any]) -> list[str]:
        """Class names of a classifier (the watch exercises when the counts match)."""
        if self.task != CLASSIFICATION:
            return []
        from firmware_models import watch

        names = [str(c) for c in watch.load_raw()["y_labels"]]
        n = self.num_classes(opts)
        return names if len(names) == n else [f"class{i}" for i in range(n)]

    def default_normalization(self, opts: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
        """Per-input-channel mean and std from the reference data, and where they came from."""
        raise NotImplementedError

    def reference_data(self, opts: Mapping[str, Any], part: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Real inputs (and labels) of this family's shape, for calibration and tests.

        Raises ValueError when the options give an input the reference data
        does not have (then a calibration file is needed).
        """
        raise NotImplementedError

    # -------------------------------------------------------------- graphs

    def forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        """Training graph (TensorFlow, builtin-gradient ops): logits, or the normalized reconstruction."""
        raise NotImplementedError

    def mcu_forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        """Inference graph for TFLite Micro (batch 1, standard ops), same outputs as `forward`."""
        raise NotImplementedError

    def architecture(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """A human-readable description for the manifest."""
        raise NotImplementedError
