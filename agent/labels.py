"""Where labels come from on a device that has them: a CSV file of labelled time intervals.

    start,end,label
    1763900000.0,1763900300.0,2
    1763900400.0,1763900460.0,0

Times are Unix seconds; `label` is a class index of the model. Whatever knows
the truth writes the file (a push button on a GPIO, an operator's app, a
building's schedule); the agent re-reads it when it changes. A sample window
gets a label when it lies wholly inside one interval; windows outside every
interval are unlabelled and not trained on by a classifier.

A bad file is refused whole, with the line and the reason (`LabelError`):
the agent then sits rounds out ("bad_labels") rather than train on guesses.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

HEADER = ["start", "end", "label"]
MAX_INTERVALS = 1_000_000


class LabelError(ValueError):
    """The label file cannot be used; the message names the line and why."""


class MissingLabels(LabelError):
    """The label file does not exist (yet)."""


class LabelSource:
    def __init__(self, path: str | Path, num_classes: int) -> None:
        self.path, self.num_classes = Path(path), num_classes
        self._seen: tuple[float, int] | None = None  # (mtime, size) of the file last read
        self._starts = self._ends = self._labels = np.empty(0)

    def _load(self) -> None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise MissingLabels(f"{self.path} does not exist") from None
        if self._seen == (info.st_mtime, info.st_size):
            return
        starts, ends, labels = [], [], []
        with self.path.open(newline="") as handle:
            rows = csv.reader(handle)
            if next(rows, None) != HEADER:
                raise LabelError(f"{self.path}: the first line must be {','.join(HEADER)}")
            for line, row in enumerate(rows, start=2):
                if line > MAX_INTERVALS:
                    raise LabelError(f"{self.path}: more than {MAX_INTERVALS} intervals")
                if not row:
                    continue
                try:
                    start, end, label = float(row[0]), float(row[1]), int(row[2])
                except (ValueError, IndexError):
                    raise LabelError(f"{self.path}:{line}: expected start,end,label numbers, got {row}") from None
                if not (math.isfinite(start) and math.isfinite(end) and start < end):
                    raise LabelError(f"{self.path}:{line}: start must be before end")
                if not 0 <= label < self.num_classes:
                    raise LabelError(f"{self.path}:{line}: label {label} is not a class of the model "
                                     f"(0 to {self.num_classes - 1})")
                starts.append(start), ends.append(end), labels.append(label)
        order = np.argsort(starts, kind="stable")
        s, e, lab = np.array(starts)[order], np.array(ends)[order], np.array(labels, dtype=np.int32)[order]
        if len(s) > 1 and np.any(s[1:] < e[:-1]):
            at = int(np.flatnonzero(s[1:] < e[:-1])[0])
            raise LabelError(f"{self.path}: intervals overlap ({s[at]}-{e[at]} and {s[at + 1]}-{e[at + 1]})")
        self._starts, self._ends, self._labels = s, e, lab
        self._seen = (info.st_mtime, info.st_size)

    def check(self) -> bool:
        """Read the file now: True when usable, False when it does not exist yet; LabelError when it is bad."""
        try:
            self._load()
        except MissingLabels:
            return False
        return True

    def label(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The label of each window [starts[i], ends[i]], or -1 where no one interval holds it whole."""
        self._load()
        out = np.full(len(starts), -1, dtype=np.int32)
        if not len(self._starts):
            return out
        # The interval that starts last at or before the window's start is the only one that can hold it.
        at = np.searchsorted(self._starts, starts, side="right") - 1
        inside = (at >= 0) & (ends <= self._ends[np.maximum(at, 0)])
        out[inside] = self._labels[at[inside]]
        return out
