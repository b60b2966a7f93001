"""Building the configured Flower strategy, at start-up, with errors that name the field.

    [strategy]
    name = "FedProx"                     # a class in flwr.serverapp.strategy ...
    # name = "my_city.strategies:Fair"   # ... or a Strategy subclass by import path
    params = { proximal_mu = 0.1, min_available_nodes = 5 }

    [strategy.dp]                        # optional: one of Flower's DP wrappers around it
    wrapper = "DifferentialPrivacyClientSideFixedClipping"
    params = { noise_multiplier = 0.5, clipping_norm = 1.0, num_sampled_clients = 5 }
    target_delta = 1e-5                  # with noise_multiplier > 0 the wrapper gets a privacy accountant:
    # population_size = 500              # target_delta, population_size, max_epsilon, accounting = false
    # max_epsilon = 8.0                  # (no accountant) are its keys (gateway/privacy.py)

Parameters are checked against the constructor's signature (unknown names
and missing required ones), then the constructor runs: whatever it refuses
is a `ConfigError` too, so nothing about the strategy fails mid-run.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from protocol.config import ConfigError

DP_WRAPPERS = (
    "DifferentialPrivacyClientSideFixedClipping",
    "DifferentialPrivacyServerSideFixedClipping",
    "DifferentialPrivacyClientSideAdaptiveClipping",
    "DifferentialPrivacyServerSideAdaptiveClipping",
)


def resolve(name: str, field: str = "strategy.name") -> type:
    """The Strategy class called `name`: a Flower strategy, or `module:Class` / `module.Class`."""
    from flwr.serverapp import strategy as flwr_strategies
    from flwr.serverapp.strategy import Strategy

    if ":" in name or "." in name:
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:  # TypeError: "../x" is relative
            raise ConfigError(f"{field}: cannot import {name!r}: {exc}") from exc
    else:
        cls = getattr(flwr_strategies, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        known = sorted(n for n in dir(flwr_strategies)
                       if inspect.isclass(getattr(flwr_strategies, n)) and n not in DP_WRAPPERS and n != "Strategy")
        raise ConfigError(f"{field}: {name!r} is not a Flower strategy; known: {', '.join(known)}, "
                          "or a Strategy subclass as module:Class")
    return cls


def _construct(cls: type, params: dict[str, Any], field: str, build: type | None = None, **given: Any):
    """`cls(**given, **params)` (or `build(...)`, a subclass taking the same parameters), checked first."""
    signature = inspect.signature(cls.__init__)
    accepted = {n for n, p in signature.parameters.items() if n != "self"}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = sorted(set(params) - accepted)
    if unknown and not takes_any:
        raise ConfigError(f"{field}: {cls.__name__} takes no parameter(s) {unknown}; it takes {sorted(accepted)}")
    missing = sorted(
        n for n, p in signature.parameters.items()
        if n != "self" and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and n not in params and n not in given
    )
    if missing:
        raise ConfigError(f"{field}: {cls.__name__} needs parameter(s) {missing}")
    try:
        return (build or cls)(**given, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: {cls.__name__} refused them: {exc}") from exc


METRICS_HOOK = "train_metrics_aggr_fn"  # Flower strategies' hook over the replies they aggregated


def make_strategy(name: str, params: dict[str, Any], dp: dict[str, Any] | None = None,
                  selection_recorder: Any = None, defense: dict[str, Any] | None = None,
                  population: Callable[[], int] | None = None):
    """Instantiate the strategy (and its DP wrapper, and the update bound of `[defense]` around both);
    every problem is a `ConfigError`.

    `selection_recorder` (gateway/provenance.py) becomes the strategy's `train_metrics_aggr_fn` when its
    constructor takes one and the config does not set it: the gateway learns which replies it aggregated.
    `population()`: the devices enrolled now, the population the privacy accountant reports (privacy.py).
    """
    cls = resolve(name)
    given = {}
    if selection_recorder is not None and METRICS_HOOK not in params:
        if METRICS_HOOK in inspect.signature(cls.__init__).parameters:  # (every Flower strategy's FedAvg base)
            given[METRICS_HOOK] = selection_recorder
    strategy = _wrap_dp(_construct(cls, params, "strategy.params", **given), dp, cls, name, params, population)
    if not defense:
        return strategy
    from .defense import UpdateBound

    return _construct(UpdateBound, defense, "defense", strategy=strategy)


def _wrap_dp(strategy, dp: dict[str, Any] | None, cls: type, name: str, params: dict[str, Any],
             population: Callable[[], int] | None):
    if not dp:
        return strategy
    wrapper = dp.get("wrapper")
    if wrapper not in DP_WRAPPERS:
        raise ConfigError(f"strategy.dp.wrapper must be one of {', '.join(DP_WRAPPERS)}, got {wrapper!r}")
    from flwr.serverapp import strategy as flwr_strategies

    from . import privacy

    wrapper_params = dp.get("params", {})
    if not isinstance(wrapper_params, dict) or set(dp) - {"wrapper", "params", *privacy.KEYS}:
        raise ConfigError(f"strategy.dp takes `wrapper`, a `params` table and {', '.join(privacy.KEYS)} only")
    flower = getattr(flwr_strategies, wrapper)
    settings = privacy.parse_settings(dp)
    if not privacy.accounted(dp):
        return _construct(flower, wrapper_params, "strategy.dp.params", strategy=strategy)
    sampled = privacy.check_strategy(cls, name, params, dp)
    accountant = privacy.FleetAccountant(settings, sampled, population)
    return _construct(flower, wrapper_params, "strategy.dp.params", build=privacy.WRAPPERS[wrapper],
                      strategy=strategy, accountant=accountant)
