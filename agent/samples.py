"""A device's local data (`LocalData`), and the replay source: windows recorded earlier, in an `.npz`.

The file holds `x_train` [n, 128, 6] float32, `y_train` [n] int, and the
device's local test windows `x_test`, `y_test`. Live devices build the same
`LocalData` from their sample store each round (`agent/live_data.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LocalData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_replay(path: Path, window: tuple[int, ...]) -> LocalData:
    """Load and check a replay file against the model's window shape."""
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(npz.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        data = LocalData(
            npz["x_train"].astype(np.float32),
            npz["y_train"].astype(np.int32),
            npz["x_test"].astype(np.float32),
            npz["y_test"].astype(np.int32),
        )
    for name, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if x.shape[1:] != tuple(window):
            raise ValueError(f"{path}: x_{name} windows are {x.shape[1:]}, the model needs {tuple(window)}")
        if len(x) != len(y):
            raise ValueError(f"{path}: {len(x)} x_{name} windows but {len(y)} labels")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{path}: x_{name} holds NaN or infinite values")
    return data
