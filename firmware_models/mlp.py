"""`tabular_mlp`: a dense classifier for tabular sensor features (air quality, energy, ...).

normalize -> dense (hidden[0]) relu -> ... -> dense (classes). The input is
one row of `features` numbers per example, the shape a per-device `.npz`
with `X: [n, features]` gives the emulator.

The default build (24 features, 7 classes) is trained and tested on the
watch data summarised per window by `window_features` (per-channel mean,
std, min and max), which is also its reference data: it gives the default
normalization and the int8 calibration set. A fleet with other features
builds with `--features N --classes K --normalization ITS_DATA.npz`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from firmware_models import layers, watch
from firmware_models.family import CLASSIFICATION, Family

STATS = ("mean", "std", "min", "max")
WATCH_FEATURES = len(STATS) * watch.CHANNELS


def window_features(x: np.ndarray) -> np.ndarray:
    """Per-channel mean, std, min and max of `[n, length, channels]` windows: float32 `[n, 4 * channels]`.

    Stat-major order (all means, then all stds, ...), matching the names in
    the manifest's `input_channels`.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise ValueError(f"windows must be [n, length, channels], got {list(x.shape)}")
    parts = [x.mean(axis=1), x.std(axis=1), x.min(axis=1), x.max(axis=1)]
    return np.concatenate(parts, axis=1).astype(np.float32)


class TabularMlp(Family):
    name = "tabular_mlp"
    task = CLASSIFICATION
    version = 1
    option_defaults = {"features": WATCH_FEATURES, "classes": 7, "hidden": [32, 32]}
    training_defaults = {"lr": 0.1, "local_epochs": 2, "batch_size": 32}

    def _check(self, opts: dict[str, Any]) -> None:
        opts["features"], opts["classes"] = int(opts["features"]), int(opts["classes"])
        hidden = opts["hidden"]
        if isinstance(hidden, str):
            hidden = [int(h) for h in hidden.split(",") if h.strip()]
        opts["hidden"] = [int(h) for h in hidden]
        if not 1 <= opts["features"] <= 100_000:
            raise ValueError(f"features must be 1..100000, got {opts['features']}")
        if not 2 <= opts["classes"] <= 1000:
            raise ValueError(f"classes must be 2..1000, got {opts['classes']}")
        if not 1 <= len(opts["hidden"]) <= 9 or min(opts["hidden"]) < 1:
            raise ValueError(f"hidden must be 1..9 positive layer widths, got {opts['hidden']}")

    def input_shape(self, opts: Mapping[str, Any]) -> tuple[int, ...]:
        return (int(opts["features"]),)

    def weight_layout(self, opts: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
        widths = [int(opts["features"]), *opts["hidden"], int(opts["classes"])]
        names = [f"fc{i + 1}" for i in range(len(opts["hidden"]))] + ["out"]  # 1..9 keep sorted order
        layout = []
        for name, fan_in, fan_out in zip(names, widths[:-1], widths[1:], strict=True):
            layout += [(f"{name}_b", (fan_out,)), (f"{name}_w", (fan_in, fan_out))]
        return layout

    def _watch_sized(self, opts: Mapping[str, Any]) -> bool:
        return int(opts["features"]) == WATCH_FEATURES

    def input_names(self, opts: Mapping[str, Any]) -> list[str]:
        if self._watch_sized(opts):
            channels = [str(c) for c in watch.load_raw()["X_labels"]]
            return [f"{c}_{s}" for s in STATS for c in channels]
        return [f"f{i}" for i in range(int(opts["features"]))]

    def class_names(self, opts: Mapping[str, Any]) -> list[str]:
        if self._watch_sized(opts):
            return super().class_names(opts)
        return [f"class{i}" for i in range(int(opts["classes"]))]

    def default_normalization(self, opts: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
        if not self._watch_sized(opts):
            n = int(opts["features"])
            return (np.zeros(n, np.float32), np.ones(n, np.float32),
                    "none (identity); build with --normalization DATA.npz to normalize")
        x, _ = self.reference_data(opts)
        mean = x.astype(np.float64).mean(axis=0).astype(np.float32)
        std = np.maximum(x.astype(np.float64).std(axis=0), 1e-6).astype(np.float32)
        return mean, std, "window_features of the watch data's training windows (first 80% of every recording)"

    def reference_data(self, opts: Mapping[str, Any], part: str = "train") -> tuple[np.ndarray, np.ndarray]:
        if not self._watch_sized(opts):
            raise ValueError(f"tabular_mlp with {opts['features']} features has no reference data: "
                             "give a calibration file")
        x, y = watch.windows(part)
        keep = y < int(opts["classes"])
        return window_features(x[keep]), y[keep]

    def _layer_names(self, opts: Mapping[str, Any]) -> list[str]:
        return [f"fc{i + 1}" for i in range(len(opts["hidden"]))] + ["out"]

    def forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        h = xn
        *hidden, out = self._layer_names(opts)
        for name in hidden:
            h = layers.relu(layers.dense(h, w[f"{name}_w"], w[f"{name}_b"]))
        return layers.dense(h, w[f"{out}_w"], w[f"{out}_b"])

    def mcu_forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        import tensorflow as tf

        h = xn
        *hidden, out = self._layer_names(opts)
        for name in hidden:
            h = tf.nn.relu(layers.dense(h, w[f"{name}_w"], w[f"{name}_b"]))
        return layers.dense(h, w[f"{out}_w"], w[f"{out}_b"])

    def architecture(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "layers": ["normalize (x - mean) / std (constant)"]
            + [f"dense {h}, relu" for h in opts["hidden"]]
            + [f"dense {opts['classes']}, softmax"],
            "loss": "mean softmax cross-entropy",
            "optimizer": "SGD in the train signature: w -= lr * (grad + mu * (w - anchor))",
        }


FAMILY = TabularMlp()
