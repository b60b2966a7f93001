"""`starling-agent predict`: the device's inference once, printed instead of served.

    results = predict_once(config, settings, model, manifest, device, input_path=None, count=32, seed=seed)

The results are the inference thread's (agent/inference.py), one dict per
window: for the windows in a file (`read_windows`: an .npy, or an .npz's
`x`, `X`, `windows` or `x_test`), or for the device's newest windows
(`device_data`: the replay file's, or the live sample store's, read only:
nothing is sampled). The release and threshold are the ones the service keeps
in `state_dir/inference/`, read and never written. Anything in the way is an
`InputError` saying why.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import InferenceSettings
from .data_source import RecordedWindows, needs_labels, num_classes, replay_data, training_of, windows_of
from .features import features_for_model, store_channels
from .inference import Inference
from .labels import LabelSource
from .live_data import LiveData, NoData, max_gap_for
from .personalize import Personalizer
from .sample_store import SampleStore
from .samples import LocalData

INPUT_ARRAYS = ("x", "X", "windows", "x_test")  # what an .npz's windows may be called, in this order


class InputError(ValueError):
    """The windows to predict on cannot be had; the message says why."""


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
    shape = tuple(manifest["input_shape"])
    if config.replay is not None:
        data = replay_data(config.replay, shape, InputError)  # as the service loads it (agent/data_source.py)
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
