"""The smartwatch IMU data as the model zoo's reference data (numpy only).

Builds and MCU exports need real sensor data without a device: the input
normalization baked into each model comes from it, and so does the
representative data set that int8 quantization is calibrated on. The data
is the watch set bundled in the `seglearn` wheel (10 subjects, 6 channels at
50 Hz, 7 exercises); the file is located, never imported through seglearn
(importing seglearn pulls in pandas).

Only the first `TRAIN_FRACTION` of every recording counts as training data
here, the part devices train on in the emulator and the tests (their test
windows come from the end of each recording), so no test sample shapes a
model's constants.

`firmware_models` may not import `hw`, so this is a small reader of its
own; `hw.datasets` is the emulator's full per-device loader.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

TRAIN_FRACTION = 0.8
WINDOW = 128
CHANNELS = 6


def data_path() -> Path:
    """Where `watch_dataset.npy` is inside the installed seglearn wheel."""
    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the watch data comes with seglearn: pip install seglearn (or .[build])")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "watch_dataset.npy"


def load_raw() -> dict:
    """The raw data set: `X` (float64 [n, 6] recordings), `y`, `subject`, `X_labels`, `y_labels`."""
    return np.load(data_path(), allow_pickle=True).item()


def normalization_stats() -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Class names, channel names and per-channel mean/std of the training part of every recording."""
    raw = load_raw()
    classes = [str(c) for c in raw["y_labels"]]
    channels = [str(c) for c in raw["X_labels"]]
    flat = np.concatenate([np.asarray(x, np.float64)[: int(len(x) * TRAIN_FRACTION)] for x in raw["X"]])
    mean = flat.mean(axis=0).astype(np.float32)
    std = np.maximum(flat.std(axis=0), 1e-6).astype(np.float32)
    return classes, channels, mean, std


def windows(part: str = "train", stride: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """All subjects' windows of one part of every recording, float32 [n, 128, 6] and int32 labels.

    `part` is "train" (windows inside the first 80% of each recording) or
    "test" (inside the last 20%); no window crosses the boundary.
    """
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    raw = load_raw()
    xs, ys = [], []
    for series, label in zip(raw["X"], raw["y"], strict=True):
        series = np.asarray(series, np.float32)
        cut = int(len(series) * TRAIN_FRACTION)
        segment = series[:cut] if part == "train" else series[cut:]
        starts = range(0, len(segment) - WINDOW + 1, stride)
        xs.extend(segment[s : s + WINDOW] for s in starts)
        ys.extend(int(label) for _ in starts)
    return np.stack(xs).astype(np.float32), np.asarray(ys, np.int32)
