"""`starling-models`: build the on-device models and show what is built.

    starling-models build [--out DIR] [--seed N]   # needs TensorFlow: pip install .[build]
    starling-models info [NAME]                    # manifest summary as JSON

Only `build` needs TensorFlow, and it is imported when `build` runs, so
`--help` and `info` work on a device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from firmware_models import DEFAULT_MODEL, file_sha256, load_manifest, model_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starling-models",
        description="Build Starling's trainable TFLite models and inspect their manifests.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = sub.add_parser(
        "build",
        help="build imu_cnn (model.tflite, weights.npz, manifest.json); needs TensorFlow",
        description="Build the imu_cnn model. Needs TensorFlow (`pip install .[build]`) "
        "and the seglearn wheel (for the input normalization).",
    )
    build.add_argument("--out", type=Path, default=None,
                       help=f"output folder (default: {model_dir(DEFAULT_MODEL)})")
    build.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    info = sub.add_parser("info", help="print a built model's manifest summary as JSON")
    info.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    return parser


def _summary(name: str) -> dict:
    manifest = load_manifest(name)
    folder = model_dir(name)
    model_file = folder / manifest.get("file", "model.tflite")
    weights_file = folder / manifest.get("weights_file", "weights.npz")
    return {
        "name": manifest["name"],
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `starling-models` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "build":
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            print("starling-models build needs TensorFlow, which is not installed: "
                  "run `pip install .[build]` (devices only need the built files)", file=sys.stderr)
            return 2
        from firmware_models.build import build

        out = args.out if args.out is not None else model_dir(DEFAULT_MODEL)
        manifest = build(out, seed=args.seed)
        print(json.dumps({"out": str(out), "sha256": manifest["sha256"],
                          "weights_sha256": manifest["weights_sha256"],
                          "parameter_count": manifest["parameter_count"],
                          "model_bytes": manifest["model_bytes"]}, indent=2))
        return 0
    try:
        print(json.dumps(_summary(args.name), indent=2))
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
