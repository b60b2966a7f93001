"""The city tier's scenario settings, checked: `[city]` and `[dataset] classes_by_neighbourhood` (hw/scenario.py
documents both). A ConfigError names the field; hw/scenario.py raises it as a ScenarioError.
"""

from __future__ import annotations

from typing import Any

from protocol.config import ConfigError
from protocol.fields import is_int

from .datasets import CLASS_NAMES, CLASSES

CITY_RULES = ("weighted", "median")  # the city merge: weighted mean of the offers, or coordinate-wise median
CITY_DEFAULTS = {"rule": "weighted", "deadline_s": 60.0, "audit_share": 1.0, "momentum": 0.0}  # `every` has none


def parse_city(table: dict[str, Any], gateways: int, rounds: int) -> dict[str, Any]:
    """[city], checked, with every key set (CITY_DEFAULTS for those not given): what the gateways get."""
    if gateways < 2:
        raise ConfigError(f"[city]: the city tier merges several gateways' models, but fleet.gateways = {gateways} "
                          "(leave [city] out, or drop it in a variant with city = {})")
    if "every" not in table:
        raise ConfigError("city.every is required: the rounds per city epoch")
    city = {"every": table["every"], **CITY_DEFAULTS, **table}
    if not 1 <= city["every"] <= rounds:
        raise ConfigError(f"city.every must be between 1 and run.rounds = {rounds} (a city epoch every that many "
                          f"rounds), got {city['every']}")
    if city["rule"] not in CITY_RULES:
        raise ConfigError(f"city.rule must be one of {', '.join(CITY_RULES)}, not {city['rule']!r}")
    city["deadline_s"] = float(city["deadline_s"])
    if not city["deadline_s"] > 0:
        raise ConfigError(f"city.deadline_s must be positive, got {city['deadline_s']}")
    city["audit_share"] = float(city["audit_share"])
    if not 0 <= city["audit_share"] <= 1:
        raise ConfigError(f"city.audit_share must be between 0 and 1, got {city['audit_share']}")
    city["momentum"] = float(city["momentum"])
    if not 0 <= city["momentum"] < 1:
        raise ConfigError(f"city.momentum must be at least 0 and below 1, got {city['momentum']}")
    return city


def parse_neighbourhoods(dataset: dict[str, Any], source: str, devices: int,
                         gateways: int) -> tuple[tuple[int, ...], ...]:
    """dataset.classes_by_neighbourhood, checked: N >= 2 lists of distinct class labels (the watch data's are 0 to
    CLASSES - 1), a device in each neighbourhood, and either one gateway or one gateway per neighbourhood."""
    field_name = "dataset.classes_by_neighbourhood"
    items = dataset.get("classes_by_neighbourhood")
    if items is None:
        return ()
    if len(items) < 2:
        raise ConfigError(f"{field_name} must list at least 2 neighbourhoods (a list of classes each), got "
                          f"{len(items)}")
    out = []
    for n, classes in enumerate(items):
        at = f"{field_name}[{n}]"
        if not isinstance(classes, list) or not classes:
            raise ConfigError(f"{at} must be a non-empty list of class labels (integers)")
        for label in classes:
            if not is_int(label) or label < 0:
                raise ConfigError(f"{at}: {label!r} is not a class label (an integer >= 0)")
            if source == "watch" and label >= CLASSES:
                raise ConfigError(f"{at}: the watch data's classes are 0 to {CLASSES - 1} "
                                    f"({', '.join(CLASS_NAMES)}), not {label}")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"{at} names a class twice")
        out.append(tuple(classes))
    if devices < len(out):
        raise ConfigError(f"{field_name}: {len(out)} neighbourhoods but only {devices} devices (device i lives in "
                          f"neighbourhood i mod {len(out)}: every neighbourhood needs one)")
    if gateways not in (1, len(out)):
        raise ConfigError(f"{field_name}: {len(out)} neighbourhoods for {gateways} gateways; give one gateway per "
                          "neighbourhood (device i: gateway and neighbourhood i mod N), or one gateway for all")
    return tuple(out)
