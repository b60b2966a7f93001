"""Feature rows from live samples (agent/features.py, `[data] features`): the packaged `tabular_mlp` and
tabular models of other widths learn from windows of sensor rows summed up per channel, cut, labelled and
split as window models' rounds are."""

from __future__ import annotations

import time

import numpy as np
import pytest

import firmware_models
from agent import features as agent_features
from agent import learner
from agent.config import FEATURE_KINDS, FEATURE_WINDOW_BOUNDS, ConfigError, parse_config
from agent.data_source import DataError, open_data
from agent.features import FeatureError, WindowStats, model_inputs, window_stats
from agent.labels import LabelSource
from agent.live_data import LiveData, NoData, max_gap_for
from agent.sample_store import SampleStore
from agent.sensors.replay import ReplaySensor
from firmware_models import watch
from firmware_models.mlp import window_features
from firmware_models.runtime import TrainableModel
from protocol import schemas

IMU = ["ax", "ay", "az", "wx", "wy", "wz"]  # the watch data's channels, as the tabular_mlp manifest names them


def write_labels(path, rows) -> None:
    path.write_text("start,end,label\n" + "".join(f"{float(s)!r},{float(e)!r},{lab}\n" for s, e, lab in rows))


# --------------------------------------------------------------------------------- the extractor


def test_window_stats_are_per_channel_mean_std_min_max_stat_major():
    windows = np.array([[[1, 10], [2, 20], [3, 30], [6, 60]],
                        [[5, -1], [5, -1], [5, -1], [5, -1]]], dtype=np.float32)
    rows = WindowStats(window=4, channels=2)(windows)
    std = np.sqrt((4 + 1 + 0 + 9) / 4)  # population std of 1, 2, 3, 6 (mean 3)
    np.testing.assert_allclose(rows[0], [3, 30, std, 10 * std, 1, 10, 6, 60], rtol=1e-6)
    np.testing.assert_array_equal(rows[1], [5, -1, 0, 0, 5, -1, 5, -1])
    assert rows.dtype == np.float32 and rows.shape == (2, 8)
    assert WindowStats(4, 2).names(["t", "h"]) == ["t_mean", "h_mean", "t_std", "h_std", "t_min", "h_min",
                                                   "t_max", "h_max"]
    with pytest.raises(FeatureError, match=r"expected windows \[n, 4, 2\], got \[2, 4, 3\]"):
        WindowStats(4, 2)(np.zeros((2, 4, 3)))


def test_it_agrees_with_the_window_features_the_packaged_tabular_mlp_was_normalized_with():
    # The model's normalization (in its graph) is the mean and std of `window_features` of the watch data:
    # rows computed any other way (order, ddof, dtype) would be normalized wrongly.
    x, _ = watch.windows("test")
    ours = WindowStats(window=watch.WINDOW, channels=watch.CHANNELS)(x)
    np.testing.assert_allclose(ours, window_features(x), rtol=1e-6, atol=1e-7)
    manifest = firmware_models.load_manifest("tabular_mlp")
    assert WindowStats(50, 6).names(IMU) == manifest["input_channels"]
    WindowStats(50, 6).check(manifest["input_shape"], manifest["input_channels"])  # fits: no error


def test_a_model_of_another_width_is_refused_naming_both():
    with pytest.raises(FeatureError, match="window_stats of 3 channels gives 12 features, the model takes 24"):
        WindowStats(60, 3).check((24,))
    with pytest.raises(FeatureError, match=r"gives rows of 24 features, the model takes windows \(128, 6\)"):
        WindowStats(50, 6).check((128, 6))


def test_named_inputs_in_another_order_are_refused_and_unnamed_ones_are_not_compared():
    channel_major = [f"{c}_{s}" for c in IMU for s in agent_features.STATS]  # ax_mean, ax_std, ...
    with pytest.raises(FeatureError, match="gives ay_mean as feature 1, the model takes ax_std there"):
        WindowStats(50, 6).check((24,), channel_major)
    WindowStats(10, 3).check((12,), [f"f{i}" for i in range(12)])  # a `--features 12` build names no channels
    WindowStats(10, 3).check((12,), None)
    WindowStats(10, 3).check((12,), WindowStats(10, 3).names(["temperature", "pressure", "humidity"]))


