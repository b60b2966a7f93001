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

Here: the `Inference` itself (the release in use, one run, the thread). Its
windows (`windows_of`, `training_of`) are agent/data_source.py's, what it
keeps on disk (`Release`, `Calibration`) agent/inference_state.py's, its
sinks agent/local_out.py's; `starling-agent predict` runs it once
(agent/predict.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protocol.logs import event

from .config import InferenceSettings
from .data_source import LiveWindows, RecordedWindows
from .inference_state import (
    MODEL_FILE,
    THRESHOLD_FILE,
    Calibration,
    Release,
    frozen,
    load_release,
    save_release,
)
from .live_data import NoData
from .local_out import Sink, SocketOut
from .personalize import NotBetter, Personalizer
from .samples import LocalData

log = logging.getLogger("starling.agent")  # the agent's logger: these are the agent's events

SEED_WINDOWS = 256  # windows scored at once to seed a new model's threshold (256 x 128 x 6 floats: 0.8 MB)
POLL_S = 0.5  # the thread looks at its stop flag (and its clients) at least this often


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
        self.release = Release(frozen(model.get_weights()))  # the shipped weights, until a release
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
        release = Release(frozen(weights), version, digest)
        with self._lock:
            current = self._pending or self.release
            if current.digest == digest:
                return
            self._pending = release
        if self._writable:
            try:
                save_release(self._model_file, release)
            except OSError as exc:  # a full disk costs the restart its release, not the device its inference
                event(log, "inference.model_not_saved", logging.ERROR, reason=str(exc))

    def load(self) -> None:
        """The release kept by an earlier run (if any, and if it fits this model), and its calibration."""
        if self._model_file.exists():
            try:
                self.release = load_release(self._model_file, self.model)
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

