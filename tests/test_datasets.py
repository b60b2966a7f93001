"""hw.datasets: the smartwatch IMU data as one device per subject."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hw import datasets
from hw.datasets import CHANNELS, CLASSES, WINDOW, DeviceData, load_device_npz, load_watch_devices, save_device_npz

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def devices() -> list[DeviceData]:
    return load_watch_devices()


def test_ten_devices_with_the_right_shapes_and_dtypes(devices):
    assert [d.name for d in devices] == [f"subject-{i:02d}" for i in range(1, 11)]
    for d in devices:
        for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
            assert x.dtype == np.float32 and y.dtype == np.int32
            assert x.ndim == 3 and x.shape[1:] == (WINDOW, CHANNELS)
            assert y.shape == (x.shape[0],)
            assert np.all(np.isfinite(x))
            assert y.min() >= 0 and y.max() < CLASSES
        # roughly a fifth of each device's windows are held out
        assert 0.15 < d.num_test / (d.num_train + d.num_test) < 0.3
        assert d.num_train >= 100


def test_every_class_in_every_test_set(devices):
    for d in devices:
        assert set(np.unique(d.y_test).tolist()) == set(range(CLASSES)), d.name
        assert set(np.unique(d.y_train).tolist()) == set(range(CLASSES)), d.name


def test_real_train_and_test_windows_share_no_sample(devices):
    """No 6-channel sample row of a test window appears in any train window."""
    for d in devices:
        train_rows = {row.tobytes() for row in d.x_train.reshape(-1, CHANNELS)}
        test_rows = {row.tobytes() for row in d.x_test.reshape(-1, CHANNELS)}
        assert train_rows.isdisjoint(test_rows), d.name


def test_windows_come_from_the_raw_recordings_in_time_order():
    raw = datasets.load_watch_raw()
    first = int(np.flatnonzero(np.asarray(raw["subject"]) == 1)[0])
    series = np.asarray(raw["X"][first])
    dev = load_watch_devices([1])[0]
    np.testing.assert_array_equal(dev.x_train[0], series[:WINDOW].astype(np.float32))
    np.testing.assert_array_equal(dev.x_train[1], series[64 : 64 + WINDOW].astype(np.float32))
    assert dev.y_train[0] == raw["y"][first]


@pytest.mark.parametrize("length,stride", [(1333, 64), (128, 64), (300, 32), (2618, 64), (1000, 128)])
def test_split_is_last_fifth_in_time_with_a_gap(length, stride):
    # each sample's value is its time index, so windows reveal where they came from
    series = np.repeat(np.arange(length, dtype=np.float64)[:, None], CHANNELS, axis=1)
    x_train, x_test = datasets.split_recording(series, stride, 0.2)
    k = (length - WINDOW) // stride + 1
    starts_train = x_train[:, 0, 0].astype(int)
    starts_test = x_test[:, 0, 0].astype(int)
    # windows are contiguous runs of samples
    for x in (x_train, x_test):
        np.testing.assert_array_equal(x[:, :, 0] - x[:, :1, 0], np.broadcast_to(np.arange(WINDOW), x.shape[:2]))
    if k >= 2:
        assert len(starts_test) == max(1, round(0.2 * k))
        # the test windows are the last ones of the recording, in order
        np.testing.assert_array_equal(starts_test, (np.arange(k) * stride)[k - len(starts_test):])
        # every train sample strictly precedes every test sample
        assert x_train.max() < x_test.min()
        # only the windows straddling the boundary were dropped
        all_starts = np.arange(k) * stride
        np.testing.assert_array_equal(starts_train, all_starts[all_starts + WINDOW <= starts_test[0]])
    else:
        assert len(starts_test) == 0 and len(starts_train) == k
    assert np.all(np.diff(starts_train) == stride) and np.all(np.diff(starts_test) == stride)


def test_subject_selection_and_bad_arguments():
    devs = load_watch_devices([3, 1], stride=128)
    assert [d.name for d in devs] == ["subject-03", "subject-01"]
    with pytest.raises(ValueError, match="unknown subject"):
        load_watch_devices([11])
    with pytest.raises(ValueError):
        load_watch_devices(stride=0)
    with pytest.raises(ValueError):
        load_watch_devices(test_fraction=1.0)


def test_npz_round_trip(tmp_path, devices):
    dev = devices[4]
    path = tmp_path / "fleet" / "subject-05.npz"
    save_device_npz(dev, path)
    save_device_npz(dev, path)  # overwriting in place works too
    back = load_device_npz(path)
    assert back.name == "subject-05"
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(back, key), getattr(dev, key))
        assert getattr(back, key).dtype == getattr(dev, key).dtype
    assert sorted(p.name for p in path.parent.iterdir()) == ["subject-05.npz"]  # no temp files left
    with np.load(path) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]


def test_npz_missing_key_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, WINDOW, CHANNELS), np.float32), y_train=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="missing"):
        load_device_npz(path)


def test_missing_seglearn_names_the_install_command(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install seglearn"):
        load_watch_devices()


def test_loading_does_not_import_seglearn_or_pandas():
    code = (
        "import sys; from hw.datasets import load_watch_devices; load_watch_devices([2]); "
        "print(sorted(m for m in ('seglearn', 'pandas', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
