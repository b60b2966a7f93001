"""The scenario's model and what its data must fit: `[training] model` and `[dataset] anomalies` (hw/scenario.py
documents both), checked at load. A ConfigError names the field; hw/scenario.py raises it as a ScenarioError.

    model, anomalies = parse_model_and_data(doc, base_dir, source, neighbourhoods)   # all of the below:
    model = parse_model(value, base_dir)       # "imu_cnn", "synthetic" or a built model folder (absolute)
    spec = model_spec(model)                   # its manifest: family, task, input shape, classes
    check_fit(spec, describe_data(source), neighbourhoods)   # the data's windows and labels against it
    anomalies = parse_anomalies(table, spec, data)

A model is a family of the zoo by name (`firmware_models.MODELS`: the package's own build of each family), the
synthetic stand-in (hw/synthetic.py), or the folder `starling-models build --out DIR` wrote (model.tflite,
weights.npz, manifest.json): another number of classes, another input shape, its own normalization. Everything
about it is read from its manifest. The data fit a model when each example has the model's input shape, or, for a
tabular model (`tabular_mlp`), when windows [length, C] summarise to its 4 x C features
(`firmware_models.mlp.window_features`, the family's own reference data); and, for a classifier, when every label
is one of its classes.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from protocol.config import ConfigError, resolve_path

from .anomalies import KINDS, Anomalies

SYNTHETIC = "synthetic"  # hw/synthetic.py's cheap quadratic: no .tflite, no data read
CLASSIFICATION, RECONSTRUCTION = "classification", "reconstruction"  # firmware_models.family.TASKS
MODEL_FILES = ("manifest.json", "model.tflite", "weights.npz")  # what `starling-models build --out DIR` writes
TABULAR_FAMILY = "tabular_mlp"
WINDOW_STATS = 4  # firmware_models.mlp.STATS: mean, std, min and max of each channel
FEATURES, WINDOWS = "features", "windows"  # how the data reach a model: summarised per window, or as they are
LABEL_KEYS = ("y", "y_train", "y_test")
EXAMPLE_KEYS = ("X", "x_train", "x_test")
ANOMALY_KEYS = {"share": (int, float), "kinds": list, "magnitude": (int, float)}


@dataclass(frozen=True)
class ModelSpec:
    """What the emulator needs to know of a model, read from its manifest."""

    name: str  # as the scenario holds it: a family of the zoo, "synthetic", or the folder's absolute path
    folder: Path | None  # where model.tflite, weights.npz and manifest.json are (None: synthetic)
    family: str
    task: str  # CLASSIFICATION or RECONSTRUCTION
    input_shape: tuple[int, ...]
    classes: int  # a classifier's; 0 otherwise

    @property
    def packaged(self) -> bool:
        """A model shipped in firmware_models, which `starling-agent run` loads by name (`[model] name`)."""
        import firmware_models

        return self.name in firmware_models.MODELS

    @property
    def manifest_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "manifest.json"

    @property
    def label(self) -> str:
        """E.g. "imu_cnn" or "imu_cnn, 6 classes, from /data/models/six"."""
        if self.folder is None or self.packaged:
            return self.name
        what = f"{self.classes} classes" if self.task == CLASSIFICATION else self.task
        return f"{self.family}, {what}, from {self.folder}"


@dataclass(frozen=True)
class DataShape:
    """The examples and labels a dataset source holds, read without loading the examples."""

    where: str  # "the watch data", or the folder
    example: tuple[int, ...]  # one example's shape: a window [length, channels] or a row [features]
    labels: tuple[int, ...] | None  # every label in it, sorted; None when a file has none (unlabelled data)


def parse_model(value: str, base_dir: Path) -> str:
    """`training.model`, checked: a family of the zoo or "synthetic" as it is, else a model folder's absolute path."""
    import firmware_models

    if value == SYNTHETIC or value in firmware_models.MODELS:
        return value
    try:
        folder = resolve_path(value, base_dir, "training.model")
        found = folder.is_dir()
    except OSError as exc:  # a name too long for the OS
        raise ConfigError(f"training.model: {str(exc)[:200]}") from exc
    if not found:
        raise ConfigError(f"training.model must be a model family ({', '.join(firmware_models.MODELS)}), "
                          f'"{SYNTHETIC}", or the folder of a built model (`starling-models build --out DIR`); '
                          f"{value!r} is none of them ({folder} is not a folder)")
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"training.model: {folder} has no {', '.join(missing)}; a model folder holds "
                          f"{', '.join(MODEL_FILES)} (`starling-models build --out DIR` writes them)")
    return str(folder)


