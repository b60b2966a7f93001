"""`imu_autoencoder`: a self-supervised model for unlabelled 128 x 6 IMU streams.

Most fleets have no labels. This family learns to reconstruct its input
windows through a small bottleneck; a window it reconstructs badly is one
unlike what the fleet usually sees, so the per-window reconstruction error
is an anomaly score. `train` takes windows only (no labels).

    normalize -> conv k5 (16) relu, maxpool 4 -> conv k5 (16) relu, maxpool 4
    -> dense (code) -> dense (8 x 16) relu
    -> upsample 4, conv k5 (16) relu -> upsample 4, conv k5 (6) -> reconstruction

The loss and the error are mean squared errors in normalized units (each
channel divided by its std), so a gyroscope axis with a large range does
not drown the accelerometer. `infer` returns the reconstruction in the
sensor's own units and that per-window error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from firmware_models import layers, watch
from firmware_models.family import RECONSTRUCTION, Family

WINDOW, CHANNELS = watch.WINDOW, watch.CHANNELS
KERNEL = 5
FILTERS = 16
POOL = 4
SQUEEZED = WINDOW // (POOL * POOL)  # 8 time steps at the bottleneck


class ImuAutoencoder(Family):
    name = "imu_autoencoder"
    task = RECONSTRUCTION
    version = 1
    option_defaults = {"code": 16}
    training_defaults = {"lr": 0.2, "local_epochs": 2, "batch_size": 32}

    def _check(self, opts: dict[str, Any]) -> None:
        opts["code"] = int(opts["code"])
        if not 1 <= opts["code"] <= 512:
            raise ValueError(f"code must be 1..512, got {opts['code']}")

    def input_shape(self, opts: Mapping[str, Any]) -> tuple[int, ...]:
        return (WINDOW, CHANNELS)

    def weight_layout(self, opts: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
        code, flat = int(opts["code"]), SQUEEZED * FILTERS
        return [
            ("dec1_b", (FILTERS,)),
            ("dec1_w", (KERNEL, FILTERS, FILTERS)),
            ("dec2_b", (CHANNELS,)),
            ("dec2_w", (KERNEL, FILTERS, CHANNELS)),
            ("enc1_b", (FILTERS,)),
            ("enc1_w", (KERNEL, CHANNELS, FILTERS)),
            ("enc2_b", (FILTERS,)),
            ("enc2_w", (KERNEL, FILTERS, FILTERS)),
            ("from_code_b", (flat,)),
            ("from_code_w", (code, flat)),
            ("to_code_b", (code,)),
            ("to_code_w", (flat, code)),
        ]

    def input_names(self, opts: Mapping[str, Any]) -> list[str]:
        return [str(c) for c in watch.load_raw()["X_labels"]]

    def default_normalization(self, opts: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
        _, _, mean, std = watch.normalization_stats()
        return mean, std, "watch data (seglearn wheel), first 80% of every recording, all 10 subjects"

    def reference_data(self, opts: Mapping[str, Any], part: str = "train") -> tuple[np.ndarray, np.ndarray]:
        return watch.windows(part)

    def forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        import tensorflow as tf

        batch = int(xn.shape[0])
        h = layers.max_pool(layers.relu(layers.conv1d_same(xn, w["enc1_w"], w["enc1_b"])), POOL)
        h = layers.max_pool(layers.relu(layers.conv1d_same(h, w["enc2_w"], w["enc2_b"])), POOL)
        code = layers.dense(tf.reshape(h, [batch, SQUEEZED * FILTERS]), w["to_code_w"], w["to_code_b"])
        h = layers.relu(layers.dense(code, w["from_code_w"], w["from_code_b"]))
        h = tf.reshape(h, [batch, SQUEEZED, FILTERS])
        h = layers.relu(layers.conv1d_same(layers.upsample(h, POOL), w["dec1_w"], w["dec1_b"]))
        return layers.conv1d_same(layers.upsample(h, POOL), w["dec2_w"], w["dec2_b"])

    def mcu_forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        import tensorflow as tf

        h = tf.reshape(xn, [1, WINDOW, 1, CHANNELS])
        h = layers.mcu_max_pool(layers.mcu_conv1d_same(h, w["enc1_w"], w["enc1_b"]), POOL)
        h = layers.mcu_max_pool(layers.mcu_conv1d_same(h, w["enc2_w"], w["enc2_b"]), POOL)
        code = layers.dense(tf.reshape(h, [1, SQUEEZED * FILTERS]), w["to_code_w"], w["to_code_b"])
        h = tf.nn.relu(layers.dense(code, w["from_code_w"], w["from_code_b"]))
        h = tf.reshape(h, [1, SQUEEZED, 1, FILTERS])
        h = layers.mcu_conv1d_same(layers.mcu_upsample(h, POOL), w["dec1_w"], w["dec1_b"])
        h = layers.mcu_conv1d_same(layers.mcu_upsample(h, POOL), w["dec2_w"], w["dec2_b"], activation=False)
        return tf.reshape(h, [1, WINDOW, CHANNELS])

    def architecture(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "layers": [
                "normalize (x - mean) / std (constant)",
                f"conv1d k={KERNEL} same, {FILTERS} filters, relu, maxpool {POOL}",
                f"conv1d k={KERNEL} same, {FILTERS} filters, relu, maxpool {POOL}",
                f"dense {opts['code']} (the code)",
                f"dense {SQUEEZED}x{FILTERS}, relu",
                f"upsample {POOL}, conv1d k={KERNEL} same, {FILTERS} filters, relu",
                f"upsample {POOL}, conv1d k={KERNEL} same, {CHANNELS} filters (normalized reconstruction)",
                "output: reconstruction * std + mean, and per-window mean squared error (normalized units)",
            ],
            "loss": "mean squared reconstruction error in normalized units",
            "optimizer": "SGD in the train signature: w -= lr * (grad + mu * (w - anchor))",
        }


FAMILY = ImuAutoencoder()
