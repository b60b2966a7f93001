"""Features the agent computes from live sample windows, for a model that takes one feature row per example.

    features = window_stats("window_stats", window=50, channels=6)   # None for "": the model takes raw windows
    features.check((24,), manifest.get("input_channels"))             # FeatureError unless it fits the model
    rows = features(windows)                                          # [n, 50, 6] -> [n, 24] float32

`window_stats`: per channel the mean, std (population, ddof 0), min and max
of a window of `window` rows, stat-major (all means, then all stds, all
mins, all maxes), channels in sampler order. It is what `tabular_mlp` was
built on (`firmware_models.mlp.window_features`, whose names the manifest's
`input_channels` lists: `ax_mean` ... `wz_max`), computed here with numpy
alone: the agent does not import the build code. The model's normalization
is inside its graph, so rows stay in sensor units.

`LiveData` (rounds) and the inference's `LiveWindows` both turn their
windows into the model's input with `model_inputs`, so inference sees what
training saw.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STATS = ("mean", "std", "min", "max")
KINDS = ("window_stats",)  # what `[data] features` may say ("" or absent: none)
MAX_WINDOW = 1000  # rows per feature row: a round holds up to 1000 windows of them at once (24 MB at 6 channels)
_GENERIC_NAME = re.compile(r"f\d+")  # what a model built for features it cannot name calls them (f0, f1, ...)


class FeatureError(ValueError):
    """The extractor does not fit the model; the message names both."""


@dataclass(frozen=True)
class WindowStats:
    """Per-channel mean, std, min and max of windows of `window` rows of `channels` channels."""

    window: int
    channels: int
    name: str = "window_stats"

    def __post_init__(self) -> None:
        if not 2 <= self.window <= MAX_WINDOW:
            raise FeatureError(f"{self.name}: a feature window is 2 to {MAX_WINDOW} rows, got {self.window}")
        if self.channels < 1:
            raise FeatureError(f"{self.name}: needs at least one channel, got {self.channels}")

    @property
    def width(self) -> int:
        """Features per row."""
        return len(STATS) * self.channels

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """`[n, window, channels]` windows -> float32 `[n, width]` feature rows."""
        x = np.asarray(windows, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.window, self.channels):
            raise FeatureError(f"{self.name}: expected windows [n, {self.window}, {self.channels}], "
                               f"got {list(x.shape)}")
        out = np.empty((len(x), self.width), dtype=np.float32)
        c = self.channels
        out[:, :c] = x.mean(axis=1)
        out[:, c:2 * c] = x.std(axis=1)
        out[:, 2 * c:3 * c] = x.min(axis=1)
        out[:, 3 * c:] = x.max(axis=1)
        return out

    def names(self, channels: Sequence[str]) -> list[str]:
        """The features' names for these channel names, in output order: `ax_mean`, `ay_mean`, ..."""
        return [f"{channel}_{stat}" for stat in STATS for channel in channels]

    def check(self, input_shape: Sequence[int], input_channels: Sequence[str] | None = None) -> None:
        """Refuse (FeatureError) a model these rows do not fit: it takes windows, another width, or (when its
        manifest names its inputs) another order of statistics or channels."""
        shape = tuple(input_shape)
        if len(shape) != 1:
            raise FeatureError(f"{self.name} gives rows of {self.width} features, the model takes windows {shape}: "
                               "leave data.features out for a window model")
        if shape[0] != self.width:
            raise FeatureError(f"{self.name} of {self.channels} channels gives {self.width} features, the model "
                               f"takes {shape[0]}")
        names = list(input_channels or [])
        if len(names) != self.width or all(_GENERIC_NAME.fullmatch(str(n)) for n in names):
            return  # the manifest does not name its features: nothing more to compare
        # Named: each must be <channel>_<stat>, stat-major, the same channels in the same order in every block.
        # (The channel part is not compared with the sensors' names: drivers name theirs with units, "ax_g",
        # models with their data set's names, "ax".)
        channels = [str(n)[:-len("_mean")] for n in names if str(n).endswith("_mean")]  # the model's channels
        if len(channels) != self.channels:
            channels = [str(n).rsplit("_", 1)[0] for n in names[:self.channels]]
        expected = self.names(channels)
        for i, (got, want) in enumerate(zip(names, expected)):
            if got != want:
                raise FeatureError(f"{self.name} gives {want} as feature {i}, the model takes {got} there "
                                   f"(its input_channels are not per-channel {', '.join(STATS)}, stat-major)")


def window_stats(kind: str, window: int, channels: int) -> WindowStats | None:
    """The extractor `[data] features` names (None for "": the model takes raw windows or readings)."""
    if not kind:
        return None
    if kind not in KINDS:
        raise FeatureError(f"unknown feature extractor {kind!r}; known: {', '.join(KINDS)}")
    return WindowStats(window, channels)


def window_length(input_shape: Sequence[int], features: WindowStats | None = None) -> int:
    """Rows of samples per model input: the feature window; a window model's length; 1 for single readings."""
    if features is not None:
        return features.window
    shape = tuple(input_shape)
    return shape[0] if len(shape) == 2 else 1


def model_inputs(windows: np.ndarray, input_shape: Sequence[int], features: WindowStats | None = None) -> np.ndarray:
    """Sample windows `[n, length, channels]` as the model takes them: feature rows, or reshaped to
    `[n, *input_shape]`."""
    if features is not None:
        return features(windows)
    return windows.reshape(len(windows), *input_shape)


def store_channels(input_shape: Sequence[int], features: WindowStats | None = None) -> int:
    """How many channels a sample store holds for a model of `input_shape` (with these features)."""
    if features is not None:
        return features.channels
    return math.prod(input_shape) // window_length(input_shape)


def features_for_model(kind: str, window: int, input_shape: Sequence[int]) -> WindowStats | None:
    """The extractor `[data] features` names, for a model of `input_shape` (the channels it was built for):
    what reads a sample store knowing only the config and the manifest (`starling-agent predict`) needs."""
    if not kind:
        return None
    shape = tuple(input_shape)
    if len(shape) != 1 or shape[0] % len(STATS):
        raise FeatureError(f"{kind} gives rows of {len(STATS)} features per channel, the model takes {shape}")
    return window_stats(kind, window, shape[0] // len(STATS))
