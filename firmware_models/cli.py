"""`starling-models`: build the model zoo, inspect models, export them for microcontrollers.

    starling-models build [--family F] [--classes N] [--features N] [--hidden 32,32] [--code N]
                          [--normalization DATA.npz] [--seed N] [--out DIR]     # needs TensorFlow
    starling-models info [NAME]                     # a built model's manifest summary as JSON
    starling-models inspect FILE                    # signatures, ops, parameters, size of any .tflite
    starling-models export-mcu --model NAME --weights W.npz --out DIR [--calibration X.npz]
                                                    # int8 .tflite + C header for TFLite Micro; needs TensorFlow

`build` and `export-mcu` need TensorFlow (`pip install .[build]`) and import
it only when they run, so `--help`, `info` and `inspect` work on a device.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from firmware_models import DEFAULT_MODEL, file_sha256, load_manifest, model_dir

FAMILY_NAMES = ("imu_cnn", "tabular_mlp", "imu_autoencoder")  # firmware_models.families, without numpy
NEEDS_TF = ("{command} needs TensorFlow, which is not installed: run `pip install .[build]` "
            "(devices only need the built files)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starling-models",
        description="Build Starling's trainable TFLite models, inspect them, export them for microcontrollers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = sub.add_parser(
        "build",
        help="build a model family (model.tflite, weights.npz, manifest.json); needs TensorFlow",
        description="Build a model family. Needs TensorFlow (`pip install .[build]`) and the seglearn "
        "wheel (the watch data gives the default normalization). Options a family does not take are refused.",
    )
    build.add_argument("--family", choices=FAMILY_NAMES, default=DEFAULT_MODEL,
                       help=f"model family (default {DEFAULT_MODEL})")
    build.add_argument("--classes", type=int, help="number of classes (imu_cnn, tabular_mlp; default 7)")
    build.add_argument("--features", type=int, help="input features (tabular_mlp; default 24)")
    build.add_argument("--hidden", help="hidden layer widths, comma-separated (tabular_mlp; default 32,32)")
    build.add_argument("--code", type=int, help="bottleneck size (imu_autoencoder; default 16)")
    build.add_argument("--normalization", type=Path,
                       help="data file (.npz with x, X or x_train) whose per-channel mean/std normalize the input")
    build.add_argument("--out", type=Path, default=None, help="output folder (default: the package folder of the family)")
    build.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")

    info = sub.add_parser("info", help="print a built model's manifest summary as JSON")
    info.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")

    inspect = sub.add_parser("inspect", help="print a .tflite file's signatures, ops, parameter count and size")
    inspect.add_argument("file", type=Path, help="a .tflite file")

    export = sub.add_parser(
        "export-mcu",
        help="export trained weights as an int8 .tflite and C header for TFLite Micro; needs TensorFlow",
        description="Write NAME_int8.tflite, NAME_int8.h, NAME_float.tflite and NAME_mcu.json into --out.",
    )
    export.add_argument("--model", required=True, help="a built model's name (e.g. imu_cnn) or folder")
    export.add_argument("--weights", required=True, type=Path, help="trained weights (.npz, one array per weight)")
    export.add_argument("--out", required=True, type=Path, help="output folder")
    export.add_argument("--calibration", type=Path,
                        help="representative examples (.npz with x, X or x_train; default: the family's reference data)")
    export.add_argument("--name", help="file and C symbol prefix (default: the model's name)")
    return parser


def _summary(name: str) -> dict:
    manifest = load_manifest(name)
    folder = model_dir(name)
    model_file = folder / manifest.get("file", "model.tflite")
    weights_file = folder / manifest.get("weights_file", "weights.npz")
    return {
        "name": manifest["name"],
        "family": manifest.get("family", manifest["name"]),
        "task": manifest.get("task", "classification"),
        "version": manifest["version"],
        "path": str(model_file),
        "model_bytes": model_file.stat().st_size if model_file.is_file() else None,
        "sha256": manifest["sha256"],
        "sha256_ok": model_file.is_file() and file_sha256(model_file) == manifest["sha256"],
        "weights_sha256_ok": weights_file.is_file() and file_sha256(weights_file) == manifest["weights_sha256"],
        "parameter_count": manifest["parameter_count"],
        "input_shape": manifest["input_shape"],
        "batch_size": manifest["batch_size"],
        "classes": manifest["classes"],
        "signatures": sorted(manifest["signatures"]),
        "weights": [f"{w['name']}{w['shape']}" for w in manifest["weights"]],
        "build": manifest["build"],
    }


def _has_tensorflow(command: str) -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        print(NEEDS_TF.format(command=f"starling-models {command}"), file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `starling-models` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "build":
        if not _has_tensorflow("build"):
            return 2
        from firmware_models.build import build

        options = {"classes": args.classes, "features": args.features, "hidden": args.hidden, "code": args.code}
        try:
            manifest = build(args.out, seed=args.seed, family=args.family, options=options,
                             normalization=args.normalization)
        except ValueError as exc:
            print(f"starling-models build: {exc}", file=sys.stderr)
            return 2
        out = args.out if args.out is not None else model_dir(args.family)
        print(json.dumps({"out": str(out), "family": manifest["family"], "sha256": manifest["sha256"],
                          "weights_sha256": manifest["weights_sha256"],
                          "parameter_count": manifest["parameter_count"],
                          "model_bytes": manifest["model_bytes"]}, indent=2))
        return 0
    if args.command == "export-mcu":
        if not _has_tensorflow("export-mcu"):
            return 2
        from firmware_models.mcu import export_mcu

        try:
            result = export_mcu(args.model, args.weights, args.out, calibration=args.calibration, name=args.name)
        except (ValueError, FileNotFoundError) as exc:
            print(f"starling-models export-mcu: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in result.items() if k != "quantization"}, indent=2))
        return 0
    if args.command == "inspect":
        from firmware_models.inspect_model import inspect_file

        try:
            print(json.dumps(inspect_file(args.file), indent=2))
        except (OSError, ValueError, struct.error, IndexError) as exc:
            print(f"starling-models inspect: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        print(json.dumps(_summary(args.name), indent=2))
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
