"""Inference on the device: the agent runs its current model on its newest windows and hands the results on.

    inference = Inference(settings, TrainableModel(path, manifest=manifest), manifest, state_dir, device_id,
                          windows_of(data), sinks=[SocketOut(path), ...])
    inference.start()            # its own thread, every `[inference] every_s`
    inference.install(weights, version, digest)   # the agent's worker, when it accepts a newer release
    inference.stop()             # with the rest of the agent (SIGTERM)

The model: the newest release this device accepted from its gateway (the
signed, checked global model; `Downloads.fetch` calls `install` with it),
else the weights shipped with the model. Not the device's own fine-tuning of
a round: that is one round's step from the release, sent as an update the
gateway may still reject. The release in use is kept in
`<state_dir>/inference/model.cbor` (written atomically), so a restart runs
it again at once instead of falling back to the shipped weights until the
next task.

No torn weights: inference has its own `TrainableModel` (its own interpreter,
apart from the one the worker trains), and only the inference thread touches
it. `install` (any thread) copies the weights into an immutable `Release` and
leaves it under a lock; the inference thread takes it between two runs and
sets it whole, so every run computes with one release from start to end and
says which (`model_version`, `model_digest` in every result).

Each run takes the windows that ended after the last run's newest (at most
`[inference] windows`; live: cut from the sample store as the rounds cut
them; replay: the recorded windows in turn, a stand-in for a stream) and
gives one JSON object per window, oldest first:

    {"device": "<id>", "t": 1767000000.1, "start": ..., "end": ...,   # the window's first and last sample (Unix s)
     "model_version": 7, "model_digest": "<hex>",                     # null, null: the shipped weights
     "class": 3, "name": "IR", "probs": [0.01, ...]}                  # a classifier ("name" if the manifest names classes)
     "score": 0.042, "threshold": 0.11, "anomaly": false}             # a reconstruction model instead

(recorded windows say "index", their place in the recording, instead of
"start" and "end"). An autoencoder's `score` is its reconstruction error
(`TrainableModel.reconstruction_error`, normalized units); the `threshold` is
the device's own (`Calibration`): the `threshold_quantile` (0.99) of the
scores of its last `calibration_windows` windows under the same model, given
once `min_calibration` are in (until then `threshold` and `anomaly` are
null). A run's windows are flagged against the threshold from before the run
and only then join it, so a burst does not raise the bar it is measured
against; a lasting change does, as it becomes the device's normal. After a
new release the scores start again, seeded with the release's scores of the
newest windows the device holds (at most `SEED_WINDOWS`). The scores are kept
in `<state_dir>/inference/threshold.json` (atomically, at most every
`SAVE_EVERY_S` and at stop), so a restart keeps the threshold.

One log line per run (`inference.done windows=... ms=...`), memory bounded by
the settings (a run's windows, the scores kept, each client's backlog).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from protocol import cbor, schemas
from protocol.atomic import write_atomic
from protocol.logs import event

from .config import InferenceSettings
from .features import WindowStats, features_for_model, model_inputs, store_channels, window_length
from .live_data import LiveData, NoData, max_gap_for
from .local_out import SocketOut
from .personalize import NotBetter, Personalizer
from .sample_store import SampleStore
from .samples import LocalData

log = logging.getLogger("starling.agent")  # the agent's logger: these are the agent's events

MODEL_FILE = Path("inference") / "model.cbor"  # under state_dir: the release in use
THRESHOLD_FILE = Path("inference") / "threshold.json"  # under state_dir: the calibration's scores
SEED_WINDOWS = 256  # windows scored at once to seed a new model's threshold (256 x 128 x 6 floats: 0.8 MB)
SAVE_EVERY_S = 300.0  # the calibration reaches the disk at most this often (SD cards wear) and at stop
POLL_S = 0.5  # the thread looks at its stop flag (and its clients) at least this often
MAX_GAP_S = 1.0  # as LiveData's: no window across a pause of the sensors longer than this


@dataclass(frozen=True)
class Release:
    """Weights and the release they came from: what one run computes with, whole."""

    weights: dict[str, np.ndarray]  # read-only copies
    version: int | None = None  # None: the weights shipped with the model
    digest: str | None = None  # hex


class Sink(Protocol):
    """Where results go (agent/local_out.py): whole JSON lines, never blocking the caller."""

    where: str  # for the log: unix:<path>, mqtt://host:port/topic

    def open(self) -> Any: ...
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


# --- where the windows come from --------------------------------------------------------------------------


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


def training_of(data: LocalData | LiveData) -> Callable[[], LocalData]:
    """The device's labelled training windows, for personalization: the replay file's, or the newest ones the
    sample store holds, cut as a round cuts them (`LiveData.snapshot`, which raises NoData without enough)."""
    if isinstance(data, LiveData):
        return data.snapshot
    return lambda: data


def windows_of(data: LocalData | LiveData) -> LiveWindows | RecordedWindows:
    """The inference's windows for the agent's data: the live sample store, or the replay file's windows
    (training ones first, then the test ones, the newest in time)."""
    if isinstance(data, LiveData):
        return LiveWindows(data.store, data.input_shape, data.stride, data.max_gap_s, data.features)
    return RecordedWindows(np.concatenate([data.x_train, data.x_test]))


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


# --- the inference itself -----------------------------------------------------------------------------------


class Inference:
    """The device's own model, run on its newest windows every `settings.every_s`; results to `sinks`.

    Only one thread runs the model: the inference thread once `start`ed, else whoever calls `run`.
    """

    def __init__(self, settings: InferenceSettings, model, manifest: dict[str, Any], state_dir: Path,
                 device: str, source: LiveWindows | RecordedWindows, sinks: Sequence[Sink] = (),
                 writable: bool = True, personalizer: Personalizer | None = None,
                 training: Callable[[], LocalData] | None = None) -> None:
        self.settings, self.model, self.device, self.source = settings, model, device, source
        # [personalization]: each release tuned to the device's labelled windows (`training()`, which may raise
        # NoData) before it runs; `personal` says whether the weights in use are so tuned.
        if personalizer is not None and training is None:
            raise ValueError("personalization needs the device's training windows")
        self.personalizer, self.training = personalizer, training
        self.personal = False
        self.sinks = list(sinks)
        classes = manifest.get("classes")
        self.class_names = classes if isinstance(classes, list) and len(classes) == model.num_classes else None
        self.classifier = model.task == "classification"
        self._model_file, self._writable = state_dir / MODEL_FILE, writable
        self.calibration = Calibration(settings.threshold_quantile, settings.calibration_windows,
                                       settings.min_calibration, state_dir / THRESHOLD_FILE, writable)
        self.release = Release(_frozen(model.get_weights()))  # the shipped weights, until a release
        self._lock = threading.Lock()
        self._pending: Release | None = None  # installed, not yet set into the model
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.windows = 0
        self._idle = False  # the last run found no new windows (said once, not every run)

    # --- the release in use --------------------------------------------------------------------

    def install(self, weights: dict[str, np.ndarray], version: int, digest: str) -> None:
        """Use these weights from the next run on (any thread; they are copied). Kept on disk for restarts."""
        release = Release(_frozen(weights), version, digest)
        with self._lock:
            current = self._pending or self.release
            if current.digest == digest:
                return
            self._pending = release
        if self._writable:
            try:
                write_atomic(self._model_file, cbor.dumps({"version": version, "digest": bytes.fromhex(digest),
                                                           "model": schemas.encode_model(release.weights)}), 0o600)
            except OSError as exc:  # a full disk costs the restart its release, not the device its inference
                event(log, "inference.model_not_saved", logging.ERROR, reason=str(exc))

    def load(self) -> None:
        """The release kept by an earlier run (if any, and if it fits this model), and its calibration."""
        if self._model_file.exists():
            try:
                doc = cbor.loads(self._model_file.read_bytes(), max_bytes=schemas.MAX_MODEL_BYTES + 4096)
                weights = schemas.decode_model(doc["model"])
                self.model.set_weights(weights)  # shapes and values checked: ValueError before any change
                self.release = Release(_frozen(weights), int(doc["version"]), bytes(doc["digest"]).hex())
            except Exception as exc:  # mangled, or from another model: the shipped weights until a release
                event(log, "inference.model_not_loaded", logging.WARNING, reason=str(exc)[:200])
        self._personalize()
        self._calibrate()

    def _take_pending(self) -> None:
        """Set an installed release into the model: on the thread that runs it, between two runs."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        self.model.set_weights(pending.weights)
        self.release = pending
        event(log, "inference.model", version=pending.version, digest=pending.digest)
        self._personalize()
        self._calibrate()

    def _personalize(self) -> None:
        """With [personalization]: tune the release in use to the device's labelled training windows (kept in
        this model only, never sent). Without such windows, or if tuning fails, the release runs as it is."""
        self.personal = False
        if self.personalizer is None:
            return
        started = time.perf_counter()
        try:
            data = self.training()
            self.personalizer.fit(self.release.weights, data.x_train, data.y_train)
        except NoData as exc:  # a live device with too few labelled windows yet: the next release tries again
            event(log, "inference.not_personalized", reason=exc.reason)
            return
        except NotBetter as exc:  # the release fits this device's windows at least as well: it runs as it is
            event(log, "inference.not_personalized", reason="not_better", detail=str(exc)[:300])
            return
        except Exception as exc:  # the store could not be read, say: the release itself is still a good model
            self.model.set_weights(self.release.weights)
            event(log, "inference.not_personalized", logging.WARNING, reason=f"{type(exc).__name__}: {exc}"[:300])
            return
        self.personal = True
        event(log, "inference.personalized", windows=len(data.x_train), steps=self.personalizer.settings.steps,
              weights=",".join(self.personalizer.names), ms=round((time.perf_counter() - started) * 1000, 1),
              **self._model_fields())

    def _calibrate(self) -> None:
        """A reconstruction model's threshold for the release in use: kept, or seeded from the newest windows."""
        if self.classifier or self.calibration.load(self.release.digest):
            return
        x = self.source.recent(min(SEED_WINDOWS, self.calibration.keep))
        if len(x):
            self.calibration.add(self.model.reconstruction_error(x))
        self._save_calibration(force=True)

    def _save_calibration(self, force: bool = False) -> None:
        try:
            self.calibration.save(time.monotonic(), force)
        except OSError as exc:  # a full disk costs a restart the threshold, not the device its inference
            event(log, "inference.threshold_not_saved", logging.ERROR, reason=str(exc))

    # --- one run -------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """One run: the newest windows through the model (an installed release first); [] if none are new."""
        self._take_pending()
        x, where = self.source.newest(self.settings.windows)
        return self.predict(x, where) if len(x) else []

    def predict(self, x: np.ndarray, where: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per window of `x` (`where[i]` says which window it is), with the release in use."""
        release, now = self.release, round(time.time(), 3)
        head = {"device": self.device, "t": now, "model_version": release.version, "model_digest": release.digest,
                **({"personal": self.personal} if self.personalizer is not None else {})}
        results = []
        if self.classifier:
            probs = self.model.predict(x)
            for place, p in zip(where, probs):
                top = int(np.argmax(p))
                named = {"name": self.class_names[top]} if self.class_names else {}
                results.append({**head, **place, "class": top, **named, "probs": [float(v) for v in p]})
            return results
        scores = self.model.reconstruction_error(x)
        threshold = self.calibration.threshold  # from before this run (see the module doc)
        for place, score in zip(where, scores):
            anomaly = None if threshold is None else bool(score > threshold)
            results.append({**head, **place, "score": float(score), "threshold": threshold, "anomaly": anomaly})
        self.calibration.add(scores)
        return results

    # --- the thread --------------------------------------------------------------------------------

    def start(self) -> Inference:
        """Load what an earlier run kept, open the sinks, and run every `every_s` on a thread of its own."""
        try:
            self.load()
        except Exception as exc:  # the store could not be read to calibrate, say: the runs try again
            event(log, "inference.failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}"[:300])
        opened = []
        for sink in self.sinks:
            try:
                opened.append(sink.open())
            except OSError as exc:  # a stale path we may not replace, say: the agent runs, that sink is off
                event(log, "inference.sink_failed", logging.ERROR, sink=type(sink).__name__, reason=str(exc))
        self.sinks = opened
        self._thread = threading.Thread(target=self._loop, name="agent-inference", daemon=True)
        self._thread.start()
        event(log, "inference.start", every_s=self.settings.every_s, windows=self.settings.windows,
              task=self.model.task, **self._model_fields(),
              outputs=",".join(sink.where for sink in self.sinks) or "none")
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, close the sinks (the socket file goes), keep the calibration."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()
        self._save_calibration(force=True)
        event(log, "inference.stop", runs=self.runs, windows=self.windows)

    def _loop(self) -> None:
        next_run = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_run:
                next_run = now + self.settings.every_s  # a late run is not made up for: the next is the newest
                self._once()
            self._wait(min(POLL_S, max(0.0, next_run - time.monotonic())))

    def _wait(self, timeout: float) -> None:
        served = [sink for sink in self.sinks if isinstance(sink, SocketOut)]
        if served:
            served[0].serve(timeout)  # one socket at most: it waits for its clients while the thread waits
        else:
            self._stop.wait(timeout)

    def _once(self) -> None:
        started = time.perf_counter()
        try:
            results = self.run()
        except Exception as exc:  # the model or the store failed this once: the next run tries again
            event(log, "inference.failed", logging.ERROR, reason=f"{type(exc).__name__}: {exc}"[:300])
            return
        if not results:
            if not self._idle:
                event(log, "inference.idle", reason="no_new_windows")
            self._idle = True
            return
        self._idle = False
        ms = (time.perf_counter() - started) * 1000
        lines = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in results)
        for sink in self.sinks:
            try:
                sink.send(lines)
            except Exception as exc:  # a sink's trouble is never the agent's
                event(log, "inference.send_failed", logging.WARNING, sink=type(sink).__name__, reason=str(exc))
        self._save_calibration()
        self.runs += 1
        self.windows += len(results)
        event(log, "inference.done", windows=len(results), ms=round(ms, 1), **self._model_fields(),
              **_summary(results))

    def _model_fields(self) -> dict[str, Any]:
        """The release in use, for a log line: `model=shipped`, or its short digest and version."""
        release = self.release
        if release.digest is None:
            return {"model": "shipped"}
        return {"model": release.digest[:12], "version": release.version}


# --- one shot: `starling-agent predict` -----------------------------------------------------------------------

INPUT_ARRAYS = ("x", "X", "windows", "x_test")  # what an .npz's windows may be called, in this order


class InputError(ValueError):
    """The windows to predict on cannot be had; the message says why."""


def read_windows(path: Path, input_shape: Sequence[int]) -> np.ndarray:
    """Windows from an .npy (the array) or .npz (`x`, `X`, `windows` or `x_test`, or its only array):
    [n, *input_shape] float32, or one window [*input_shape]."""
    shape = tuple(input_shape)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                names = [n for n in INPUT_ARRAYS if n in loaded.files]
                if not names and len(loaded.files) != 1:
                    raise InputError(f"{path}: no array named {', '.join(INPUT_ARRAYS)} among {loaded.files}")
                x = loaded[(names or loaded.files)[0]]
        else:
            x = loaded
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy or .npz ({exc})") from exc
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(f"{path}: windows must be numbers, got {x.dtype}")
    x = np.asarray(x, dtype=np.float32)
    if x.shape == shape:
        x = x[None]
    if x.shape[1:] != shape:
        raise InputError(f"{path}: windows are {tuple(x.shape[1:])}, the model takes {shape}")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path}: windows hold NaN or infinite values")
    return x


@contextlib.contextmanager
def device_data(config, manifest: dict[str, Any]):
    """The device's own windows, read only: (its inference windows, its labelled training windows as a
    `training_of` callable): the replay file's, or the live sample store's (no sampling)."""
    from .data_source import needs_labels, num_classes
    from .labels import LabelSource
    from .samples import load_replay

    shape = tuple(manifest["input_shape"])
    if config.replay is not None:
        try:
            data = load_replay(config.replay, shape)
        except (OSError, ValueError) as exc:
            raise InputError(f"data.replay: {exc}") from exc
        yield windows_of(data), training_of(data)
        return
    db = config.state_dir / "samples.db"
    if not db.is_file():
        def nothing() -> LocalData:
            raise NoData("not_enough_data", "nothing sampled yet")

        yield RecordedWindows(np.zeros((0, *shape), np.float32)), nothing
        return
    features = features_for_model(config.sampling.features, config.sampling.feature_window, shape)
    try:
        store = SampleStore(db, store_channels(shape, features), config.sampling.capacity, config.sampling.retention_s)
    except sqlite3.Error as exc:  # e.g. run as a user who may not read the agent's state folder
        raise InputError(f"cannot read the sample store {db}: {exc}") from exc
    labels = (LabelSource(config.sampling.labels, num_classes(manifest))
              if needs_labels(manifest) and config.sampling.labels is not None else None)
    with store:
        live = LiveData(store, shape, labels, stride=config.sampling.stride or None,
                        test_fraction=config.sampling.test_fraction, max_gap_s=max_gap_for(config.sampling.rate_hz),
                        features=features)
        yield windows_of(live), training_of(live)


def predict_once(config, settings: InferenceSettings, model, manifest: dict[str, Any], device: str,
                 input_path: Path | None = None, count: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """`starling-agent predict`: the results for the windows in `input_path`, or for the device's newest
    `count` windows, with the release and threshold the service keeps (read, never written), and, with
    [personalization], that release tuned to the device's training windows as the service tunes it (`seed`:
    the service's, its device key's node id mod 2**32)."""
    with device_data(config, manifest) as (source, training):
        personalizer = (Personalizer(config.personalization, model, seed)
                        if config.personalization is not None else None)
        inference = Inference(settings, model, manifest, config.state_dir, device, source, writable=False,
                              personalizer=personalizer, training=training)
        inference.load()  # the release in use and the threshold (or one seeded from the device's windows)
        if input_path is not None:
            x = read_windows(input_path, model.input_shape)
            where: list[dict[str, Any]] = [{"index": i} for i in range(len(x))]
        else:
            x, where = source.latest(count)
            if not len(x):
                raise InputError("no windows: the device has sampled too little yet (or give --input FILE)")
        return inference.predict(x, where)


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run's log line says besides its size: the newest window's class and the counts; or the
    highest score, the threshold and how many were flagged."""
    if "class" in results[0]:
        counts: dict[str, int] = {}
        for r in results:
            key = str(r.get("name", r["class"]))
            counts[key] = counts.get(key, 0) + 1
        return {"newest": results[-1].get("name", results[-1]["class"]),
                "classes": ",".join(f"{k}:{n}" for k, n in sorted(counts.items()))}
    threshold = results[0]["threshold"]
    return {"max_score": round(max(r["score"] for r in results), 6),
            "threshold": "none" if threshold is None else round(threshold, 6),
            "anomalies": sum(1 for r in results if r["anomaly"])}


def _frozen(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies nobody can change: what one thread installs, another reads whole."""
    out = {}
    for name, value in weights.items():
        array = np.array(value, dtype=np.float32, copy=True)
        array.flags.writeable = False
        out[name] = array
    return out
