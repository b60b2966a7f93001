"""A replay sensor: samples recorded earlier, from a CSV or an NPZ file, one row per read.

CSV: a header row naming the channels, then one row of numbers per sample.
NPZ: an array `samples` [n, channels] (or `X` [windows, 128, channels], read
window by window) and optionally `channels` (names). At the end it starts
over (`loop=True`) or raises SensorError.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .base import SensorError


class ReplaySensor:
    def __init__(self, path: str | Path, rate_hz: float = 50.0, loop: bool = True, name: str = "") -> None:
        self.path = Path(path)
        self.rate_hz = rate_hz
        self.loop = loop
        self.name = name or f"replay:{self.path.name}"
        self.samples, self.channels = _load(self.path)
        if not np.all(np.isfinite(self.samples)):
            raise SensorError(f"{self.path}: has NaN or infinite values")
        self._next = 0

    def read(self) -> np.ndarray:
        if self._next >= len(self.samples):
            if not self.loop:
                raise SensorError(f"{self.path}: no more samples")
            self._next = 0
        sample = self.samples[self._next]
        self._next += 1
        return sample

    def close(self) -> None:
        pass


def _load(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as handle:
                rows = list(csv.reader(handle))
            if len(rows) < 2:
                raise SensorError(f"{path}: needs a header row and at least one sample")
            header, body = rows[0], rows[1:]
            try:
                data = np.array([[float(v) for v in row] for row in body], dtype=np.float32)
            except ValueError as exc:
                raise SensorError(f"{path}: a value is not a number ({exc})") from exc
            if data.ndim != 2 or data.shape[1] != len(header):
                raise SensorError(f"{path}: every row needs {len(header)} values, as the header")
            return data, tuple(header)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "samples" in npz:
                    data = np.asarray(npz["samples"], dtype=np.float32)
                elif "X" in npz and npz["X"].ndim == 3:
                    data = np.asarray(npz["X"], dtype=np.float32).reshape(-1, npz["X"].shape[2])
                else:
                    raise SensorError(f"{path}: needs an array `samples` [n, channels] or `X` [windows, t, channels]")
                names = tuple(str(c) for c in npz["channels"]) if "channels" in npz else ()
            if data.ndim != 2 or not len(data):
                raise SensorError(f"{path}: `samples` must be a non-empty [n, channels] array")
            return data, names or tuple(f"ch{i}" for i in range(data.shape[1]))
    except OSError as exc:
        raise SensorError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:  # numpy's refusal of a damaged file
        raise SensorError(f"{path}: not a readable NPZ file ({exc})") from exc
    raise SensorError(f"{path}: replay files are .csv or .npz")
