"""What the device's inference (agent/inference.py) keeps across restarts, under `<state_dir>/inference/`:

    model.cbor       the release in use (`save_release`, `load_release`): a restart runs it again at once
    threshold.json   an anomaly model's scores (`Calibration`): a restart keeps the threshold

Both are written atomically, mode 0600. A `Release` is the weights one run
computes with, whole, and which release they came from; its arrays are
read-only copies (`frozen`), so one thread can install it while another
reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol import cbor, schemas
from protocol.atomic import write_atomic

MODEL_FILE = Path("inference") / "model.cbor"  # under state_dir: the release in use
THRESHOLD_FILE = Path("inference") / "threshold.json"  # under state_dir: the calibration's scores
SAVE_EVERY_S = 300.0  # the calibration reaches the disk at most this often (SD cards wear) and at stop


# --- the release in use ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """Weights and the release they came from: what one run computes with, whole."""

    weights: dict[str, np.ndarray]  # read-only copies
    version: int | None = None  # None: the weights shipped with the model
    digest: str | None = None  # hex


def frozen(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies nobody can change: what one thread installs, another reads whole."""
    out = {}
    for name, value in weights.items():
        array = np.array(value, dtype=np.float32, copy=True)
        array.flags.writeable = False
        out[name] = array
    return out


def save_release(path: Path, release: Release) -> None:
    """Keep an installed release (version, digest, weights) at `path`, atomically; OSError if it cannot."""
    write_atomic(path, cbor.dumps({"version": release.version, "digest": bytes.fromhex(release.digest),
                                   "model": schemas.encode_model(release.weights)}), 0o600)


def load_release(path: Path, model) -> Release:
    """The release kept at `path`, set into `model` (which checks shapes and values: ValueError before any
    change). Raises whatever a mangled file, or one from another model, gives."""
    doc = cbor.loads(path.read_bytes(), max_bytes=schemas.MAX_MODEL_BYTES + 4096)
    weights = schemas.decode_model(doc["model"])
    model.set_weights(weights)
    return Release(frozen(weights), int(doc["version"]), bytes(doc["digest"]).hex())


# --- the device's own anomaly threshold -------------------------------------------------------------------


class Calibration:
    """The threshold an anomaly score is flagged against: the `quantile` of the last `keep` scores under one
    model, once at least `least` are in. A ring of floats; `path` keeps it across restarts (only read when
    not `writable`: `starling-agent predict` reads the service's file and never writes it)."""

    def __init__(self, quantile: float, keep: int, least: int, path: Path | None = None,
                 writable: bool = True) -> None:
        self.quantile, self.keep, self.least, self.path, self.writable = quantile, keep, least, path, writable
        self.model: str | None = None  # the digest of the model the scores are from (None: the shipped weights)
        self._ring = np.zeros(keep, dtype=np.float64)
        self._count = 0  # scores added under this model (the ring holds the last `keep`)
        self.threshold: float | None = None
        self._dirty = False
        self._saved_at = -math.inf

    @property
    def scores(self) -> np.ndarray:
        """The scores kept, oldest first."""
        n = min(self._count, self.keep)
        start = self._count % self.keep if self._count > self.keep else 0
        return np.roll(self._ring[:n], -start) if n == self.keep else self._ring[:n].copy()

    def reset(self, model: str | None) -> None:
        """A new model: its scores are not comparable with the old one's; start again."""
        self.model, self._count, self.threshold, self._dirty = model, 0, None, True

    def add(self, scores: np.ndarray) -> None:
        for score in np.asarray(scores, dtype=np.float64)[-self.keep:]:
            if math.isfinite(score):
                self._ring[self._count % self.keep] = score
                self._count += 1
        if self._count >= self.least:
            self.threshold = float(np.quantile(self.scores, self.quantile))
        self._dirty = True

    def save(self, now: float, force: bool = False) -> None:
        """Write the scores (atomically) if they changed and `SAVE_EVERY_S` passed since the last write."""
        if self.path is None or not self.writable or not self._dirty or (
                not force and now - self._saved_at < SAVE_EVERY_S):
            return
        doc = {"model": self.model, "quantile": self.quantile, "threshold": self.threshold,
               "scores": [float(s) for s in self.scores]}
        write_atomic(self.path, json.dumps(doc).encode(), mode=0o600)
        self._dirty, self._saved_at = False, now

    def load(self, model: str | None) -> bool:
        """Take the kept scores if they are `model`'s under this quantile; else start empty for `model`."""
        self.reset(model)
        self._dirty = False
        if self.path is None:
            return False
        try:
            doc = json.loads(self.path.read_text())
            if doc["model"] != model or doc["quantile"] != self.quantile:
                return False
            scores = np.asarray(doc["scores"], dtype=np.float64)
            if scores.ndim != 1 or not np.all(np.isfinite(scores)):
                return False
        except (OSError, ValueError, KeyError, TypeError):  # missing or mangled: calibrate again
            return False
        self.add(scores)
        self._dirty = False
        return bool(len(scores))
