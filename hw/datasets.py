"""Per-device datasets for the emulator, tests and the demo.

The real data behind development is the smartwatch IMU exercise set bundled
in the `seglearn` wheel: 10 subjects wearing a watch (3-axis accelerometer
and 3-axis gyroscope at 50 Hz) while doing 7 shoulder exercises, 14
recordings per subject (each exercise done twice). One subject is one
device, which is what a federated fleet looks like: every device has its
own wearer, its own style of movement and no access to anyone else's data.

The data file is read directly with numpy instead of through
`seglearn.datasets`, because importing `seglearn` pulls in pandas and
scikit-learn, which a 512 MB device or a lean test environment should not
need. Only the package's location is looked up.

Windows are `WINDOW` samples x `CHANNELS` channels, float32, and labels are
int32 class indices into `CLASS_NAMES` (the dataset's own label order).

Per-device `.npz` files (keys `x_train`, `y_train`, `x_test`, `y_test`) let a
device, the emulator or another process take one device's data without the
seglearn wheel; they are written atomically.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.atomic import write_atomic

WINDOW = 128
"""Samples per window (2.56 s at 50 Hz): the model's input length."""
CHANNELS = 6
"""Channels per sample: ax, ay, az, wx, wy, wz."""
CLASSES = 7
"""Number of exercise classes."""
CLASS_NAMES: tuple[str, ...] = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
"""Class names in label order, as in the dataset's `y_labels`."""
SUBJECTS: tuple[int, ...] = tuple(range(1, 11))
"""Subject ids present in the watch data set."""
SAMPLE_RATE_HZ = 50

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class DeviceData:
    """One device's local data: training windows and a held-out test set.

    `x_*` are float32 `[n, WINDOW, CHANNELS]`, `y_*` int32 `[n]` class indices.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of training windows (the FedAvg example count)."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of local test windows."""
        return int(self.y_test.shape[0])


def watch_data_path() -> Path:
    """Locate `watch_dataset.npy` inside the installed seglearn package.

    Uses `importlib.util.find_spec`, which finds the package without
    executing its `__init__` (and so without importing pandas).
    """
    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the smartwatch IMU data set ships inside the seglearn wheel, which is "
            "not installed: run `pip install seglearn` (it is only read as a data "
            "file; seglearn itself is never imported)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "watch_dataset.npy"
    if not path.is_file():
        raise FileNotFoundError(
            f"seglearn is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall seglearn`"
        )
    return path


def load_watch_raw() -> dict:
    """Return the raw watch data set dict.

    Keys: `X` (list of 140 float64 `[n, 6]` recordings at 50 Hz), `y` (class
    index per recording), `subject` (1..10 per recording), `X_labels`,
    `y_labels`, `side`.
    """
    data = np.load(watch_data_path(), allow_pickle=True).item()
    if not isinstance(data, dict) or not {"X", "y", "subject"} <= set(data):
        raise ValueError("watch_dataset.npy does not have the expected X/y/subject layout")
    return data


def _window_starts(length: int, stride: int) -> np.ndarray:
    """Start indices of every full window in a recording of `length` samples."""
    if length < WINDOW:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, length - WINDOW + 1, stride, dtype=np.int64)


