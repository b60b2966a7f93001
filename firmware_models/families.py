"""The model zoo's families by name (numpy only; TensorFlow is needed only to build).

    imu_cnn          128 x 6 IMU windows -> activity class          (classification)
    tabular_mlp      a row of tabular sensor features -> class      (classification)
    imu_autoencoder  128 x 6 IMU windows -> reconstruction + error  (reconstruction, no labels)

Each built model lives in the package folder of the same name.
"""

from __future__ import annotations

from firmware_models.autoencoder import FAMILY as IMU_AUTOENCODER
from firmware_models.cnn import FAMILY as IMU_CNN
from firmware_models.family import Family
from firmware_models.mlp import FAMILY as TABULAR_MLP

FAMILIES: dict[str, Family] = {f.name: f for f in (IMU_CNN, TABULAR_MLP, IMU_AUTOENCODER)}


def get(name: str) -> Family:
    """The family called `name`; ValueError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
