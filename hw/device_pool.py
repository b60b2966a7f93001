"""Many emulated devices in one process: real agent code, each with its own key, state and MQTT connection.

    python -m hw.device_pool --pool pool.json     # runs until SIGTERM / Ctrl-C

A process per device costs ~60 MB; 500 of them do not fit a laptop. A pool
runs each device as an `agent.service.Agent` on its own threads inside one
process — the same code, protocol, broker connection and on-disk state as
`starling-agent run` — so an emulator can put hundreds of devices on 2
cores by starting a few pools.

pool.json lists the devices:

    {"model": "synthetic", "manifest": "gw/model/manifest.json",     # or "model": "imu_cnn" (TFLite), or a
     "devices": [{"config": "devices/d001/agent.toml", "seed": 1}, ...]}  # built model's folder

`synthetic` is the cheap training profile (`hw/synthetic.py`: a quadratic
toward a per-device target, shapes from the gateway's manifest; the data
file is not read). A TFLite model name loads one interpreter per device and
trains on the device's configured data, as the real agent does.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from protocol import logs
from protocol.keys import load_or_create


def load_pool(path: Path) -> dict[str, Any]:
    """The pool file, checked: a model and at least one device with a config."""
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list) or not doc["devices"]:
        raise ValueError(f"{path}: needs a non-empty `devices` list")
    if not isinstance(doc.get("model"), str):
        raise ValueError(f"{path}: needs `model` (\"synthetic\" or a model name)")
    if doc["model"] == "synthetic" and not isinstance(doc.get("manifest"), str):
        raise ValueError(f"{path}: the synthetic model needs the gateway's `manifest` (its weight shapes)")
    for i, device in enumerate(doc["devices"]):
        if not isinstance(device, dict) or not isinstance(device.get("config"), str):
            raise ValueError(f"{path}: devices[{i}] needs a `config` path")
    return doc


def build_agents(doc: dict[str, Any], base: Path) -> list:
    """One `Agent` per device of the pool file (nothing connects until `run`)."""
    from agent.config import load_config
    from agent.service import Agent

    agents = []
    if doc["model"] == "synthetic":
        from hw.synthetic import SyntheticModel, synthetic_data

        manifest = json.loads((base / doc["manifest"]).read_text())
        shapes = {w["name"]: tuple(w["shape"]) for w in manifest["weights"]}
        for device in doc["devices"]:
            config = load_config(base / device["config"])
            seed = int(device.get("seed", 0))
            agents.append(Agent(config, load_or_create(config.key), SyntheticModel(shapes, seed=seed),
                                synthetic_data(int(device.get("examples", 64))), seed=seed))
        return agents
    from agent.data_source import open_data
    from agent.model_source import load_model

    for device in doc["devices"]:
        config = load_config(base / device["config"])
        manifest, model = load_model(config)  # its [model] name or path, as `starling-agent run` loads it
        with open_data(config, manifest) as data:  # replay data: loaded now, nothing to keep running
            if not hasattr(data, "x_train"):
                raise ValueError(f"{device['config']}: a pool runs replay data only (no live sensors)")
        identity = load_or_create(config.key)
        agents.append(Agent(config, identity, model, data, architecture=manifest["sha256"],
                            seed=int(device.get("seed", identity.node_id % 2**32))))
    return agents


def run_pool(agents: list, stop: threading.Event) -> None:
    """Run every agent on its own thread until `stop`; each stops cleanly (goodbye on its online topic)."""
    threads = [threading.Thread(target=agent.run, args=(stop,), name=f"device-{i}", daemon=True)
               for i, agent in enumerate(agents)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw.device_pool", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, type=Path, help="the pool file (JSON, see the module doc)")
    parser.add_argument("--log-level", default="WARNING", help="per-device INFO lines are many: WARNING default")
    args = parser.parse_args(argv)
    logs.setup("pool", args.log_level)
    try:
        agents = build_agents(load_pool(args.pool), args.pool.parent)
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"device_pool: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logs.event(logging.getLogger("starling.pool"), "pool.start", logging.WARNING, devices=len(agents))
    run_pool(agents, stop)
    logs.event(logging.getLogger("starling.pool"), "pool.stop", logging.WARNING, devices=len(agents))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
