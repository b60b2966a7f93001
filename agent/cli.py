"""`starling-agent`: the device service's command line.

    starling-agent keygen --key PATH     make a device key (mode 0600) and print its id
    starling-agent run --config FILE     run the service (and its sensor sampler) until SIGTERM / Ctrl-C
    starling-agent doctor --config FILE  check config, key, model, sensors, broker, inference; say what is wrong
    starling-agent predict --config FILE [--input WINDOWS.npz|.npy] [--windows N]
                                         one-shot predictions as JSON lines (agent/predict.py): on the
                                         windows in the file, or on the device's newest ones

The model is `[model] name` (shipped in firmware_models) or `[model] path` (a built model's folder); every
command loads it through agent/model_source.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from protocol import logs
from protocol.errors import KeyFileError
from protocol.keys import load_or_create

from .config import ConfigError, load_config
from .data_source import DataError, open_data, training_of, windows_of
from .learner import device_seed
from .model_source import ModelError, load_model, model_source


def _keygen(args: argparse.Namespace) -> int:
    identity = load_or_create(args.key)
    print(json.dumps({"id": identity.id, "public_key": identity.public_key.hex(), "key": str(args.key)}))
    return 0


def _run(args: argparse.Namespace) -> int:
    logs.setup("agent", args.log_level)
    try:
        config = load_config(args.config)
        identity = load_or_create(config.key)
    except (ConfigError, KeyFileError) as exc:
        print(f"starling-agent: {exc}", file=sys.stderr)
        return 2
    if config.voucher is not None and not config.voucher.is_file():
        print(f"starling-agent: device.voucher: {config.voucher} does not exist", file=sys.stderr)
        return 2
    # Heavy imports only once the config is known to be good.
    from .service import Agent

    try:
        source = model_source(config)  # [model] name or path: the manifest says the rest
        model = source.load()
    except ModelError as exc:
        print(f"starling-agent: model: {exc}", file=sys.stderr)
        return 2
    manifest = source.manifest
    logs.event(logging.getLogger("starling.agent"), "agent.model", model=source.label,
               source="package" if source.packaged else "path", input_shape="x".join(map(str, source.input_shape)),
               task=source.task, sha256=manifest["sha256"][:16])
    seed = device_seed(identity.node_id)
    inference_model = personalizer = None
    if config.inference is not None:  # its own model instance: training never touches its weights
        from .personalize import CannotPersonalize, Personalizer

        inference_model = source.load()
        try:
            personalizer = (Personalizer(config.personalization, inference_model, seed)
                            if config.personalization is not None else None)
        except CannotPersonalize as exc:
            print(f"starling-agent: personalization: {exc}", file=sys.stderr)
            return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with open_data(config, manifest) as data:
            inference = None
            if inference_model is not None:
                from .inference import Inference
                from .local_out import MqttOut, SocketOut

                settings = config.inference
                sinks = ([SocketOut(settings.socket)] if settings.socket else []) + (
                    [MqttOut(settings.mqtt, identity.id)] if settings.mqtt else [])
                inference = Inference(settings, inference_model, manifest, config.state_dir, identity.id,
                                      windows_of(data), sinks, personalizer=personalizer,
                                      training=training_of(data))
            Agent(config, identity, model, data, architecture=manifest["sha256"], seed=seed,
                  inference=inference).run(stop)
    except DataError as exc:
        print(f"starling-agent: {exc}", file=sys.stderr)
        return 2
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import report, run_checks

    checks = run_checks(Path(args.config))
    print(report(checks, args.json))
    return 0 if all(c.ok for c in checks) else 1


def _predict(args: argparse.Namespace) -> int:
    logs.setup("agent", args.log_level)  # logs on stderr: stdout is the results'
    if args.windows < 0:
        print("starling-agent: --windows must not be negative", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"starling-agent: {exc}", file=sys.stderr)
        return 2
    from protocol.keys import Identity

    from .config import InferenceSettings
    from .personalize import CannotPersonalize
    from .predict import InputError, predict_once

    settings = config.inference or InferenceSettings(socket=None)
    try:
        manifest, model = load_model(config)
    except ModelError as exc:
        print(f"starling-agent: model: {exc}", file=sys.stderr)
        return 2
    try:
        identity = Identity.load(config.key)  # only to say whose results these are: never created here
        device, seed = identity.id, device_seed(identity.node_id)  # the service's personalization seed
    except (KeyFileError, OSError):
        device, seed = "", 0
    try:
        results = predict_once(config, settings, model, manifest, device, args.input,
                               args.windows or settings.windows, seed)
    except InputError as exc:
        print(f"starling-agent: {exc}", file=sys.stderr)
        return 2
    except CannotPersonalize as exc:
        print(f"starling-agent: personalization: {exc}", file=sys.stderr)
        return 2
    for result in results:
        print(json.dumps(result, separators=(",", ":")))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="starling-agent", description="Starling device agent: train locally, send signed updates.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("keygen", help="create a device key file (if missing) and print its id")
    p.add_argument("--key", required=True, help="path of the key file (written with mode 0600)")
    p.set_defaults(func=_keygen)
    p = sub.add_parser("run", help="run the agent service")
    p.add_argument("--config", required=True, help="agent TOML config file")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_run)
    p = sub.add_parser("doctor", help="check an installed agent and say plainly what is wrong")
    p.add_argument("--config", required=True, help="agent TOML config file")
    p.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("predict", help="run the device's model once and print the results as JSON lines")
    p.add_argument("--config", required=True, help="agent TOML config file")
    p.add_argument("--input", type=Path, help="windows to predict on (.npy, or .npz with x / X / windows / "
                   "x_test); default: the device's newest windows")
    p.add_argument("--windows", type=int, default=0, help="how many of the newest windows (default: "
                   "[inference] windows, else 32)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=_predict)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
