"""Starling's on-device models: built `.tflite` files, their manifests and weights.

The model zoo has one folder per built model in this package, named after
its family (`firmware_models.families`): ``imu_cnn/`` (activity classifier
for 128 x 6 IMU windows), ``tabular_mlp/`` (classifier for tabular sensor
features) and ``imu_autoencoder/`` (self-supervised anomaly scores for
unlabelled IMU streams). Each holds ``model.tflite``, ``weights.npz`` and
``manifest.json``. The files are built by `firmware_models.build`
(TensorFlow, build time only), trained on devices by
`firmware_models.runtime` (a TFLite interpreter, no TensorFlow) and exported
for microcontrollers by `firmware_models.mcu` (TensorFlow).

This module imports only the standard library, because devices with 512 MB
of RAM import it to find and check their model files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
"""The package folder; each model is a subfolder named after the model."""

DEFAULT_MODEL = "imu_cnn"
MODELS = ("imu_cnn", "tabular_mlp", "imu_autoencoder")
"""The models built into this package (one per family, default options)."""


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Folder of the model called `name` (it need not be built yet)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"bad model name {name!r}")
    return MODELS_DIR / name


def load_manifest(name: str = DEFAULT_MODEL) -> dict:
    """The parsed `manifest.json` of model `name`.

    Raises FileNotFoundError with the build command if the model has not been
    built.
    """
    path = model_dir(name) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build it with `starling-models build`")
    with path.open("r", encoding="utf-8") as handle:
        return json.load(handle)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_files(name: str = DEFAULT_MODEL) -> dict:
    """Check `model.tflite` and `weights.npz` against the manifest's digests.

    Returns the manifest; raises ValueError on a mismatch, so a device never
    trains a model file that is not the one its manifest describes.
    """
    manifest = load_manifest(name)
    folder = model_dir(name)
    for key, filename in (("sha256", manifest.get("file", "model.tflite")),
                          ("weights_sha256", manifest.get("weights_file", "weights.npz"))):
        actual = file_sha256(folder / filename)
        if actual != manifest[key]:
            raise ValueError(f"{folder / filename}: sha256 {actual} != manifest {key} {manifest[key]}")
    return manifest


__all__ = ["DEFAULT_MODEL", "MODELS", "MODELS_DIR", "file_sha256", "load_manifest", "model_dir", "verify_model_files"]
