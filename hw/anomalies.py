"""Injected anomalies in the devices' test windows, and how well a model's scores find them.

    settings = Anomalies(share=0.2)                          # [dataset] anomalies (hw/model_tables.py)
    x, kinds = inject(x_test, scale, settings, rng)          # kinds[i]: 0 = normal, else KIND_CODES[kind]
    auc(scores, kinds > 0)                                   # rank-based ROC AUC (numpy only)

Real fleets rarely have labels, so the emulator makes its own ground truth: a
seeded share of each device's test windows gets one of three sensor faults,
sized in the device's own per-channel standard deviations (`scale`, from its
train windows), so the faults are as large on a calm wearer as on a busy one:

    stuck   the sensor hangs: every channel repeats its reading at a random point
            in the first half of the window until the window ends
    spike   SPIKES distinct samples (a random time and channel each) pushed SPIKE_SD
            standard deviations up or down (a loose connector, a bit flip)
    drift   every channel ramps linearly from 0 to DRIFT_SD standard deviations
            (its sign drawn per channel) over the window: a bias creeping in

`magnitude` multiplies SPIKE_SD and DRIFT_SD (a stuck sensor has no size).
Train windows are never touched: the model learns what the fleet usually sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("stuck", "spike", "drift")
KIND_CODES = {kind: i + 1 for i, kind in enumerate(KINDS)}  # 0: a normal window (the replay file's anomaly_test)
SPIKES = 4  # spiked samples per window
SPIKE_SD = 10.0  # how far a spike goes, in the channel's standard deviations (x magnitude)
DRIFT_SD = 2.5  # where a drift ends, in the channel's standard deviations (x magnitude)
MIN_SD = 1e-6  # a constant channel still gets a fault of some size


@dataclass(frozen=True)
class Anomalies:
    """[dataset] anomalies: which share of every device's test windows gets a fault, of which kinds, how large."""

    share: float = 0.2  # of each device's test windows (rounded, at least 1 when it has 2 or more)
    kinds: tuple[str, ...] = KINDS  # dealt in turn to the chosen windows, in a seeded order
    magnitude: float = 1.0  # multiplies SPIKE_SD and DRIFT_SD

    def count(self, windows: int) -> int:
        """How many of `windows` test windows get a fault: the share, rounded, at least 1, and at least one
        window left normal (an AUC needs both)."""
        if windows < 2:
            return 0
        return min(windows - 1, max(1, round(self.share * windows)))


def channel_scale(x_train: np.ndarray) -> np.ndarray:
    """Per-channel (last axis) standard deviation of a device's train windows: the unit its faults are sized in."""
    flat = np.asarray(x_train, np.float64).reshape(-1, x_train.shape[-1])
    if not len(flat):
        return np.ones(x_train.shape[-1])
    return np.maximum(flat.std(axis=0), MIN_SD)


def inject(x_test: np.ndarray, scale: np.ndarray, settings: Anomalies,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `x_test` ([n, length, channels]) with `settings.count(n)` windows faulted, and each window's
    kind code (int8 [n]: 0 normal, KIND_CODES otherwise)."""
    x = np.array(x_test, np.float32, copy=True)
    if x.ndim != 3:
        raise ValueError(f"anomalies are injected into windows [n, length, channels], not {list(x.shape)}")
    n, length, channels = x.shape
    kinds = np.zeros(n, np.int8)
    chosen = rng.choice(n, settings.count(n), replace=False) if n else np.zeros(0, np.int64)
    order = rng.permutation(len(chosen))  # which window gets which kind, in turn over settings.kinds
    for position, i in enumerate(chosen[order]):
        kind = settings.kinds[position % len(settings.kinds)]
        kinds[i] = KIND_CODES[kind]
        if kind == "stuck":
            start = int(rng.integers(0, max(1, length // 2)))
            x[i, start:] = x[i, start]
        elif kind == "spike":  # SPIKES distinct samples (time, channel), each up or down
            for cell in rng.choice(length * channels, min(SPIKES, length * channels), replace=False):
                t, c = divmod(int(cell), channels)
                x[i, t, c] += rng.choice((-1.0, 1.0)) * SPIKE_SD * settings.magnitude * scale[c]
        else:  # drift
            signs = rng.choice((-1.0, 1.0), size=channels)
            ramp = np.linspace(0.0, 1.0, length)[:, None]
            x[i] += (ramp * signs * DRIFT_SD * settings.magnitude * scale).astype(np.float32)
    return x, kinds


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of `scores` for telling the `positive` windows from the others: the Mann-Whitney U over
    n_pos x n_neg, with tied scores given their average rank (so equal scores count one half). None when
    either side is empty."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based, ties averaged
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
