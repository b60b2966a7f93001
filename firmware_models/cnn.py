"""`imu_cnn`: the activity classifier for 128 x 6 IMU windows (a small 1-D CNN).

normalize -> conv k5 (32) relu, maxpool 4 -> conv k5 (64) relu, maxpool 4
-> global average pool -> dense (classes). About 11.7k parameters for the
watch data's 7 exercises; the number of classes is a build option.

Its weight names and shapes are a contract with every device and gateway
holding `imu_cnn` weights: do not rename them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from firmware_models import layers, watch
from firmware_models.family import CLASSIFICATION, Family

WINDOW, CHANNELS = watch.WINDOW, watch.CHANNELS
KERNEL = 5
FILTERS = (32, 64)
POOL = 4


class ImuCnn(Family):
    name = "imu_cnn"
    task = CLASSIFICATION
    version = 2  # 2: in-graph FedProx (mu input of train, set_anchor signature)
    option_defaults = {"classes": 7}
    training_defaults = {"lr": 0.2, "local_epochs": 2, "batch_size": 32}
    """Measured on the watch data: 5 subjects, FedAvg over 5 rounds of 2 local
    epochs reaches ~0.79 pooled test accuracy."""

    def _check(self, opts: dict[str, Any]) -> None:
        if not 2 <= int(opts["classes"]) <= 1000:
            raise ValueError(f"classes must be 2..1000, got {opts['classes']}")
        opts["classes"] = int(opts["classes"])

    def input_shape(self, opts: Mapping[str, Any]) -> tuple[int, ...]:
        return (WINDOW, CHANNELS)

    def weight_layout(self, opts: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
        f1, f2 = FILTERS
        n = int(opts["classes"])
        return [
            ("conv1_b", (f1,)),
            ("conv1_w", (KERNEL, CHANNELS, f1)),
            ("conv2_b", (f2,)),
            ("conv2_w", (KERNEL, f1, f2)),
            ("dense_b", (n,)),
            ("dense_w", (f2, n)),
        ]

    def input_names(self, opts: Mapping[str, Any]) -> list[str]:
        return [str(c) for c in watch.load_raw()["X_labels"]]

    def default_normalization(self, opts: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
        _, _, mean, std = watch.normalization_stats()
        return mean, std, "watch data (seglearn wheel), first 80% of every recording, all 10 subjects"

    def reference_data(self, opts: Mapping[str, Any], part: str = "train") -> tuple[np.ndarray, np.ndarray]:
        x, y = watch.windows(part)
        if int(opts["classes"]) < 7:  # keep the labels in range of a smaller head
            keep = y < int(opts["classes"])
            x, y = x[keep], y[keep]
        return x, y

    def forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        import tensorflow as tf

        h = layers.max_pool(layers.relu(layers.conv1d_same(xn, w["conv1_w"], w["conv1_b"])), POOL)
        h = layers.max_pool(layers.relu(layers.conv1d_same(h, w["conv2_w"], w["conv2_b"])), POOL)
        return layers.dense(tf.reduce_mean(h, axis=1), w["dense_w"], w["dense_b"])

    def mcu_forward(self, w: Mapping[str, Any], xn: Any, opts: Mapping[str, Any]) -> Any:
        import tensorflow as tf

        h = tf.reshape(xn, [1, WINDOW, 1, CHANNELS])
        h = layers.mcu_max_pool(layers.mcu_conv1d_same(h, w["conv1_w"], w["conv1_b"]), POOL)
        h = layers.mcu_max_pool(layers.mcu_conv1d_same(h, w["conv2_w"], w["conv2_b"]), POOL)
        h = tf.reshape(tf.reduce_mean(h, axis=[1, 2]), [1, FILTERS[1]])
        return layers.dense(h, w["dense_w"], w["dense_b"])

    def architecture(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "layers": [
                "normalize (x - mean) / std (constant)",
                f"conv1d k={KERNEL} same, {FILTERS[0]} filters, relu, maxpool {POOL}",
                f"conv1d k={KERNEL} same, {FILTERS[1]} filters, relu, maxpool {POOL}",
                "global average pool",
                f"dense {opts['classes']}, softmax",
            ],
            "loss": "mean softmax cross-entropy",
            "optimizer": "SGD in the train signature: w -= lr * (grad + mu * (w - anchor))",
        }


FAMILY = ImuCnn()