@lru_cache(maxsize=16)
def model_spec(model: str) -> ModelSpec:
    """The model `model` (as parse_model returns it) as its manifest describes it, its files checked against the
    manifest's digests (a device refuses a model file that is not the one its manifest names)."""
    import firmware_models

    if model == SYNTHETIC:
        return ModelSpec(SYNTHETIC, None, SYNTHETIC, RECONSTRUCTION, (), 0)
    folder = firmware_models.model_dir(model) if model in firmware_models.MODELS else Path(model)
    where = f"training.model: {folder / 'manifest.json'}"
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist: build it with `starling-models build`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ConfigError(f"{where} is not a JSON object")
    task = manifest.get("task", CLASSIFICATION)
    shape = manifest.get("input_shape")
    if task not in (CLASSIFICATION, RECONSTRUCTION):
        raise ConfigError(f"{where}: task {task!r} is neither {CLASSIFICATION} nor {RECONSTRUCTION}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"{where}: input_shape {shape!r} is not a list of positive sizes")
    classes = manifest.get("num_classes", 0) if task == CLASSIFICATION else 0
    if task == CLASSIFICATION and not (isinstance(classes, int) and classes >= 2):
        raise ConfigError(f"{where}: a classifier needs num_classes >= 2, got {classes!r}")
    for key, name in (("sha256", manifest.get("file", "model.tflite")),
                      ("weights_sha256", manifest.get("weights_file", "weights.npz"))):
        try:
            actual = firmware_models.file_sha256(folder / name)
        except OSError as exc:
            raise ConfigError(f"training.model: {folder / name}: {exc}") from exc
        if actual != manifest.get(key):
            raise ConfigError(f"training.model: {folder / name} is not the file its manifest names ({key} "
                              f"{str(manifest.get(key))[:16]}..., the file's {actual[:16]}...): rebuild the folder")
    return ModelSpec(model, folder, str(manifest.get("family") or manifest.get("name") or "model"), task,
                     tuple(shape), int(classes))


# --- the data ------------------------------------------------------------------------------------------------------

def describe_data(source: str) -> DataShape:
    """The shape of one example and every label of `source` ("watch" or a folder of .npz, as hw/partition.py reads
    them); a folder's files must agree on the example shape."""
    if source == "watch":
        from .datasets import CHANNELS, CLASSES, WINDOW

        return DataShape("the watch data", (WINDOW, CHANNELS), tuple(range(CLASSES)))
    folder = Path(source)
    example: tuple[int, ...] | None = None
    labels: set[int] | None = set()
    for path in sorted(folder.glob("*.npz")):
        shapes = _npz_shapes(path)
        found = [shapes[k][1:] for k in EXAMPLE_KEYS if k in shapes]
        if not found:
            continue  # hw/partition.py names what the file lacks
        if example is None:
            example, first = found[0], path.name
        for shape in found:
            if shape != example:
                raise ConfigError(f"dataset.source: {path.name} holds examples of shape {list(shape)}, "
                                  f"{first} of {list(example)}; every device's must be alike")
        keys = [k for k in LABEL_KEYS if k in shapes]
        if not keys:
            labels = None  # unlabelled: fine for a self-supervised model
        elif labels is not None:
            with np.load(path, allow_pickle=False) as npz:
                for key in keys:
                    labels.update(int(v) for v in np.unique(npz[key]))
    if example is None:
        raise ConfigError(f"dataset.source: {folder} holds no .npz file with examples (X, or x_train and x_test)")
    return DataShape(str(folder), example, None if labels is None else tuple(sorted(labels)))


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array name -> shape of every array in an .npz, from the headers (the arrays are not read)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as handle:
                    version = np.lib.format.read_magic(handle)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shapes[info.filename[: -len(".npy")]] = tuple(int(d) for d in read(handle)[0])
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"dataset.source: {path.name} is not a readable .npz: {exc}") from exc
    return shapes


def data_view(spec: ModelSpec, example: tuple[int, ...]) -> str | None:
    """How data whose examples have shape `example` reach `spec`: WINDOWS (as they are), FEATURES (each window
    summarised, for a tabular model), or None: they do not fit."""
    if tuple(example) == spec.input_shape:
        return WINDOWS
    if spec.family == TABULAR_FAMILY and len(example) == 2 and spec.input_shape == (WINDOW_STATS * example[1],):
        return FEATURES
    return None


