"""The emulator's per-device data: who gets which windows.

    devices = prepare_devices(scenario, workdir)   # [(name, path of its replay .npz)]

Sources (`[dataset] source`):
  * "watch": the smartwatch IMU data (hw/datasets.py), cut into windows and
    split in time into train and test per recording (no shared sample).
  * a folder of per-device `.npz` files, each with `X` [n, ...] and `y` [n]
    (split into train and test here: a seeded shuffle, `test_fraction` of it
    held out), or already split (`x_train`, `y_train`, `x_test`, `y_test`).
    Without `y` (unlabelled data, for a model that needs no labels: the
    scenario's load refuses it for a classifier) every label is 0.

Partitions (`[dataset] partition`):
  * "subject": one device per watch subject, or per file of the folder.
  * "dirichlet": every train window (and every test window) of the source is
    pooled and dealt to the devices with a label skew: for each class a
    Dirichlet(alpha, ..., alpha) draw says which share of that class's
    windows goes to each device. The same shares cut the class's test windows,
    so each device's local test split follows its own label mix. Seeded by
    `[run] seed`. A device left with fewer than MIN_TRAIN train windows (or no
    test window) gets some from the device that has the most.

Label skew between neighbourhoods (`[dataset] classes_by_neighbourhood`): after
the partition, device i keeps only the train and test windows of its
neighbourhood's classes (neighbourhood i mod N), so it trains and is tested
on those alone; a device left with fewer than MIN_TRAIN train windows or no
test window is an error naming the field.

The model's view (hw/model_tables.py): a tabular model (`tabular_mlp`) given
windows gets each window summarised to its features
(`firmware_models.mlp.window_features`); any other model gets the windows as
they are (the scenario's load checked that they fit).

Anomalies (`[dataset] anomalies`, hw/anomalies.py): a seeded share of each
device's test windows gets a sensor fault (seeded by `[run] seed` and the
device's index); the replay file then also holds `anomaly_test` (int8 per
test window: 0 normal, else the fault's kind code), which agents do not read
and the report (hw/model_report.py) scores the model against.

Every device's data is written as a replay file (`x_train`, `y_train`,
`x_test`, `y_test`) that `starling-agent` reads with `[data] replay`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .anomalies import channel_scale, inject
from .datasets import DeviceData, load_watch_devices, save_device_npz
from .model_tables import FEATURES, SYNTHETIC, data_view
from .scenario import Scenario, ScenarioError

MIN_TRAIN = 4  # train windows a device needs at least (a few steps of local training)
MIN_TEST = 1
ANOMALY_SALT = 31  # seeds each device's faults apart from every other seeded choice of the run


def _split_xy(x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    order = rng.permutation(len(y))
    n_test = min(len(y) - 1, max(1, int(round(test_fraction * len(y))))) if len(y) >= 2 else 0
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_folder_devices(folder: Path, test_fraction: float, seed: int) -> list[DeviceData]:
    """Every `.npz` in `folder` (sorted by name) as one device."""
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise ScenarioError(f"dataset.source: {folder} holds no .npz files")
    out = []
    for i, path in enumerate(files):
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = set(npz.files)
                if {"x_train", "x_test"} <= keys:
                    arrays = (npz["x_train"], _labels(npz, "y_train", len(npz["x_train"])), npz["x_test"],
                              _labels(npz, "y_test", len(npz["x_test"])))
                elif "X" in keys:
                    x = npz["X"]
                    y = _labels(npz, "y", len(x))
                    if y.ndim != 1 or len(x) != len(y):
                        raise ScenarioError(f"dataset.source: {path.name}: X {x.shape} and y {y.shape} do not match")
                    arrays = _split_xy(x, y, test_fraction, np.random.default_rng([seed, i]))
                else:
                    raise ScenarioError(f"dataset.source: {path.name} has arrays {sorted(keys)}; expected X and y "
                                        "(or x_train, y_train, x_test, y_test; without y for a model that needs "
                                        "no labels)")
        except (OSError, ValueError) as exc:
            raise ScenarioError(f"dataset.source: {path.name} is not a readable .npz: {exc}") from exc
        x_tr, y_tr, x_te, y_te = arrays
        out.append(DeviceData(path.stem, x_tr.astype(np.float32), y_tr.astype(np.int32),
                              x_te.astype(np.float32), y_te.astype(np.int32)))
    return out


def _labels(npz, key: str, n: int) -> np.ndarray:
    """The labels `key` of an .npz, or n zeros for unlabelled data (refused for a classifier at load)."""
    return npz[key] if key in npz.files else np.zeros(n, np.int32)


def _source_devices(scenario: Scenario) -> list[DeviceData]:
    if scenario.source == "watch":
        if scenario.partition == "subject":
            subjects = scenario.subjects or tuple(range(1, scenario.devices + 1))
        else:
            subjects = scenario.subjects or None
        return load_watch_devices(subjects, stride=scenario.stride, test_fraction=scenario.test_fraction)
    return load_folder_devices(Path(scenario.source), scenario.test_fraction, scenario.seed)


def _top_up(parts: list[list[int]], minimum: int, rng: np.random.Generator) -> None:
    """Move indices from the largest parts to those with fewer than `minimum` (in place)."""
    for part in parts:
        while len(part) < minimum:
            donor = max(parts, key=len)
            if len(donor) <= minimum:
                raise ScenarioError("dataset: too few windows to give every device "
                                    f"{minimum} (fewer devices, a smaller stride or more data)")
            part.append(donor.pop(int(rng.integers(len(donor)))))


def dirichlet_indices(y_train: np.ndarray, y_test: np.ndarray, devices: int, alpha: float,
                      seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per device (train indices, test indices) into the pooled arrays: a per-class Dirichlet label skew."""
    rng = np.random.default_rng(seed)
    train: list[list[int]] = [[] for _ in range(devices)]
    test: list[list[int]] = [[] for _ in range(devices)]
    for c in np.unique(np.concatenate([y_train, y_test])):
        shares = rng.dirichlet(np.full(devices, alpha))
        for labels, parts in ((y_train, train), (y_test, test)):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(int(i) for i in chunk)
    _top_up(train, MIN_TRAIN, rng)
    _top_up(test, MIN_TEST, rng)
    return [(np.sort(np.array(a, dtype=np.int64)), np.sort(np.array(b, dtype=np.int64))) for a, b in zip(train, test)]


