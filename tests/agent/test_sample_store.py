"""The device's sample store: bounded, survives restarts, cuts windows that never straddle a gap."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.sample_store import SampleStore


def stream(n: int, start: float, rate_hz: float = 50.0, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    times = start + np.arange(n) / rate_hz
    values = np.arange(n * channels, dtype=np.float32).reshape(n, channels)
    return times, values


def test_it_keeps_only_the_newest_samples_up_to_its_capacity(tmp_path):
    with SampleStore(tmp_path / "s.db", channels=3, capacity=500) as store:
        now = time.time()
        for batch in range(10):
            store.append_many(*stream(100, now + batch * 2))
        assert len(store) == 500
        times, _ = store.latest(500)
        assert times[0] == pytest.approx(now + 10)  # batches 5..9 remain
    assert (tmp_path / "s.db").stat().st_size < 200_000


def test_samples_older_than_the_retention_are_dropped(tmp_path):
    with SampleStore(tmp_path / "s.db", channels=3, retention_s=60) as store:
        store.append_many(*stream(10, time.time() - 3600))
        store.append_many(*stream(10, time.time()))
        assert len(store) == 10


def test_windows_are_the_newest_and_never_cross_a_gap(tmp_path):
    with SampleStore(tmp_path / "s.db", channels=3) as store:
        now = time.time() - 100
        store.append_many(*stream(300, now))  # 6 s of samples
        store.append_many(*stream(200, now + 30))  # the sensor was off for 24 s
        windows = store.windows(length=128, stride=64)
        # 300 samples -> windows at 0, 64, 128 (3); 200 samples -> windows at 0, 64 (2)
        assert windows.shape == (5, 128, 3)
        for window in windows:
            first = window[:, 0]
            assert np.all(np.diff(first) == 3)  # consecutive samples only
        assert store.windows(length=128, stride=64, max_windows=2).shape[0] == 2


def test_samples_survive_a_reopen_and_bad_samples_are_refused(tmp_path):
    with SampleStore(tmp_path / "s.db", channels=2) as store:
        store.append(time.time(), np.array([1.0, 2.0]))
        with pytest.raises(ValueError, match="finite"):
            store.append(time.time(), np.array([np.nan, 2.0]))
        with pytest.raises(ValueError, match="2 channels"):
            store.append(time.time(), np.array([1.0, 2.0, 3.0]))
    with SampleStore(tmp_path / "s.db", channels=2) as again:
        assert len(again) == 1 and again.latest(1)[1].tolist() == [[1.0, 2.0]]
