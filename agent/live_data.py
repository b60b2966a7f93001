"""A round's local data cut from the live sample store: fresh windows, labelled where labels exist.

    live = LiveData(store, input_shape=(128, 6), labels=LabelSource(path, 6))
    data = live.snapshot()   # LocalData, or NoData("not_enough_data" | "no_labels" | "bad_labels" | ...)

Every round takes the newest windows (up to `max_windows`). The newest
`test_fraction` of them are the device's local test windows, the older ones
its training windows; the windows that overlap both sides are dropped so no
sample is in both. A classifier trains only on labelled windows; a
self-supervised model (no `labels`) trains on every window, with label 0.

With `features` (agent/features.py, `[data] features`), a model on feature
rows learns from windows of `features.window` rows, each summed up as one
row (`window_stats`: per-channel mean, std, min, max); the windows are cut,
labelled and split exactly as above, only what the model sees is the row.

When the device has too little to offer, `snapshot` raises `NoData` with a
short reason, and the agent answers the task with a signed skip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .features import WindowStats, model_inputs, window_length
from .labels import LabelError, LabelSource, MissingLabels
from .sample_store import SampleStore
from .samples import LocalData

MAX_GAP_S = 1.0  # a longer step between two samples is a gap no window crosses (sensors stopped, device off)


def max_gap_for(rate_hz: float) -> float:
    """The gap rule for a sampler of `rate_hz` rows a second: `MAX_GAP_S`, or three of its periods when it is
    slower than that (a 1 Hz BME280 device's rows are a second apart give or take jitter; one a minute, a minute)."""
    return max(MAX_GAP_S, 3.0 / rate_hz)


class NoData(Exception):
    """The device cannot take part in this round with its data; `reason` says why (sent to the gateway)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class LiveData:
    def __init__(self, store: SampleStore, input_shape: tuple[int, ...], labels: LabelSource | None = None,
                 stride: int | None = None, max_windows: int = 1000, test_fraction: float = 0.2,
                 min_train_windows: int = 32, max_gap_s: float = MAX_GAP_S, features: WindowStats | None = None,
                 input_channels: Sequence[str] | None = None) -> None:
        self.store, self.input_shape, self.labels = store, tuple(input_shape), labels
        self.features = features
        if features is not None:  # rows of features, each from a window of `features.window` samples
            if features.channels != store.channels:
                raise ValueError(f"{features.name} is set up for {features.channels} channels, the sensors give "
                                 f"{store.channels}")
            features.check(self.input_shape, input_channels)  # FeatureError (a ValueError) naming both
        elif window_length(self.input_shape) * store.channels != math.prod(self.input_shape):
            raise ValueError(f"the model takes {self.input_shape}, the sensors give {store.channels} channels")
        # A window is [length, channels]; a model on single readings ([features]) takes windows of one sample.
        self.length = window_length(self.input_shape, features)
        self.stride = stride or max(1, self.length // 2)
        self.max_windows, self.test_fraction = max_windows, test_fraction
        self.min_train_windows, self.max_gap_s = min_train_windows, max_gap_s

    def snapshot(self) -> LocalData:
        windows, starts, ends = self.store.windows_with_times(self.length, self.stride, self.max_windows,
                                                              self.max_gap_s)
        if self.labels is not None:
            try:
                y = self.labels.label(starts, ends)
            except MissingLabels as exc:
                raise NoData("no_labels", str(exc)) from exc
            except (LabelError, OSError) as exc:
                raise NoData("bad_labels", str(exc)) from exc
            keep = y >= 0
            windows, starts, ends, y = windows[keep], starts[keep], ends[keep], y[keep]
            if not len(windows):
                raise NoData("no_labelled_windows", "no window lies inside a labelled interval")
        else:
            y = np.zeros(len(windows), dtype=np.int32)
        n_test = int(len(windows) * self.test_fraction)
        first_test = len(windows) - n_test
        train = np.flatnonzero(ends < starts[first_test]) if n_test else np.arange(len(windows))
        if len(train) < self.min_train_windows:
            raise NoData("not_enough_data", f"{len(train)} training windows, at least {self.min_train_windows} "
                         "needed")
        keep = np.concatenate([train, np.arange(first_test, len(windows))])  # only these become model inputs
        x = model_inputs(windows[keep], self.input_shape, self.features)
        return LocalData(x[:len(train)], y[train], x[len(train):], y[first_test:])