def keep_classes(device: DeviceData, classes: tuple[int, ...]) -> DeviceData:
    """`device` with only the windows (train and test) whose label is one of `classes`."""
    train, test = np.isin(device.y_train, classes), np.isin(device.y_test, classes)
    return DeviceData(device.name, device.x_train[train], device.y_train[train], device.x_test[test],
                      device.y_test[test])


def _neighbourhood_skew(scenario: Scenario, devices: list[DeviceData]) -> list[DeviceData]:
    """Each device restricted to its neighbourhood's classes (scenario.classes_of), checked for enough windows."""
    if not scenario.neighbourhoods:
        return devices
    out = []
    for i, device in enumerate(devices):
        classes = scenario.classes_of(i)
        kept = keep_classes(device, classes)
        if kept.num_train < MIN_TRAIN or kept.num_test < MIN_TEST:
            raise ScenarioError(
                f"dataset.classes_by_neighbourhood: {device.name} (neighbourhood {i % len(scenario.neighbourhoods)}, "
                f"classes {list(classes)}) keeps {kept.num_train} train and {kept.num_test} test windows; it needs "
                f"at least {MIN_TRAIN} and {MIN_TEST} (its data has classes {sorted(set(device.y_train.tolist()))})")
        out.append(kept)
    return out


def partition(scenario: Scenario) -> list[DeviceData]:
    """The scenario's devices and their data, in device order (each kept to its neighbourhood's classes), as the
    model takes them (windows, or a tabular model's features)."""
    return _model_view(scenario, _neighbourhood_skew(scenario, _partition(scenario)))


def _model_view(scenario: Scenario, devices: list[DeviceData]) -> list[DeviceData]:
    """Windows summarised to a tabular model's features where it takes them (hw/model_tables.data_view)."""
    if scenario.model == SYNTHETIC or not devices or \
            data_view(scenario.model_spec, devices[0].x_train.shape[1:]) != FEATURES:
        return devices
    from firmware_models.mlp import window_features

    return [DeviceData(d.name, window_features(d.x_train), d.y_train, window_features(d.x_test), d.y_test)
            for d in devices]


def _partition(scenario: Scenario) -> list[DeviceData]:
    sources = _source_devices(scenario)
    if scenario.partition == "subject":
        if len(sources) < scenario.devices:
            raise ScenarioError(f"dataset.source has {len(sources)} devices' files for {scenario.devices} devices")
        return sources[: scenario.devices]
    x_tr = np.concatenate([d.x_train for d in sources])
    y_tr = np.concatenate([d.y_train for d in sources])
    x_te = np.concatenate([d.x_test for d in sources])
    y_te = np.concatenate([d.y_test for d in sources])
    width = len(str(scenario.devices))
    return [DeviceData(f"device-{i + 1:0{max(3, width)}d}", x_tr[a], y_tr[a], x_te[b], y_te[b])
            for i, (a, b) in enumerate(dirichlet_indices(y_tr, y_te, scenario.devices, scenario.alpha,
                                                         scenario.seed))]


def prepare_devices(scenario: Scenario, workdir: Path) -> list[tuple[str, Path]]:
    """Write one replay `.npz` per device under `workdir/data`; return (name, path) pairs in device order."""
    out = []
    for i, device in enumerate(partition(scenario)):
        path = workdir / "data" / f"{device.name}.npz"
        extra = {}
        if scenario.anomalies is not None:
            rng = np.random.default_rng([scenario.seed, ANOMALY_SALT, i])
            x_test, kinds = inject(device.x_test, channel_scale(device.x_train), scenario.anomalies, rng)
            device = DeviceData(device.name, device.x_train, device.y_train, x_test, device.y_test)
            extra["anomaly_test"] = kinds
        save_device_npz(device, path, extra)
        out.append((device.name, path))
    return out
