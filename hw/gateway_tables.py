"""The scenario's settings that only the gateways read, checked at load with the gateway's own code, so that a bad
value fails when the scenario loads, naming the field, and not when a gateway starts mid-run. A ConfigError names
the field; hw/scenario.py raises it as a ScenarioError.

    check_gateway_tables(doc, strategy, params, dp)                  # [aggregation] and [defense]
    check_strategy_overrides(faults, strategy, params, dp, defense)  # a gateway_stop's strategy_params

`[aggregation]` and `[defense]` (GATEWAY_TABLES) go verbatim into every gateway's config: their keys are
WeightRule's (gateway/weights.py) and UpdateBound's (gateway/defense.py), their values checked by
`gateway.config.parse_config`. A gateway_stop fault's `overrides.strategy_params` must make a strategy the
restarted gateway accepts (gateway/strategies.py). Flower is imported only when a scenario has one of these.
"""

from __future__ import annotations

from typing import Any

from protocol.config import ConfigError
from protocol.fields import is_number

from .faults import Fault
from .tables import NUMBER

GATEWAY_TABLES = ("aggregation", "defense")  # go verbatim into every gateway's config


def check_strategy_overrides(faults: tuple[Fault, ...], strategy: str, params: dict[str, Any],
                             dp: dict[str, Any], defense: dict[str, Any]) -> None:
    """A gateway_stop's strategy_params must make a strategy the restarted gateway accepts: check them now
    (with the gateway's own check), not when the gateway fails to start mid-run."""
    for i, fault in enumerate(faults):
        overrides = fault.overrides.get("strategy_params")
        if not overrides:
            continue
        from gateway.strategies import make_strategy  # noqa: PLC0415 (Flower: only when there is something to check)

        try:
            make_strategy(strategy, {**params, **overrides}, dp or None, defense=defense or None)
        except ConfigError as exc:
            raise ConfigError(f"fault[{i}].overrides.strategy_params: {exc}") from exc


def gateway_keys() -> dict[str, dict[str, Any]]:
    """The keys the gateway reads from [aggregation] and [defense]: WeightRule's fields (its `rule` is
    `weights`; their types the gateway's parser checks) and UpdateBound's parameters (typed here after their
    defaults: the gateway passes [defense] to UpdateBound as it is, and `centered_clipping = "no"` is truthy)."""
    import dataclasses
    import inspect

    from gateway.defense import UpdateBound  # (Flower: imported only when a scenario has these tables)
    from gateway.weights import WeightRule

    bound = {name: bool if isinstance(p.default, bool) else NUMBER if isinstance(p.default, NUMBER) else object
             for name, p in inspect.signature(UpdateBound.__init__).parameters.items()
             if name not in ("self", "strategy")}
    return {"aggregation": {"weights": object, **{f.name: object for f in dataclasses.fields(WeightRule)
                                                  if f.name != "rule"}},
            "defense": bound}


def check_gateway_tables(doc: dict[str, Any], strategy: str, params: dict[str, Any], dp: dict[str, Any]) -> None:
    """[aggregation] and [defense] go verbatim into every gateway's config: check them now with the gateway's
    own parser (`gateway.config.parse_config` on a probe config with the scenario's `strategy`, its `params` and
    `dp`), so a bad value fails here, naming the field, and not when the gateways start. Unknown keys are refused
    too (the gateway would ignore a misspelt [aggregation] key)."""
    known = gateway_keys()
    for section in GATEWAY_TABLES:
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        unknown = sorted(set(table) - set(known[section]))
        if unknown:
            raise ConfigError(f"unknown key {section}.{unknown[0]}; known: {', '.join(sorted(known[section]))}")
        for key, value in table.items():
            kind = known[section][key]
            if kind is bool and not isinstance(value, bool) or kind is NUMBER and not is_number(value):
                raise ConfigError(f"{section}.{key} must be {'true or false' if kind is bool else 'a number'}, "
                                  f"got {type(value).__name__}")
    from gateway.config import parse_config

    probe = {
        "gateway": {"name": "probe", "key": "probe.key", "state_dir": "probe"},
        "enrollment": {"policy": "open"},
        "strategy": {"name": strategy, "params": params, **({"dp": dp} if dp else {})},
        **{section: doc[section] for section in GATEWAY_TABLES if section in doc},
    }
    parse_config(probe)