def split_recording(
    series: np.ndarray, stride: int, test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one recording into train and test windows, split in time.

    The last `round(test_fraction * k)` of the recording's `k` windows (at
    least one and at most `k - 1`, when `test_fraction > 0` and the recording
    has two or more windows)
    are the test windows. Train windows are the earlier ones that end at or
    before the first test window starts: windows straddling the boundary
    would share samples with the test set and are dropped.

    Returns float32 arrays `[n_train, WINDOW, CHANNELS]`, `[n_test, ...]`.
    """
    starts = _window_starts(series.shape[0], stride)
    k = starts.shape[0]
    if test_fraction > 0 and k >= 2:
        n_test = min(k - 1, max(1, int(np.floor(test_fraction * k + 0.5))))
    else:
        n_test = 0
    test_starts = starts[k - n_test :]
    if n_test:
        boundary = int(test_starts[0])
        train_starts = starts[starts + WINDOW <= boundary]
    else:
        train_starts = starts

    def cut(idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return np.zeros((0, WINDOW, series.shape[1]), dtype=np.float32)
        return np.stack([series[s : s + WINDOW] for s in idx]).astype(np.float32)

    return cut(train_starts), cut(test_starts)


def load_watch_devices(
    subjects: Sequence[int] | None = None,
    stride: int = 64,
    test_fraction: float = 0.2,
) -> list[DeviceData]:
    """Load the watch data set as one `DeviceData` per subject.

    Args:
      subjects: subject ids (1..10) to load, in the order given; all ten by
        default. Device names are ``subject-01`` .. ``subject-10``.
      stride: hop between consecutive window starts, in samples (64 = 50%
        overlap within a split).
      test_fraction: share of each recording's windows, taken from its END,
        that form the device's local test set.

    Why the split is per recording, last part in time: each recording holds
    one exercise, so holding out the last 20% of the *device's* windows would
    leave whole classes out of its test set. Taking the last 20% of every
    recording puts every class in every test set while still testing on the
    future of each recording (no random shuffling, which would leak nearly
    identical overlapping windows across the split). Windows that straddle
    the train/test boundary are dropped, so train and test windows never
    share a single sample.

    Windows keep the recording's time order inside each split; recordings
    follow the data set's order.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    raw = load_watch_raw()
    subject_of = np.asarray(raw["subject"]).astype(np.int64)
    labels = np.asarray(raw["y"]).astype(np.int64)
    chosen = list(SUBJECTS if subjects is None else subjects)
    unknown = sorted(set(int(s) for s in chosen) - set(int(s) for s in subject_of))
    if unknown:
        raise ValueError(f"unknown subject id(s) {unknown}; the data set has {sorted(set(subject_of.tolist()))}")

    devices = []
    for subject in chosen:
        xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
        for i in np.flatnonzero(subject_of == int(subject)):
            series = np.asarray(raw["X"][i], dtype=np.float64)
            x_tr, x_te = split_recording(series, stride, test_fraction)
            xs_tr.append(x_tr)
            xs_te.append(x_te)
            ys_tr.append(np.full(x_tr.shape[0], labels[i], dtype=np.int32))
            ys_te.append(np.full(x_te.shape[0], labels[i], dtype=np.int32))
        devices.append(
            DeviceData(
                name=f"subject-{int(subject):02d}",
                x_train=np.concatenate(xs_tr).astype(np.float32, copy=False),
                y_train=np.concatenate(ys_tr),
                x_test=np.concatenate(xs_te).astype(np.float32, copy=False),
                y_test=np.concatenate(ys_te),
            )
        )
    return devices


def save_device_npz(device: DeviceData, path: str | os.PathLike[str],
                    extra: dict[str, np.ndarray] | None = None) -> None:
    """Write one device's data to `path` as an uncompressed `.npz`, atomically.

    The file is written to a temporary file in the same folder, fsynced and
    renamed over `path`, so a crash leaves the old file or the new one, never
    a torn one. The device name is not stored (it is the file's business).
    `extra` arrays go in beside the four (the emulator's `anomaly_test`: an
    agent reads only the four).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=np.asarray(device.x_train, dtype=np.float32),
        y_train=np.asarray(device.y_train, dtype=np.int32),
        x_test=np.asarray(device.x_test, dtype=np.float32),
        y_test=np.asarray(device.y_test, dtype=np.int32),
        **(extra or {}),
    )
    write_atomic(path, buf.getvalue())


def load_device_npz(path: str | os.PathLike[str], name: str | None = None) -> DeviceData:
    """Read a device file written by `save_device_npz`.

    The device name defaults to the file name without its suffix. Arrays are
    checked for the expected keys, dtypes (cast to float32/int32) and
    matching lengths; pickled objects are refused.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in _NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; expected {list(_NPZ_KEYS)}")
        arrays = {k: npz[k] for k in _NPZ_KEYS}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if y.ndim != 1 or x.shape[:1] != y.shape:
            raise ValueError(f"{path}: x_{split} {x.shape} and y_{split} {y.shape} do not match")
    return DeviceData(
        name=name if name is not None else path.stem,
        x_train=arrays["x_train"].astype(np.float32, copy=False),
        y_train=arrays["y_train"].astype(np.int32, copy=False),
        x_test=arrays["x_test"].astype(np.float32, copy=False),
        y_test=arrays["y_test"].astype(np.int32, copy=False),
    )
