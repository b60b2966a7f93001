"""Where a running agent's data comes from, per its config: a replay file, or live sensors.

    with open_data(config, manifest) as data:   # LocalData, or LiveData fed by a running Sampler
        Agent(config, identity, model, data, ...).run(stop)
        Inference(..., windows_of(data), ..., training=training_of(data))   # with [inference]

Live mode opens every [[sensor]], checks that their channels together fit the
model's input, opens the sample store (`state_dir/samples.db`) and the label
source, and keeps a `Sampler` running until the block ends. Anything wrong
with that is a `DataError` naming the field and the reason, raised before
the agent connects anywhere.

The inference (agent/inference.py) runs on the same data as windows
(`windows_of`): live, `LiveWindows` cut from the sample store as the rounds
cut them; replay, `RecordedWindows`, the recorded windows in turn (a
stand-in for a stream).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import AgentConfig
from .features import FeatureError, WindowStats, model_inputs, window_length, window_stats
from .labels import LabelError, LabelSource
from .live_data import MAX_GAP_S, LiveData, max_gap_for
from .sample_store import SampleStore
from .sampler import Sampler
from .samples import LocalData, load_replay
from .sensors import Sensor, SensorError, open_sensor


class DataError(Exception):
    """The configured data cannot be used; the message names the field and why."""


def needs_labels(manifest: dict[str, Any]) -> bool:
    """A classifier learns from labels; a self-supervised model (manifest `task` other than that) does not."""
    return manifest.get("task", "classification") == "classification"


def num_classes(manifest: dict[str, Any]) -> int:
    classes = manifest["classes"]  # the class names, or their number
    return len(classes) if isinstance(classes, list) else int(classes)


def replay_data(path: Path, input_shape: tuple[int, ...], error: type[Exception] = DataError) -> LocalData:
    """The replay file's data, checked against the model's input; `error` ("data.replay: <why>") if it cannot
    be read or does not fit (`starling-agent predict` raises its own, agent/predict.py)."""
    try:
        return load_replay(path, input_shape)
    except (OSError, ValueError) as exc:
        raise error(f"data.replay: {exc}") from exc


@contextlib.contextmanager
def open_data(config: AgentConfig, manifest: dict[str, Any]) -> Iterator[LocalData | LiveData]:
    input_shape = tuple(manifest["input_shape"])
    if config.replay is not None:
        yield replay_data(config.replay, input_shape)
        return
    sampling = config.sampling
    labels = None
    if needs_labels(manifest):
        if sampling.labels is None:
            raise DataError(f"data.labels is required: {config.model} is a classifier and learns from labels "
                            "(choose a self-supervised model for unlabelled streams)")
        labels = LabelSource(sampling.labels, num_classes(manifest))
    sensors: list[Sensor] = []
    with contextlib.ExitStack() as stack:
        for i, options in enumerate(config.sensors):
            options = dict(options)
            try:
                sensor = open_sensor(options.pop("kind"), **options)
            except (SensorError, OSError, TypeError) as exc:
                raise DataError(f"sensor[{i}]: {exc}") from exc
            stack.callback(sensor.close)
            sensors.append(sensor)
        channels = sum(len(s.channels) for s in sensors)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        store = stack.enter_context(SampleStore(config.state_dir / "samples.db", channels, sampling.capacity,
                                                sampling.retention_s))
        try:
            live = LiveData(store, input_shape, labels, stride=sampling.stride or None,
                            test_fraction=sampling.test_fraction, max_gap_s=max_gap_for(sampling.rate_hz),
                            features=window_stats(sampling.features, sampling.feature_window, channels),
                            input_channels=manifest.get("input_channels"))
        except ValueError as exc:
            names = ", ".join(c for s in sensors for c in s.channels)
            field = "data.features" if isinstance(exc, FeatureError) else "sensor"  # it names both widths
            raise DataError(f"{field}: {exc} ({names})") from exc
        if labels is not None:
            try:  # a bad file is refused now; a missing one may be written later (rounds are skipped until then)
                labels.check()
            except (LabelError, OSError) as exc:
                raise DataError(f"data.labels: {exc}") from exc
        stack.enter_context(Sampler(sensors, store, sampling.rate_hz))
        yield live


# --- the inference's windows ------------------------------------------------------------------------------


def windows_of(data: LocalData | LiveData) -> LiveWindows | RecordedWindows:
    """The inference's windows for the agent's data: the live sample store, or the replay file's windows
    (training ones first, then the test ones, the newest in time)."""
    if isinstance(data, LiveData):
        return LiveWindows(data.store, data.input_shape, data.stride, data.max_gap_s, data.features)
    return RecordedWindows(np.concatenate([data.x_train, data.x_test]))


def training_of(data: LocalData | LiveData) -> Callable[[], LocalData]:
    """The device's labelled training windows, for personalization: the replay file's, or the newest ones the
    sample store holds, cut as a round cuts them (`LiveData.snapshot`, which raises NoData without enough)."""
    if isinstance(data, LiveData):
        return data.snapshot
    return lambda: data


class LiveWindows:
    """Windows cut from the sample store, as the rounds cut them (same length, stride and gap rule)."""

    def __init__(self, store: SampleStore, input_shape: Sequence[int], stride: int | None = None,
                 max_gap_s: float = MAX_GAP_S, features: WindowStats | None = None) -> None:
        self.store, self.input_shape, self.features = store, tuple(input_shape), features
        self.length = window_length(self.input_shape, features)
        self.stride = stride or max(1, self.length // 2)
        self.max_gap_s = max_gap_s
        self._last_end = -math.inf  # the newest window's end handed out so far
        self._rate = 0.0  # samples per second in that window (0: not known, read `limit` windows)

    def latest(self, limit: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The newest `limit` windows, oldest first, with their first and last sample times."""
        x, starts, ends = self.store.windows_with_times(self.length, self.stride, limit, self.max_gap_s)
        where = [{"start": float(s), "end": float(e)} for s, e in zip(starts, ends)]
        return model_inputs(x, self.input_shape, self.features), where

    def newest(self, limit: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Up to `limit` windows that end after the last ones handed out, oldest first, with their times.

        Only as many windows are read as can have come since the last run (at the rate the sensors gave the
        last window, one more for good measure): reading `limit` every time cost a 50 Hz device as much as
        the model itself."""
        want = limit
        if self._rate:
            since = time.time() - self._last_end
            want = min(limit, max(1, math.ceil(since * self._rate / self.stride) + 1))
        x, where = self.latest(want)
        fresh = [i for i, place in enumerate(where) if place["end"] > self._last_end]
        if fresh:
            newest = where[fresh[-1]]
            self._last_end = newest["end"]
            span = newest["end"] - newest["start"]
            self._rate = (self.length - 1) / span if span > 0 else 0.0
        return x[fresh], [where[i] for i in fresh]

    def recent(self, limit: int) -> np.ndarray:
        """The newest `limit` windows, whether handed out or not (to calibrate on)."""
        x = self.store.windows(self.length, self.stride, limit, self.max_gap_s)
        return model_inputs(x, self.input_shape, self.features)


class RecordedWindows:
    """Recorded windows handed out in turn, from the start again at the end: a replay device's stream."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x, dtype=np.float32)
        self._next = 0

    def newest(self, limit: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        n = len(self.x)
        if not n:
            return self.x, []
        index = (self._next + np.arange(min(limit, n))) % n
        self._next = int(index[-1] + 1) % n
        return self.x[index], [{"index": int(i)} for i in index]

    def latest(self, limit: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The last `limit` recorded windows (the newest in time), with their places in the recording."""
        first = max(0, len(self.x) - limit)
        return self.x[first:], [{"index": i} for i in range(first, len(self.x))]

    def recent(self, limit: int) -> np.ndarray:
        return self.latest(limit)[0]
