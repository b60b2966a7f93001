"""What the ServerApp and the ClientApp share: the model and its weights as an ArrayRecord.

The model is Starling's IMU CNN as the devices run it: the `.tflite` file
trained through the LiteRT interpreter by `firmware_models.runtime.TrainableModel`
(the repository must be on PYTHONPATH; bench/vs_flower.py sees to it).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def new_model():
    from firmware_models.runtime import TrainableModel

    return TrainableModel.from_package()


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """Named float32 arrays, as Flower ships them (no quantization)."""
    return ArrayRecord({name: Array(np.asarray(value, dtype=np.float32)) for name, value in weights.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}