def test_the_extractor_is_named_by_the_config_and_raw_windows_pass_through():
    assert window_stats("", 50, 6) is None
    assert window_stats("window_stats", 50, 6) == WindowStats(50, 6)
    with pytest.raises(FeatureError, match="unknown feature extractor 'fft'"):
        window_stats("fft", 50, 6)
    with pytest.raises(FeatureError, match="2 to 1000 rows, got 1"):
        WindowStats(1, 6)
    windows = np.arange(2 * 128 * 6, dtype=np.float32).reshape(2, 128, 6)
    assert model_inputs(windows, (128, 6)) is not windows and model_inputs(windows, (128, 6)).shape == (2, 128, 6)
    assert model_inputs(windows[:, :1], (6,)).shape == (2, 6)


# --------------------------------------------------------------------------------- the config


def config_doc(tmp_path, **data) -> dict:
    return {"device": {"name": "d", "key": str(tmp_path / "k"), "state_dir": str(tmp_path / "state")},
            "gateway": {"id": "0" * 32, "public_key": "ab" * 32}, "model": {"name": "tabular_mlp"},
            "data": {"rate_hz": 500.0, "labels": str(tmp_path / "labels.csv"), **data},
            "sensor": [{"kind": "replay", "path": str(tmp_path / "rows.npz"), "rate_hz": 500.0}]}


def test_the_config_reads_features_and_refuses_what_it_cannot_use(tmp_path):
    sampling = parse_config(config_doc(tmp_path, features="window_stats", feature_window=60, stride=30)).sampling
    assert (sampling.features, sampling.feature_window, sampling.stride) == ("window_stats", 60, 30)
    assert parse_config(config_doc(tmp_path)).sampling.features == ""
    with pytest.raises(ConfigError, match=r"data\.features must be one of window_stats"):
        parse_config(config_doc(tmp_path, features="fft"))
    with pytest.raises(ConfigError, match=r"data\.feature_window must be between 2 and 1000 rows, got 1"):
        parse_config(config_doc(tmp_path, features="window_stats", feature_window=1))
    with pytest.raises(ConfigError, match=r"data\.features is for live samples"):
        parse_config(config_doc(tmp_path, features="window_stats", replay="x.npz"))
    # config.py keeps its own copy (config parsing does not import numpy): they must agree
    assert FEATURE_KINDS == agent_features.KINDS and FEATURE_WINDOW_BOUNDS == (2, agent_features.MAX_WINDOW)


def test_the_agent_refuses_at_start_sensors_whose_features_do_not_fit_the_model(tmp_path):
    # A BME280-like device (3 channels) with the packaged 24-feature tabular_mlp: refused before sampling.
    np.savez(tmp_path / "rows.npz", samples=np.ones((10, 3), np.float32),
             channels=np.array(["temperature_c", "pressure_hpa", "humidity_pct"]))
    config = parse_config(config_doc(tmp_path, features="window_stats"))
    manifest = firmware_models.load_manifest("tabular_mlp")
    with pytest.raises(DataError, match=r"data\.features: window_stats of 3 channels gives 12 features, the model "
                                        r"takes 24 \(temperature_c, pressure_hpa, humidity_pct\)"):
        with open_data(config, manifest):
            pass
    without = parse_config(config_doc(tmp_path))  # and without features: the old rule, 3 readings for 24 inputs
    with pytest.raises(DataError, match=r"sensor: the model takes \(24,\), the sensors give 3 channels"):
        with open_data(without, manifest):
            pass


