"""Where the agent's model comes from: `[model] name` (a model shipped in firmware_models) or `[model] path` (the
folder `starling-models build ... --out DIR` wrote). One code path for every command that loads the model
(`starling-agent run`, `predict`, `doctor`; the emulator's device pools, attackers and reports):

    source = model_source(config)        # the folder and its manifest, checked; no interpreter yet
    model = source.load()                # a `TrainableModel` (one interpreter: one per user, as inference's own)
    manifest, model = load_model("imu_cnn")   # both at once; a name of the zoo or a folder's path

The manifest drives everything else (input shape, classes, task, normalization), a built model's exactly as a
packaged one's. A folder that is not a built model, a manifest that is not one, or a model file that is not the
one its manifest names (sha256) is refused with `ModelError`, naming the file and what to do.

This module imports only the standard library until `load` (config checks use it on small devices).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from protocol.fields import is_int

if TYPE_CHECKING:
    from firmware_models.runtime import TrainableModel


class NamesAModel(Protocol):
    """What this module reads of an agent config (agent/config.py's AgentConfig, which imports this module)."""

    model: str
    model_path: Path | None

__all__ = ["ModelError", "ModelSource", "load_model", "model_source", "read_folder"]

BUILD_HINT = "`starling-models build ... --out DIR` writes manifest.json, model.tflite and weights.npz"


class ModelError(ValueError):
    """The model cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ModelSource:
    """A model's folder and its manifest, checked."""

    label: str  # as the config gives it: the packaged model's name, or the built folder's path
    folder: Path
    manifest: dict[str, Any]
    packaged: bool  # shipped in firmware_models ([model] name), else a built folder ([model] path)

    @property
    def file(self) -> Path:
        return self.folder / self.manifest.get("file", "model.tflite")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def task(self) -> str:
        return str(self.manifest.get("task", "classification"))

    def describe(self) -> str:
        """E.g. "imu_cnn: input [128, 6], classification (6 classes)" or "/data/six (imu_cnn): ..."."""
        what = self.task
        if what == "classification" and self.manifest.get("num_classes"):
            what += f" ({self.manifest['num_classes']} classes)"
        family = "" if self.packaged else f" ({self.manifest.get('family') or self.manifest.get('name', '?')})"
        return f"{self.label}{family}: input {list(self.input_shape)}, {what}"

    def check_digest(self) -> None:
        """The model file is the one its manifest names (its sha256): else the device would claim another
        architecture than the one it trains."""
        digest = hashlib.sha256()
        try:
            with self.file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise ModelError(f"cannot read {self.file}: {exc.strerror or exc}") from exc
        if digest.hexdigest() != self.manifest.get("sha256"):
            hint = "reinstall the agent" if self.packaged else f"rebuild the folder ({BUILD_HINT})"
            raise ModelError(f"{self.file} does not match its manifest's sha256: {hint}")

    def load(self) -> TrainableModel:
        """A new `TrainableModel` of this model (its digest checked first)."""
        from firmware_models.runtime import TrainableModel

        self.check_digest()
        try:
            return TrainableModel(self.file, manifest=self.manifest)
        except ValueError as exc:  # signatures missing, or another task than the manifest's
            raise ModelError(f"{self.file}: {exc}") from exc


def read_folder(folder: Path, label: str | None = None, packaged: bool = False) -> ModelSource:
    """The model in `folder`, its manifest checked (what the agent reads of it) and its model file present."""
    label = str(folder) if label is None else label
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder" + ("" if packaged else f" holding a built model ({BUILD_HINT})"))
    where = folder / "manifest.json"
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder} has no manifest.json: not a built model folder ({BUILD_HINT})") from None
    except OSError as exc:
        raise ModelError(f"cannot read {where}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ModelError(f"{where} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelError(f"{where} is not a JSON object")
    shape = manifest.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(is_int(d) and d > 0 for d in shape):
        raise ModelError(f"{where}: input_shape {shape!r} is not a list of positive sizes")
    if manifest.get("task", "classification") not in ("classification", "reconstruction"):
        raise ModelError(f"{where}: task {manifest.get('task')!r} is neither classification nor reconstruction")
    if not isinstance(manifest.get("sha256"), str):
        raise ModelError(f"{where} has no sha256 of its model file")
    name = manifest.get("file", "model.tflite")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ModelError(f"{where}: file {name!r} is not a file name in the folder")
    source = ModelSource(label, folder, manifest, packaged)
    if not source.file.is_file():
        raise ModelError(f"{folder} has no {name} (its manifest names it): {BUILD_HINT}")
    return source


def model_source(model: NamesAModel | str | Path) -> ModelSource:
    """The model an agent config names (`[model] name` or `[model] path`), or a model given as a name of the zoo
    or a folder's path."""
    import firmware_models

    if not isinstance(model, (str, Path)):  # an AgentConfig
        model = model.model_path if model.model_path is not None else model.model
    if isinstance(model, str) and model and not any(c in model for c in "/\\") and not model.startswith("."):
        folder = firmware_models.model_dir(model)  # a name: the package's model of that name
        if folder.is_dir():
            return read_folder(folder, model, packaged=True)
        if not Path(model).is_dir():
            raise ModelError(f"model.name: no model {model!r} in firmware_models (it ships "
                             f"{', '.join(firmware_models.MODELS)}); a built model's folder is `[model] path`")
    return read_folder(Path(model))


def load_model(model: NamesAModel | str | Path) -> tuple[dict[str, Any], TrainableModel]:
    """The manifest and a new `TrainableModel` of `model` (see model_source)."""
    source = model_source(model)
    return source.manifest, source.load()