def check_fit(spec: ModelSpec, data: DataShape, neighbourhoods: tuple[tuple[int, ...], ...] = ()) -> None:
    """Refuse data that does not fit the model, naming both shapes (or the labels and the classes)."""
    if spec.name == SYNTHETIC:
        return  # it reads no data
    if data_view(spec, data.example) is None:
        hint = (f" (or {WINDOW_STATS} x C features of [length, C] windows)" if spec.family == TABULAR_FAMILY else "")
        raise ConfigError(f"training.model does not fit dataset.source: the data's windows are {list(data.example)}, "
                          f"the model ({spec.label}) takes {list(spec.input_shape)}{hint}")
    if spec.task != CLASSIFICATION:
        return  # learns from the windows alone
    if data.labels is None:
        raise ConfigError(f"training.model does not fit dataset.source: {data.where} has a file without labels (y), "
                          f"and the model ({spec.label}) is a classifier (an autoencoder such as imu_autoencoder "
                          "learns from unlabelled windows)")
    used = set(data.labels)
    if neighbourhoods:
        named = sorted({c for classes in neighbourhoods for c in classes})
        if named[-1] >= spec.classes:
            raise ConfigError(f"dataset.classes_by_neighbourhood names class {named[-1]}; the model ({spec.label}) "
                              f"has {spec.classes} classes (0 to {spec.classes - 1})")
        used &= set(named)
    outside = sorted(label for label in used if not 0 <= label < spec.classes)
    if outside:
        low, high = min(used), max(used)
        raise ConfigError(f"training.model does not fit dataset.source: the data's labels are {low} to {high} "
                          f"({len(used)} classes), the model ({spec.label}) has {spec.classes} classes "
                          f"(0 to {spec.classes - 1}); {outside[0]} is not one of them")


def parse_anomalies(table: Any, spec: ModelSpec, data: DataShape | None) -> Anomalies:
    """`dataset.anomalies`, checked: share (0 to 1, exclusive), kinds (of KINDS), magnitude (positive); the model
    must score windows by their reconstruction (its task), and the data be windows [length, channels]."""
    at = "dataset.anomalies"
    if not isinstance(table, dict):
        raise ConfigError(f"{at} must be a table, e.g. {{ share = 0.2, kinds = [\"spike\", \"drift\"] }}")
    for key, value in table.items():
        if key not in ANOMALY_KEYS:
            raise ConfigError(f"unknown key {at}.{key}; known: {', '.join(ANOMALY_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, ANOMALY_KEYS[key]):
            raise ConfigError(f"{at}.{key} has the wrong type ({type(value).__name__})")
    if spec.task != RECONSTRUCTION or spec.name == SYNTHETIC:
        raise ConfigError(f"{at}: the anomaly AUC scores windows by their reconstruction error, and training.model "
                          f"({spec.label}) is {'a classifier' if spec.task == CLASSIFICATION else 'the stand-in'}; "
                          "use a reconstruction model such as imu_autoencoder")
    if data is not None and len(data.example) != 2:
        raise ConfigError(f"{at}: the faults are injected into windows [length, channels]; the data's examples are "
                          f"{list(data.example)}")
    share = float(table.get("share", Anomalies.share))
    if not 0 < share < 1:  # NaN too
        raise ConfigError(f"{at}.share must be between 0 and 1 (of each device's test windows), got {share}")
    kinds = table.get("kinds", list(KINDS))
    if not kinds or not all(isinstance(k, str) and k in KINDS for k in kinds):
        raise ConfigError(f"{at}.kinds must list some of {', '.join(KINDS)}, got {kinds!r}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"{at}.kinds names a kind twice")
    magnitude = float(table.get("magnitude", Anomalies.magnitude))
    if not 0 < magnitude < math.inf:  # an infinite fault would make the device refuse its own data file
        raise ConfigError(f"{at}.magnitude must be a positive number, got {magnitude}")
    return Anomalies(share, tuple(kinds), magnitude)


def parse_model_and_data(doc: dict[str, Any], base_dir: Path, source: str,
                         neighbourhoods: tuple[tuple[int, ...], ...]) -> tuple[str, Anomalies | None]:
    """The scenario document's training.model (a family, "synthetic" or a model folder) and dataset.anomalies,
    checked against the data `source`: a model the data does not fit is refused now, naming both shapes."""
    model = parse_model(doc.get("training", {}).get("model", "imu_cnn"), base_dir)
    spec = model_spec(model)
    data = None if model == SYNTHETIC else describe_data(source)
    if data is not None:
        check_fit(spec, data, neighbourhoods)
    table = doc.get("dataset", {}).get("anomalies")
    return model, None if table is None else parse_anomalies(table, spec, data)