def test_a_running_agent_samples_imu_rows_into_feature_rows_for_the_packaged_tabular_mlp(tmp_path):
    # The real start path: config -> replay sensor -> sampler thread -> store -> LiveData with window_stats.
    x, _ = watch.windows("train")
    np.savez(tmp_path / "rows.npz", samples=x[:40].reshape(-1, 6))
    write_labels(tmp_path / "labels.csv", [(time.time() - 60, time.time() + 600, 3)])
    config = parse_config(config_doc(tmp_path, features="window_stats", feature_window=50, stride=25))
    with open_data(config, firmware_models.load_manifest("tabular_mlp")) as live:
        assert live.features == WindowStats(50, 6) and live.length == 50 and live.stride == 25
        deadline = time.monotonic() + 30
        while True:  # 32 training rows need about 1100 samples: two to three seconds at 500 Hz
            try:
                data = live.snapshot()
                break
            except NoData:
                assert time.monotonic() < deadline, f"only {len(live.store)} rows after 30 s"
                time.sleep(0.2)
    assert data.x_train.shape[1:] == (24,) and len(data.x_train) >= 32 and set(data.y_train.tolist()) == {3}
    assert np.all(data.x_train[:, 6:12] >= 0) and np.all(data.x_train[:, 12:18] <= data.x_train[:, 18:])


# --------------------------------------------------------------------------------- live data


def bme280_rows(store: SampleStore, start: float, seconds: float, rate_hz: float) -> np.ndarray:
    """BME280-like rows: channel 0 holds the seconds since `start` (to check windows against), then
    pressure in hPa and humidity in %RH that move with it. Returns the times."""
    times = start + np.arange(int(seconds * rate_hz)) / rate_hz
    since = times - start
    rng = np.random.default_rng(0)
    times = times + rng.uniform(-0.05, 0.05, len(times))  # a real sampler's jitter
    values = np.stack([since, 1000 + since / 100, 40 + 10 * np.sin(since / 600)], axis=1)
    store.append_many(times, values.astype(np.float32))
    return times


def test_low_rate_bme280_rows_become_labelled_feature_rows_split_in_time(tmp_path):
    rate = 0.2  # one row every 5 s: 3 h of a BME280 read at 0.2 Hz
    start = time.time() - 4 * 3600
    labels = tmp_path / "labels.csv"
    # "window open" for the first 1.5 h, "closed" for the next 1.5 h (classes 1 and 0 of a 2-class model)
    write_labels(labels, [(start, start + 5400, 1), (start + 5400, start + 10800, 0)])
    features = WindowStats(window=12, channels=3)  # a minute of rows per feature row
    with SampleStore(tmp_path / "s.db", channels=3) as store:
        bme280_rows(store, start, 10800, rate)
        # the 50 Hz gap rule (1 s) sees a gap between every two rows: not one window
        assert len(store.windows(12, 6, 1000, max_gap_s=1.0)) == 0
        with pytest.raises(NoData, match="no window lies inside a labelled interval"):
            LiveData(store, (12,), LabelSource(labels, 2), stride=6, features=features).snapshot()
        live = LiveData(store, (12,), LabelSource(labels, 2), stride=6, features=features,
                        max_gap_s=max_gap_for(rate), input_channels=[f"f{i}" for i in range(12)])
        data = live.snapshot()
        windows, starts, ends = store.windows_with_times(12, 6, 1000, max_gap_for(rate))
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    assert x.shape[1:] == (12,) and x.dtype == np.float32
    first, last = x[:, 6], x[:, 9]  # min and max of channel 0: the window's first and last row
    # windows lie wholly inside one label interval: none across the change at 5400 s, each labelled by it
    assert np.all(last[y == 1] <= 5400) and np.all(first[y == 0] >= 5400) and set(y.tolist()) == {0, 1}
    assert len(y) == pytest.approx(2 * (5400 * rate - 12) / 6, abs=3)
    np.testing.assert_allclose(x[:, 0], (first + last) / 2, atol=0.5)  # the mean of an even ramp: its middle
    np.testing.assert_allclose(x[:, 1], 1000 + x[:, 0] / 100, rtol=1e-5)  # pressure's mean follows it
    # the newest rows are the test rows, and no sample is in both
    assert len(data.x_test) == int(0.2 * len(y)) and data.x_train[:, 9].max() < data.x_test[:, 6].min()
    # each row is exactly window_stats of one window the store cuts
    np.testing.assert_array_equal(data.x_test, features(windows[-len(data.x_test):]))


