"""`starling-gateway`: the gateway service's command line.

    starling-gateway init --config FILE    make the gateway key; print its id and public key
    starling-gateway run --config FILE     run the configured rounds, then exit (SIGTERM stops early)
    starling-gateway check --config FILE   validate the config (strategy and all) and exit
    starling-gateway reset-model --config FILE --reason TEXT
                                           start a new model lineage from the initial weights (the
                                           gateway must be stopped); logged and recorded on the ledger
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from protocol import logs
from protocol.errors import KeyFileError, ProtocolError
from protocol.keys import Identity, load_or_create
from protocol.rotation import own_chain

from .config import ConfigError, load_config

MAX_REASON = 200  # the ledger keeps "reset-model: <reason>" in at most 256 characters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="starling-gateway", description="Starling gateway: Flower strategies over MQTT.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("init", "create the gateway key and print its id"), ("run", "run the rounds"),
                       ("check", "validate the config and exit"),
                       ("reset-model", "start a new model lineage from the initial weights (gateway stopped)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="gateway TOML config file")
        p.add_argument("--log-level", default="INFO")
        if name == "reset-model":
            p.add_argument("--reason", required=True, help="why (kept in the journal and on the ledger)")
    args = parser.parse_args(argv)
    logs.setup("gateway", args.log_level)
    try:
        config = load_config(args.config)
        # Only `init` makes a key: a mistyped path must not give the gateway a new identity.
        identity = load_or_create(config.key) if args.command == "init" else Identity.load(config.key)
        gateway_id = own_chain(config.rotations, identity.public_key).gateway_id(identity.public_key)
    except (ConfigError, KeyFileError, ProtocolError) as exc:  # ProtocolError: a bad rotation chain file
        hint = " (make it with: starling-gateway init --config FILE)" if isinstance(exc, KeyFileError) else ""
        print(f"starling-gateway: {exc}{hint}", file=sys.stderr)
        return 2
    if args.command in ("init", "check"):  # the id devices address (its first key's, after rotations)
        print(json.dumps({"id": gateway_id, "public_key": identity.public_key.hex(), "config": "ok"}))
        return 0
    from .service import Gateway, StateFolderBusy, reset_model

    if args.command == "reset-model":
        reason = " ".join(args.reason.split())
        if not 1 <= len(reason) <= MAX_REASON:
            print(f"starling-gateway: --reason must have 1 to {MAX_REASON} characters", file=sys.stderr)
            return 2
        try:
            print(json.dumps(reset_model(config, identity, reason)))
        except StateFolderBusy as exc:
            print(f"starling-gateway: {exc}: stop the gateway first", file=sys.stderr)
            return 2
        return 0

    # Flower logs through its own coloured console handler; route it through ours instead.
    flwr_log = logging.getLogger("flwr")
    flwr_log.handlers.clear()
    flwr_log.propagate = True

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        result = Gateway(config, identity).run(stop)
    except StateFolderBusy as exc:
        print(f"starling-gateway: {exc}", file=sys.stderr)
        return 2
    return 0 if result["state"] in ("done", "stopped") else 1


if __name__ == "__main__":
    raise SystemExit(main())
