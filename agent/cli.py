"""`starling-agent`: the device service's command line.

    starling-agent keygen --key PATH     make a device key (mode 0600) and print its id
    starling-agent run --config FILE     run the service (and its sensor sampler) until SIGTERM / Ctrl-C
    starling-agent doctor --config FILE  check config, key, model, sensors, broker; say what is wrong
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from protocol import logs
from protocol.errors import KeyFileError
from protocol.keys import load_or_create

from .config import ConfigError, load_config
from .data_source import DataError, open_data


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
    import firmware_models
    from firmware_models.runtime import TrainableModel

    from .service import Agent

    manifest = firmware_models.load_manifest(config.model)
    model = TrainableModel(firmware_models.model_dir(config.model) / "model.tflite")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with open_data(config, manifest) as data:
            Agent(config, identity, model, data, architecture=manifest["sha256"],
                  seed=identity.node_id % 2**32).run(stop)
    except DataError as exc:
        print(f"starling-agent: {exc}", file=sys.stderr)
        return 2
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .doctor import report, run_checks

    checks = run_checks(Path(args.config))
    print(report(checks, args.json))
    return 0 if all(c.ok for c in checks) else 1


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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
