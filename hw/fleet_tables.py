"""The fleet's size and its data, checked together at load (hw/scenario.py documents the fields): `[fleet]`
gateways, devices (or devices_per_gateway) and subjects, and `[dataset]` source, partition, alpha and
test_fraction, which say how many devices there are, on how many gateways, holding whose data. A ConfigError
names the field; hw/scenario.py raises it as a ScenarioError.

    fleet = parse_fleet(doc, base_dir)   # fleet.devices, fleet.source (a folder: absolute), ...

The watch data has WATCH_SUBJECTS subjects: partition = "subject" gives each device one (so at most that many
devices), "dirichlet" deals the pooled windows to any number; a folder source has a file per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config import ConfigError, resolve_path
from protocol.fields import is_int

PARTITIONS = ("subject", "dirichlet")
WATCH_SUBJECTS = 10
MAX_GATEWAYS = 32


@dataclass(frozen=True)
class FleetShape:
    """How many gateways and devices, and whose data the devices hold."""

    gateways: int
    devices: int
    subjects: tuple[int, ...]  # fleet.subjects: which watch subjects (() when not given: hw/partition.py picks)
    source: str  # "watch", or the absolute path of a folder of per-device .npz files
    partition: str  # PARTITIONS
    alpha: float  # dirichlet only
    test_fraction: float


def parse_fleet(doc: dict[str, Any], base_dir: Path) -> FleetShape:
    """The scenario document's [fleet] size and [dataset] source and partition, checked (`base_dir`: where a
    relative dataset.source is)."""
    get = lambda s, k, d: doc.get(s, {}).get(k, d)  # noqa: E731
    subjects = tuple(get("fleet", "subjects", []))
    if not all(is_int(s) and 1 <= s <= WATCH_SUBJECTS for s in subjects):
        raise ConfigError(f"fleet.subjects must be watch subject ids between 1 and {WATCH_SUBJECTS}")
    if len(set(subjects)) != len(subjects):
        raise ConfigError("fleet.subjects names a subject twice")
    gateways = get("fleet", "gateways", 1)
    if not 1 <= gateways <= MAX_GATEWAYS:
        raise ConfigError(f"fleet.gateways must be between 1 and {MAX_GATEWAYS}, got {gateways}")
    partition = get("dataset", "partition", "subject")
    if partition not in PARTITIONS:
        raise ConfigError(f"dataset.partition must be one of {', '.join(PARTITIONS)}, not {partition!r}")
    per_gateway = get("fleet", "devices_per_gateway", None)
    default_devices = len(subjects) if subjects and partition == "subject" else 5
    if per_gateway is not None:
        if per_gateway < 1:
            raise ConfigError(f"fleet.devices_per_gateway must be positive, got {per_gateway}")
        devices = gateways * per_gateway
        if "devices" in doc.get("fleet", {}) and doc["fleet"]["devices"] != devices:
            raise ConfigError(f"fleet.devices = {doc['fleet']['devices']} contradicts fleet.devices_per_gateway "
                              f"= {per_gateway} x {gateways} gateways; give one of them")
    else:
        devices = get("fleet", "devices", default_devices)
    if devices < gateways:
        raise ConfigError(f"fleet.devices: {devices} devices for {gateways} gateways; every gateway needs one")
    if "alpha" in doc.get("dataset", {}) and partition != "dirichlet":
        raise ConfigError('dataset.alpha only applies to partition = "dirichlet"')
    alpha = float(get("dataset", "alpha", 0.5))
    if not alpha > 0:
        raise ConfigError(f"dataset.alpha must be positive, got {alpha}")
    test_fraction = float(get("dataset", "test_fraction", 0.2))
    if not 0 < test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be between 0 and 1, got {test_fraction}")
    source = get("dataset", "source", "watch")
    if source != "watch":
        try:
            folder = resolve_path(source, base_dir, "dataset.source")
            found = folder.is_dir()
        except (ConfigError, OSError) as exc:  # a NUL, a name too long for the OS
            raise ConfigError(f"dataset.source: {str(exc)[:200]}") from exc
        if not found:
            raise ConfigError(f"dataset.source: {folder} is not a folder of .npz files")
        source = str(folder)
        if subjects:
            raise ConfigError("fleet.subjects only applies to the watch data (dataset.source = \"watch\")")
    elif partition == "subject":
        if subjects and len(subjects) != devices:
            raise ConfigError(f"fleet.subjects names {len(subjects)} subjects for {devices} devices")
        if not 1 <= devices <= WATCH_SUBJECTS:
            raise ConfigError(f"fleet.devices: the watch data has {WATCH_SUBJECTS} subjects, asked for {devices} "
                              'devices (partition = "dirichlet" deals the pooled windows to any number)')
    return FleetShape(gateways, devices, subjects, source, partition, alpha, test_fraction)