def test_a_feature_model_on_readings_of_another_count_is_refused_at_live_data(tmp_path):
    with SampleStore(tmp_path / "s.db", channels=3) as store:
        with pytest.raises(FeatureError, match="window_stats of 3 channels gives 12 features, the model takes 24"):
            LiveData(store, (24,), None, features=WindowStats(60, 3))
        with pytest.raises(ValueError, match="set up for 6 channels, the sensors give 3"):
            LiveData(store, (12,), None, features=WindowStats(60, 6))


# --------------------------------------------------------------------------------- training on it


def test_the_packaged_tabular_mlp_trains_on_live_imu_feature_rows_and_its_loss_goes_down(tmp_path):
    # Two subjects' watch recordings, read through the replay sensor as a 50 Hz IMU would give them, one
    # label interval per recording (an exercise); 50-row feature windows, 25 rows apart.
    raw = watch.load_raw()
    chosen = [i for i, s in enumerate(raw["subject"]) if s in (1, 2)]
    recordings = [np.asarray(raw["X"][i], np.float32) for i in chosen]
    np.savez(tmp_path / "imu.npz", samples=np.concatenate(recordings), channels=np.array(raw["X_labels"]))
    sensor = ReplaySensor(tmp_path / "imu.npz", rate_hz=50.0, loop=False)
    t, times, intervals = time.time() - 7200, [], []
    for i, recording in zip(chosen, recordings):
        stamps = t + np.arange(len(recording)) / 50.0
        intervals.append((stamps[0], stamps[-1], int(raw["y"][i])))
        times.append(stamps)
        t = stamps[-1] + 0.5  # the next exercise starts half a second later: no window is inside both
    times = np.concatenate(times)
    write_labels(tmp_path / "labels.csv", intervals)
    manifest = firmware_models.load_manifest("tabular_mlp")
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        store.append_many(times, np.stack([sensor.read() for _ in range(len(times))]))
        live = LiveData(store, tuple(manifest["input_shape"]), LabelSource(tmp_path / "labels.csv", 7),
                        stride=25, features=WindowStats(50, 6), input_channels=manifest["input_channels"])
        data = live.snapshot()
    assert data.x_train.shape[1:] == (24,) and len(data.x_train) > 500 and len(set(data.y_train.tolist())) == 7
    model = TrainableModel.from_package("tabular_mlp")
    weights = model.get_weights()  # the shipped weights: every round starts from the last one's result
    before = model.evaluate(data.x_train, data.y_train)[0], model.evaluate(data.x_test, data.y_test)[0]
    task = schemas.Task("train", "d", schemas.TrainConfig(epochs=1, lr=0.1), "f32")
    rng = np.random.default_rng(0)
    round_losses = []
    for _ in range(3):
        outcome = learner.train(model, weights, data, task, rng)
        delta, metrics = schemas.decode_update(outcome.attachment)
        weights = {name: weights[name] + delta[name] for name in weights}
        round_losses.append(metrics["train_loss"])
        assert outcome.examples == len(data.x_train)
    model.set_weights(weights)
    after = model.evaluate(data.x_train, data.y_train)[0], model.evaluate(data.x_test, data.y_test)[0]
    assert round_losses[2] < round_losses[1] < round_losses[0], round_losses
    assert after[0] < 0.5 * before[0], (before, after)  # on its training rows ...
    assert after[1] < 0.8 * before[1], (before, after)  # ... and on its newest rows, held out
