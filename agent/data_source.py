"""Where a running agent's data comes from, per its config: a replay file, or live sensors.

    with open_data(config, manifest) as data:   # LocalData, or LiveData fed by a running Sampler
        Agent(config, identity, model, data, ...).run(stop)

Live mode opens every [[sensor]], checks that their channels together fit the
model's input, opens the sample store (`state_dir/samples.db`) and the label
source, and keeps a `Sampler` running until the block ends. Anything wrong
with that is a `DataError` naming the field and the reason, raised before
the agent connects anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import AgentConfig
from .features import FeatureError, window_stats
from .labels import LabelError, LabelSource
from .live_data import LiveData, max_gap_for
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


@contextlib.contextmanager
def open_data(config: AgentConfig, manifest: dict[str, Any]) -> Iterator[LocalData | LiveData]:
    input_shape = tuple(manifest["input_shape"])
    if config.replay is not None:
        try:
            data = load_replay(config.replay, input_shape)
        except (OSError, ValueError) as exc:
            raise DataError(f"data.replay: {exc}") from exc
        yield data
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
