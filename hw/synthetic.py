"""Synthetic devices: the real agent, with a cheap stand-in for the TFLite model.

`SyntheticModel` has the interface the agent's learner uses (`get_weights`,
`set_weights`, `train_step`, `evaluate`, `batch_size`) but "trains" a
quadratic: each step moves the weights a learning-rate step toward a target
that is fixed per device. Updates are therefore deterministic, differ from
device to device, and cost microseconds, so hundreds of devices (or tests
that check a strategy's arithmetic exactly) run on a laptop while every
message still goes through the real agent, protocol, broker and gateway.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from protocol.atomic import write_atomic


class SyntheticModel:
    """w <- w - lr * (w - target): loss is the mean squared distance to the device's target."""

    batch_size = 32

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, spread: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        self.target = {k: rng.normal(0.0, spread, size=s).astype(np.float32) for k, s in shapes.items()}
        self.weights = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        if {k: np.shape(v) for k, v in weights.items()} != {k: v.shape for k, v in self.weights.items()}:
            raise ValueError("weights do not match the model's names and shapes")
        self.weights = {k: np.asarray(v, np.float32).copy() for k, v in weights.items()}

    def _loss(self) -> float:
        total = sum(float(np.sum((self.weights[k] - self.target[k]) ** 2)) for k in self.weights)
        return total / max(1, sum(v.size for v in self.weights.values()))

    def train_step(self, x, y, lr: float) -> float:
        loss = self._loss()
        self.weights = {k: w - np.float32(lr) * (w - self.target[k]) for k, w in self.weights.items()}
        return loss

    def evaluate(self, x, y) -> tuple[float, float]:
        loss = self._loss()
        return loss, 1.0 / (1.0 + loss)


def synthetic_data(n: int = 64):
    """Stand-in local data: only its size matters to the synthetic model."""
    from agent.samples import LocalData

    zeros = np.zeros((n, 1), np.float32)
    labels = np.zeros(n, np.int32)
    return LocalData(zeros, labels, zeros[: max(1, n // 4)], labels[: max(1, n // 4)])


def write_manifest(folder: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Path:
    """A manifest and `weights.npz` the gateway can start from (no .tflite: devices are synthetic)."""
    rng = np.random.default_rng(seed)
    weights = {k: rng.normal(0.0, 0.1, size=s).astype(np.float32) for k, s in shapes.items()}
    buf = io.BytesIO()
    np.savez(buf, **weights)
    raw = buf.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "weights.npz", raw)
    manifest = {
        "name": "synthetic",
        "sha256": "",  # no model file: devices skip the architecture check
        "weights_sha256": hashlib.sha256(raw).hexdigest(),
        "weights": [{"name": k, "shape": list(s), "dtype": "float32"} for k, s in shapes.items()],
        "parameter_count": int(sum(np.prod(s) for s in shapes.values())),
    }
    path = folder / "manifest.json"
    write_atomic(path, json.dumps(manifest, indent=2).encode())
    return path
