"""An emulated device whose model is a built model's folder: `starling-agent run`, its model read from there.

    python -m hw.own_model --model DIR --config agent.toml

A scenario's `[training] model` may be the folder `starling-models build --out DIR` wrote (another number of
classes, another input shape, its own normalization: the manifest says). The agent names its model by
`[model] name`, a model shipped in the firmware_models package; so the emulator starts the honest devices of such
a scenario here: the start-up of `agent.cli._run` with the model and its manifest read from DIR, every other part
the agent's own (config, key, data, service). Attackers (`python -m hw.adversary --model-dir DIR`), device pools
and the report's evaluations load their model through `load_model` too:

    manifest, model = load_model("imu_autoencoder")       # a model of the zoo by name, or a folder's path
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def model_folder(model: str) -> Path:
    """Where model `model` is: a model shipped in firmware_models by name, else the folder it names."""
    import firmware_models

    return firmware_models.model_dir(model) if model in firmware_models.MODELS else Path(model)


def load_model(model: str) -> tuple[dict[str, Any], Any]:
    """The manifest and a `TrainableModel` (one interpreter: one per device) of model `model` (see model_folder)."""
    from firmware_models.runtime import TrainableModel

    folder = model_folder(model)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return manifest, TrainableModel(folder / manifest.get("file", "model.tflite"), manifest=manifest)


def main(argv: list[str] | None = None) -> int:
    """Like `starling-agent run`, with the model from `--model`."""
    parser = argparse.ArgumentParser(prog="python -m hw.own_model", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a built model's folder (or a model name of the zoo)")
    parser.add_argument("--config", required=True, help="the agent's TOML config, as for `starling-agent run`")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    from agent.config import ConfigError, load_config
    from agent.data_source import DataError, open_data
    from agent.service import Agent
    from protocol import logs
    from protocol.errors import KeyFileError
    from protocol.keys import load_or_create

    prog = "hw.own_model"
    logs.setup("agent", args.log_level)
    try:
        config = load_config(args.config)
        identity = load_or_create(config.key)
    except (ConfigError, KeyFileError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if config.voucher is not None and not config.voucher.is_file():
        print(f"{prog}: device.voucher: {config.voucher} does not exist", file=sys.stderr)
        return 2
    try:
        manifest, model = load_model(args.model)
    except (OSError, ValueError) as exc:  # no folder, no manifest, a file the interpreter refuses
        print(f"{prog}: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with open_data(config, manifest) as data:
            Agent(config, identity, model, data, architecture=manifest["sha256"],
                  seed=identity.node_id % 2**32).run(stop)
    except DataError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
