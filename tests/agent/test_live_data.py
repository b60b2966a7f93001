"""A round's data from the live sample store: labels from a label file, a clean train/test split,
and a short, specific reason when the device has nothing to offer."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from agent.labels import LabelError, LabelSource
from agent.live_data import LiveData, NoData
from agent.sample_store import SampleStore

RATE = 50.0


def fill(store: SampleStore, seconds: float, start: float) -> np.ndarray:
    """`seconds` of 50 Hz samples from `start`; channel 0 holds the sample time, to check windows against."""
    times = start + np.arange(int(seconds * RATE)) / RATE
    values = np.repeat((times - start)[:, None], store.channels, axis=1).astype(np.float32)
    store.append_many(times, values)
    return times


def write_labels(path, rows) -> None:
    path.write_text("start,end,label\n" + "".join(f"{s},{e},{lab}\n" for s, e, lab in rows))


def test_windows_inside_a_labelled_interval_get_its_label_and_others_are_left_out(tmp_path):
    now = time.time() - 600
    labels = tmp_path / "labels.csv"
    write_labels(labels, [(now, now + 60, 2), (now + 60, now + 120, 4)])  # nothing after 120 s
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        fill(store, 180, now)
        data = LiveData(store, (128, 6), LabelSource(labels, 6)).snapshot()
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    first, last = x[:, 0, 0], x[:, -1, 0]  # seconds since `now`
    assert set(y.tolist()) == {2, 4}
    assert np.all(last[y == 2] <= 60) and np.all(first[y == 4] >= 60) and np.all(last <= 120)
    assert len(y) == pytest.approx(2 * (60 * RATE - 128) / 64, abs=3)  # none across the label change


def test_the_newest_windows_are_the_test_windows_and_share_no_sample_with_training(tmp_path):
    now = time.time() - 600
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        fill(store, 120, now)
        data = LiveData(store, (128, 6), None, test_fraction=0.25).snapshot()
    assert len(data.x_test) == pytest.approx(0.25 * (len(data.x_test) + len(data.x_train)) + 0.5, abs=1)
    assert data.x_train[:, -1, 0].max() < data.x_test[:, 0, 0].min()
    assert not data.y_train.any()  # unlabelled: a self-supervised model trains on raw windows


def test_a_gap_in_the_samples_never_ends_up_inside_a_window(tmp_path):
    now = time.time() - 600
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        fill(store, 30, now)
        fill(store, 30, now + 40)  # ten seconds with the device off
        data = LiveData(store, (128, 6), None, test_fraction=0.0).snapshot()
    spans = data.x_train[:, -1, 0] - data.x_train[:, 0, 0]
    assert np.allclose(spans, 127 / RATE, atol=1e-3)


def test_too_few_windows_no_labels_and_a_bad_label_file_each_have_their_reason(tmp_path):
    now = time.time() - 600
    labels = tmp_path / "labels.csv"
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        fill(store, 20, now)
        with pytest.raises(NoData) as short:
            LiveData(store, (128, 6), None).snapshot()
        assert short.value.reason == "not_enough_data"
        fill(store, 120, now + 20)
        live = LiveData(store, (128, 6), LabelSource(labels, 6))
        with pytest.raises(NoData) as missing:
            live.snapshot()
        assert missing.value.reason == "no_labels"
        write_labels(labels, [(now - 100, now - 50, 1)])
        with pytest.raises(NoData) as none:
            live.snapshot()
        assert none.value.reason == "no_labelled_windows"
        write_labels(labels, [(now, now + 200, 9)])
        os.utime(labels, (now, now + 1))  # a new mtime even within the file system's time resolution
        with pytest.raises(NoData) as bad:
            live.snapshot()
        assert bad.value.reason == "bad_labels" and "label 9 is not a class" in str(bad.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("begin,end,label\n1,2,0\n", "first line must be start,end,label"),
        ("start,end,label\n1,x,0\n", ":2: expected start,end,label numbers"),
        ("start,end,label\n5,2,0\n", ":2: start must be before end"),
        ("start,end,label\n1,2,0\nnan,3,0\n", ":3: start must be before end"),
        ("start,end,label\n1,5,0\n4,8,1\n", "intervals overlap"),
        ("start,end,label\n1,2,-1\n", "label -1 is not a class"),
    ],
)
def test_a_bad_label_file_is_refused_with_the_line_and_the_reason(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(LabelError, match=message):
        LabelSource(path, 6).check()


def test_a_model_on_single_readings_takes_one_sample_per_window(tmp_path):
    now = time.time() - 600
    with SampleStore(tmp_path / "s.db", channels=3) as store:
        fill(store, 10, now)
        data = LiveData(store, (3,), None).snapshot()
    assert data.x_train.shape[1:] == (3,) and len(data.x_train) + len(data.x_test) == 500


def test_sensors_that_do_not_fit_the_model_are_refused(tmp_path):
    with SampleStore(tmp_path / "s.db", channels=3) as store, pytest.raises(ValueError, match="3 channels"):
        LiveData(store, (128, 6), None)
