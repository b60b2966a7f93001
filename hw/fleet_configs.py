"""The config files of a run's gateways and devices, written from the scenario through hw/toml_files.py's one
TOML writer: each gateway's gateway.toml and the command line that runs it, each device's agent.toml, and the
model manifest the gateways start from.

    manifest = model_manifest(scenario, workdir)                        # synthetic: written for the run
    conf = gateway_config(scenario, g, broker, genesis, manifest, ...)  # through g.write_config (a fault may
    cmd = gateway_command(scenario, g, conf)                            # rewrite it: hw/fleet.py's GatewayRun)
    conf = write_agent_config(home, name, g, broker, data, agent_model_table(scenario), profile, voucher=True)

A gateway gets the scenario's strategy, rounds, codecs and enrollment, its [aggregation], [defense], [city] and
[rounds] tables, and a blob store that keeps every model the report will score; a device gets its key, its
gateway, its broker (or its link's relay), its replay file, its model and its profile's [budget].
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from protocol.schemas import CODEC, DENSITY, DOWNLOAD

from .fleet import GatewayRun
from .model_tables import RECONSTRUCTION
from .profiles import DeviceProfile
from .scenario import Scenario
from .toml_files import write_toml

SYNTHETIC_SHAPES = {"dense": (128, 8), "bias": (8,)}  # hw/synthetic.py's model: ~1,000 parameters
CITY_KEEP_TAGS = 4  # gateway/blobs.py's default; a city run keeps more (a tag per epoch or model version)


def model_manifest(scenario: Scenario, workdir: Path) -> Path | None:
    """The manifest the gateways start from: a model of the zoo's, a built model folder's, or for the synthetic
    model one written for the run (in `workdir`/model)."""
    if scenario.model == "synthetic":
        from .synthetic import write_manifest

        return write_manifest(workdir / "model", SYNTHETIC_SHAPES, seed=scenario.seed)
    # a model of the zoo, or a built model's folder: the gateways start from its manifest and weights
    return scenario.model_spec.manifest_path


def gateway_command(scenario: Scenario, g: GatewayRun, conf: Path) -> list[str]:
    """The gateway's command line: the real gateway, or for a gateway attack's target the tampering launcher."""
    attack = scenario.gateway_attacks().get(g.name)
    if attack is None:
        return [sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)]
    from .tampered_gateway import command

    return command(conf, attack.scale, seed=scenario.seed * 1009 + g.index)


def gateway_config(scenario: Scenario, g: GatewayRun, broker: tuple[str, int], genesis: Path | None,
                   manifest: Path | None = None, enrollment: dict[str, Any] | None = None,
                   wait_real_device: bool = False, unenrollable: int = 0) -> Path:
    """Write gateway `g`'s config (reaching `broker`; a city's `genesis`; `unenrollable` of its devices are sybils
    a voucher policy keeps out) and return its path."""
    doc: dict[str, dict[str, Any]] = {
        "gateway": {"name": g.name, "key": str(g.key), "state_dir": str(g.home)},
        "broker": {"host": broker[0], "port": broker[1]},
        "strategy": {"name": scenario.strategy, "params": scenario.strategy_params,
                     **({"dp": scenario.strategy_dp} if scenario.strategy_dp else {})},
        "rounds": {"num_rounds": scenario.rounds, "deadline_s": scenario.deadline_s, "epochs": scenario.epochs,
                   "batch_size": scenario.batch_size, "lr": scenario.lr,
                   # A named real device (--hil-device) is waited for, as long as the run may last.
                   # (not for sybils a voucher policy keeps out)
                   "min_devices": len(g.devices) - unenrollable + (1 if wait_real_device else 0),
                   "wait_devices_s": scenario.timeout_s if wait_real_device else 120.0,
                   **scenario.gateway_rounds},  # the scenario's [rounds]: mode, buffer, ... (gateway/buffered.py)
        # The upload codec ([training] codec, and density for topk only) and the model downloads: gateway/config.py's.
        "training": {CODEC: scenario.codec, **({DENSITY: scenario.density} if scenario.density is not None else {}),
                     DOWNLOAD: scenario.download},
        # The emulator's devices are its own; with real devices joining, vouchers gate enrollment.
        "enrollment": enrollment or {"policy": "open"},
        # The scenario's [aggregation] and [defense], verbatim (checked at load by the gateway's own parser).
        **{section: dict(table) for section, table in (("aggregation", scenario.aggregation),
                                                       ("defense", scenario.defense)) if table},
    }
    if scenario.city:  # the tier, every key set; and every city model of the run kept for the report
        doc["city"] = dict(scenario.city)
        doc["blobs"] = {"keep": max(CITY_KEEP_TAGS, scenario.rounds + 2)}
    if scenario.gateway_rounds:  # every release stays in the blob store: bench/async_rounds.py scores each one
        doc["blobs"] = {"keep": max(CITY_KEEP_TAGS, scenario.rounds + 2)}
    if manifest is not None:  # the model's shapes and initial weights (synthetic: written for the run)
        doc["model"] = {"manifest": str(manifest)}
    if scenario.model != "synthetic" and scenario.model_spec.task == RECONSTRUCTION:
        # every round's model stays in the blob store: the report scores each on the test windows (model_report.py)
        doc["blobs"] = {"keep": max(CITY_KEEP_TAGS, scenario.rounds + 2)}
    if genesis is not None:
        # Every gateway starts from the same genesis at the same time: nobody has a checkpoint to wait for.
        doc["ledger"] = {"genesis": str(genesis), "gossip": True, "bootstrap_s": 0.0}
    return g.write_config(doc)


def agent_model_table(scenario: Scenario) -> dict[str, Any]:
    """The [model] table of every device's agent.toml: a model of the zoo by [model] name, a built model's folder
    by [model] path (the agent, its attackers and pools all load it through agent/model_source.py); none for the
    synthetic model (the device pools make it)."""
    spec = scenario.model_spec
    folder = None if scenario.model == "synthetic" or spec.packaged else str(spec.folder)
    return {} if scenario.model == "synthetic" else {"model": {"path": folder} if folder else {"name": spec.family}}


def write_agent_config(home: Path, name: str, g: GatewayRun, broker: tuple[str, int], data: Path,
                       model_table: dict[str, Any], profile: DeviceProfile | None, voucher: bool) -> Path:
    """Write device `name`'s agent.toml in its `home` (its key there, and its operator voucher if `voucher`): its
    gateway `g`, `broker` (its link's relay, if it has one), replay file `data`, model and profile's [budget]."""
    conf = home / "agent.toml"
    write_toml(conf, {
        "device": {"name": name, "key": str(home / "device.key"), "state_dir": str(home / "state"),
                   **({"voucher": str(home / "voucher.cbor")} if voucher else {})},
        "gateway": {"id": g.identity.id, "public_key": g.identity.public_key.hex()},
        "broker": {"host": broker[0], "port": broker[1]},
        "data": {"replay": str(data)},
        **model_table,
        **({"budget": profile.budget_toml()} if profile and profile.budget_toml() else {}),
    })
    return conf
