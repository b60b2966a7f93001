"""The privacy cost of a DP run: Flower's RDP accountant, kept for as long as the gateway runs.

    [strategy.dp]
    wrapper = "DifferentialPrivacyServerSideFixedClipping"    # any of Flower's four DP wrappers
    params = { noise_multiplier = 0.8, clipping_norm = 1.0, num_sampled_clients = 20 }
    target_delta = 1e-5      # epsilon is reported at this delta (default 1e-5)
    population_size = 500    # the population in the report (default: the devices enrolled here)
    max_epsilon = 8.0        # optional: a round whose release would spend more is not started; the gateway
                             # ends then (state "done", reason "privacy_budget_spent", exit 0), its last
                             # model still published; restarted, it ends again after publishing it afresh
    accounting = true        # false: the wrapper adds its noise and no privacy cost is claimed

With `noise_multiplier > 0` the gateway accounts every private release with
Flower's `RdpAccountant` (Google's dp-accounting): client-level DP,
add-or-remove-one neighbouring, no amplification by sampling, epsilon at
`target_delta`. One model release is one Gaussian mechanism on the sum of the
sampled devices' clipped updates; its noise multiplier z is

    fixed clipping      z = noise_multiplier: Flower's wrappers take the accountant (`accountant=`)
                        and compose one event per release themselves
    adaptive clipping   z_eff = (z_model^-2 + sigma_b^-2)^-1/2,  z_model = z_delta * (n / m) * (C' / C)
                        composed each round by this module's versions of the two wrappers (Flower's
                        take no accountant), rounded down to 3 significant digits

where z_delta is the multiplier of the model noise (the wrapper's `noise_multiplier` attribute after
Flower split the configured one), sigma_b is `clipped_count_stddev` (the noise on the count of
clipped updates, which sets the next clipping norm), n the replies aggregated, m
`num_sampled_clients`, C the clipping norm the round's updates were clipped to and C' the one
Flower's noise is scaled by (it adapts the norm before it adds the noise: C' is the next round's).
The round releases two Gaussian mechanisms on the same devices, whose RDP curves add up to the one
of a single mechanism with z_eff. Andrew et al. (2021, Thm. 1) have (z_delta^-2 + (2 sigma_b)^-2)^-1/2
for centred bits b - 1/2 (sensitivity 1/2); Flower's wrappers add the noise to the plain count of
bits in {0, 1} (sensitivity 1), so sigma_b counts once, not twice. Flower picks z_delta by the
paper's formula from the configured multiplier z, so z_eff < z (z = 0.5, sigma_b = 1, C' = C:
z_delta = 0.5164, z_eff = 0.4588): the epsilon reported is the one of what runs. Rounding z_eff down
(never up: at most 1 % less noise counted) keeps the record small.

No amplification: Flower's fixed-clipping accounting supports no other, and the gateway samples
among the devices online at the round, not a uniform secret sample of a fixed population. The
population is reported, not used.

What accounting needs (each a ConfigError naming the fields, at start-up; `check_strategy` and
`check_gateway`):
- a strategy that aggregates with FedAvg's mean (FedAvg, FedProx, or a subclass keeping
  `FedAvg.aggregate_train`): the noise is added to what the strategy returns, and only for a mean
  of clipped updates is that the Gaussian mechanism above;
- `[aggregation] weights = "uniform"`: every reply weighs the same (Flower's accountant refuses a
  round of unequal weights; "capped" weighs replies by their example counts);
- exactly m devices per round: the gateway's wrappers draw `num_sampled_clients` at random among
  the online devices (`strategy.params`: fraction_train 1.0, min_train_nodes and
  min_available_nodes at most m; `rounds.min_devices` at least m). A round that finds fewer online
  is skipped: nothing is released, nothing spent. With fixed clipping a round with fewer than m
  replies by the deadline releases nothing (Flower's rule); with adaptive clipping it releases and
  is accounted with z_model = z_delta * n / m.

The accountant's record is the composed events, `(z, sample size) -> releases`: it stays small
however long the gateway runs, and is saved with every release and restored after a restart
(strategy_state.py). Not accounted: the metrics devices report (accuracy, loss, example counts),
as in Flower.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from protocol.config import ConfigError
from protocol.fields import is_finite_number, is_int, is_number
from protocol.logs import event

log = logging.getLogger("starling.gateway.privacy")

KEYS = ("target_delta", "population_size", "max_epsilon", "accounting")  # [strategy.dp] besides wrapper, params
DEFAULT_DELTA = 1e-5
SAMPLING = SamplingMethod.NO_AMPLIFICATION
RELATION = NeighboringRelation.ADD_OR_REMOVE_ONE
SAMPLED = "num_sampled_clients"


@dataclass(frozen=True)
class PrivacySettings:
    """The `[strategy.dp]` keys of the accounting."""

    target_delta: float = DEFAULT_DELTA
    population_size: int | None = None  # None: the devices enrolled at the gateway
    max_epsilon: float | None = None
    accounting: bool = True


def parse_settings(dp: dict[str, Any]) -> PrivacySettings:
    """The accounting keys of `[strategy.dp]`, each checked (a ConfigError names the field)."""
    def number(key: str, default: Any) -> Any:
        value = dp.get(key, default)
        if value is default:
            return value
        if not is_finite_number(value):
            raise ConfigError(f"strategy.dp.{key} must be a finite number, got {value!r}")
        return value

    delta = number("target_delta", DEFAULT_DELTA)
    if not 0 < delta < 1:
        raise ConfigError(f"strategy.dp.target_delta must be strictly between 0 and 1, got {delta!r}")
    population = number("population_size", None)
    if population is not None and (not is_int(population) or population < 1):
        raise ConfigError(f"strategy.dp.population_size must be a whole number of devices >= 1, got {population!r}")
    max_epsilon = number("max_epsilon", None)
    if max_epsilon is not None and max_epsilon <= 0:
        raise ConfigError(f"strategy.dp.max_epsilon must be positive, got {max_epsilon!r}")
    accounting = dp.get("accounting", True)
    if not isinstance(accounting, bool):
        raise ConfigError(f"strategy.dp.accounting must be true or false, got {accounting!r}")
    return PrivacySettings(float(delta), population, None if max_epsilon is None else float(max_epsilon), accounting)


def accounted(dp: dict[str, Any] | None) -> bool:
    """Whether `[strategy.dp]` asks for noise that the gateway accounts (noise_multiplier > 0, accounting on)."""
    if not dp or dp.get("wrapper") not in WRAPPERS or not isinstance(dp.get("params", {}), dict):
        return False
    noise = dp.get("params", {}).get("noise_multiplier")
    if not is_number(noise) or not noise > 0:
        return False  # (0 or nothing: no noise; a bad value is the wrapper's constructor's to refuse)
    return dp.get("accounting", True) is not False


def check_strategy(cls: type, name: str, params: dict[str, Any], dp: dict[str, Any]) -> int:
    """The strategy-side rules of accounting (module doc); return num_sampled_clients."""
    wrapper_params = dp.get("params", {})
    m = wrapper_params.get(SAMPLED)
    if not is_int(m) or m < 1:
        raise ConfigError(f"strategy.dp.params.{SAMPLED} must be a whole number >= 1, got {m!r}")
    if not math.isfinite(wrapper_params["noise_multiplier"]):
        raise ConfigError(f"strategy.dp.params.noise_multiplier must be finite, got {wrapper_params['noise_multiplier']!r}")
    if "accountant" in wrapper_params:
        raise ConfigError("strategy.dp.params.accountant: the gateway gives the wrapper its accountant "
                          f"(configured by strategy.dp.{', strategy.dp.'.join(KEYS)})")
    off = "or set strategy.dp.accounting = false (the noise is added, no privacy cost is claimed)"
    fedavg = flwr_strategies.FedAvg
    if not (issubclass(cls, fedavg) and cls.aggregate_train is fedavg.aggregate_train):
        raise ConfigError(
            f"strategy.name: privacy accounting (strategy.dp.params.noise_multiplier > 0) needs a strategy that "
            f"aggregates with FedAvg's mean (FedAvg, FedProx); {name} aggregates otherwise, and the noise added to "
            f"its result is not the mechanism accounted. Use FedAvg or FedProx, {off}")
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()}
    fraction = params.get("fraction_train", defaults.get("fraction_train", 1.0))
    if fraction != 1.0:
        raise ConfigError(f"strategy.params.fraction_train must stay 1.0 with privacy accounting, got {fraction!r}: "
                          f"strategy.dp.params.{SAMPLED} ({m}) is how many devices train each round")
    for key in ("min_train_nodes", "min_available_nodes"):
        value = params.get(key, defaults.get(key, 0))
        if isinstance(value, int) and value > m:
            raise ConfigError(f"strategy.params.{key} ({value}) must not exceed strategy.dp.params.{SAMPLED} ({m}) "
                              "with privacy accounting: every round trains exactly that many devices "
                              "(rounds.min_devices waits for more to be online)")
    settings = parse_settings(dp)
    if settings.population_size is not None and settings.population_size < m:
        raise ConfigError(f"strategy.dp.population_size ({settings.population_size}) is smaller than "
                          f"strategy.dp.params.{SAMPLED} ({m})")
    return m


def check_gateway(dp: dict[str, Any] | None, weights: str, min_devices: int) -> None:
    """The gateway-side rules of accounting: uniform weights, enough devices online before a round."""
    if not accounted(dp):
        return
    m = dp["params"].get(SAMPLED)
    if weights != "uniform":
        raise ConfigError(
            f"aggregation.weights = {weights!r} cannot go with privacy accounting (strategy.dp.wrapper = "
            f"{dp['wrapper']!r}, noise_multiplier > 0): the DP analysis, and Flower's accountant, need every "
            'update to weigh the same; set aggregation.weights = "uniform" (or strategy.dp.accounting = false to '
            "add the noise without a reported privacy cost)")
    if isinstance(m, int) and min_devices < m:
        raise ConfigError(f"rounds.min_devices ({min_devices}) must be at least strategy.dp.params.{SAMPLED} ({m}) "
                          "with privacy accounting: a round that finds fewer devices online is skipped")


def effective_noise_multiplier(model: float, count_stddev: float) -> float:
    """z_eff = (z_model^-2 + sigma_b^-2)^-1/2: the model release and the clipped count as one mechanism."""
    if count_stddev <= 0:
        return model
    if model <= 0:
        return count_stddev
    return (model ** -2 + count_stddev ** -2) ** -0.5


def round_down(z: float, digits: int = 3) -> float:
    """`z` to `digits` significant digits, never up (less noise counted: a larger epsilon)."""
    if not z > 0 or not math.isfinite(z):
        return z
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(z)))
    return math.floor(z * scale) / scale


class FleetAccountant:
    """Flower's `RdpAccountant` (PrivacyAccountant protocol) for a fleet whose size changes, with a bounded record.

    The record is `(noise multiplier, sample size) -> releases`, merged (composition commutes); the
    RdpAccountant is rebuilt from it when it changes. Without amplification the population does not
    change epsilon: it is `population_size`, or the devices enrolled now (at least the sample size).
    """

    method = "rdp"

    def __init__(self, settings: PrivacySettings, sample_size: int,
                 enrolled: Callable[[], int] | None = None) -> None:
        try:
            import dp_accounting  # noqa: F401 (Flower's RdpAccountant needs it; say so at start-up)
        except ImportError as exc:
            raise ConfigError('strategy.dp: privacy accounting needs dp-accounting: pip install "flwr[dp]" '
                              "(the gateway extra has it), or set strategy.dp.accounting = false") from exc
        self.settings = settings
        self._sample_size = sample_size
        self._enrolled = enrolled or (lambda: 0)
        self._events: dict[tuple[float, int], int] = {}
        self._rdp: Any = None
        self.budget_spent = False  # found spent before a round (budget_spent()): the gateway runs no more rounds

    # --- Flower's PrivacyAccountant protocol --------------------------------------------------

    @property
    def config(self) -> PrivacyConfig:
        return self._accountant().config

    @property
    def num_releases(self) -> int:
        return sum(self._events.values())

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        if not is_int(count) or count < 1:
            raise ValueError("count must be a positive integer.")
        key = (float(event.noise_multiplier), int(event.sample_size))
        self._events[key] = self._events.get(key, 0) + count
        self._rdp = None

    def get_epsilon(self, delta: float) -> float:
        return self._accountant().get_epsilon(delta)

    def get_delta(self, epsilon: float) -> float:
        return self._accountant().get_delta(epsilon)

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        return self._accountant().get_privacy_spent(delta)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self.settings.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("max_epsilon must be supplied either in PrivacyConfig or to would_exceed().")
        key = (float(event.noise_multiplier), int(event.sample_size))
        trial = self._build({**self._events, key: self._events.get(key, 0) + count})
        return bool(trial.get_epsilon(self.settings.target_delta) > limit)

    def state_dict(self) -> dict[str, object]:
        """Flower's RdpAccountant state (JSON), of the merged record."""
        return self._accountant().state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Take the releases of a saved state (an RdpAccountant's, no amplification, add-or-remove-one).

        The saved population, delta and epsilon limit do not bind (they do not change what was spent):
        the current settings apply. Raises ValueError for anything else."""
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        try:
            saved = state["config"]
            config = PrivacyConfig(target_delta=float(saved["target_delta"]),
                                   population_size=int(saved["population_size"]),
                                   neighboring_relation=NeighboringRelation(saved["neighboring_relation"]),
                                   sampling_method=SamplingMethod(saved["sampling_method"]),
                                   max_epsilon=None if saved["max_epsilon"] is None else float(saved["max_epsilon"]))
            if (config.sampling_method, config.neighboring_relation) != (SAMPLING, RELATION):
                raise ValueError(f"saved with {config.sampling_method.value} sampling and "
                                 f"{config.neighboring_relation.value} neighbours, not {SAMPLING.value}, {RELATION.value}")
            check = RdpAccountant(config)
            check.load_state_dict(state)  # Flower's own validation of the record
            events: dict[tuple[float, int], int] = {}
            for item in check.state_dict()["compositions"]:
                key = (float(item["event"]["noise_multiplier"]), int(item["event"]["sample_size"]))
                events[key] = events.get(key, 0) + int(item["count"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a saved privacy accountant: {type(exc).__name__}: {exc}") from exc
        self._events, self._rdp = events, None

    # --- the fleet's side ------------------------------------------------------------------------

    def event(self, noise_multiplier: float, sample_size: int) -> GaussianPrivacyEvent:
        """A release of `sample_size` devices' updates with this noise multiplier."""
        return GaussianPrivacyEvent(noise_multiplier, sample_size, max(sample_size, self._population(self._events)))

    def _population(self, events: dict[tuple[float, int], int]) -> int:
        largest = max((n for _, n in events), default=1)
        if self.settings.population_size is not None:
            return max(self.settings.population_size, largest)
        return max(1, self._sample_size, largest, int(self._enrolled()))

    def _build(self, events: dict[tuple[float, int], int]) -> Any:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        population = self._population(events)
        rdp = RdpAccountant(PrivacyConfig(self.settings.target_delta, population, RELATION, SAMPLING,
                                          self.settings.max_epsilon))
        for (z, n), count in sorted(events.items()):
            rdp.compose(GaussianPrivacyEvent(z, n, population), count)
        return rdp

    def _accountant(self) -> Any:
        rdp = self._rdp
        if rdp is None or rdp.config.population_size != self._population(self._events):
            rdp = self._rdp = self._build(self._events)
        return rdp


# --- the wrappers: Flower's, with the fleet's sampling (and, for adaptive clipping, the accounting) ------


class _Sample(Grid):
    """The gateway's grid with its online devices narrowed to one round's sample."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class _FleetSampling:
    """Exactly `num_sampled_clients` devices per training round, drawn at random among the online ones;
    a round that finds fewer is skipped (no task, no release, nothing spent)."""

    num_sampled_clients: int
    accountant: FleetAccountant
    _draw = random.SystemRandom()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._short_rounds: set[int] = set()

    def accounted_noise_multiplier(self, replies: int | None = None) -> float:
        return float(self.noise_multiplier)  # type: ignore[attr-defined]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        online = list(grid.get_node_ids())
        if len(online) < self.num_sampled_clients:
            event(log, "privacy.round_skipped", logging.WARNING, round=server_round, online=len(online),
                  needed=self.num_sampled_clients)
            self._short_rounds.add(server_round)
            return []
        sample = _Sample(grid, self._draw.sample(online, self.num_sampled_clients))
        return super().configure_train(server_round, arrays, config, sample)  # type: ignore[misc]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if server_round in self._short_rounds:
            self._short_rounds.discard(server_round)
            return None, None
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class _AdaptiveAccounting(_FleetSampling):
    """Compose each round's releases (module doc: z_eff) into the accountant; refuse a round beyond max_epsilon."""

    clipped_count_stddev: float

    def __init__(self, *args: Any, accountant: FleetAccountant, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accountant = accountant
        self.last_noise_multiplier: float | None = None  # the last round's z_eff (the report)

    def accounted_noise_multiplier(self, replies: int | None = None, norm_ratio: float = 1.0) -> float:
        """z_eff of a round with `replies` replies (default: m) and C'/C = `norm_ratio` (module doc)."""
        m = self.num_sampled_clients
        n = m if replies is None else min(replies, m)
        model = float(self.noise_multiplier) * n / m * norm_ratio  # type: ignore[attr-defined]
        return round_down(effective_noise_multiplier(model, float(self.clipped_count_stddev)))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        limit = self.accountant.settings.max_epsilon
        if limit is not None:
            event_ = self.accountant.event(self.accounted_noise_multiplier(), self.num_sampled_clients)
            if self.accountant.would_exceed(event_):
                spent = self.accountant.get_privacy_spent()
                raise PrivacyBudgetExhausted("The next private release would exceed max_epsilon "
                                             f"(current epsilon: {spent.epsilon}, delta: {spent.delta}).")
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        short = server_round in self._short_rounds
        norm = self.clipping_norm  # type: ignore[attr-defined]
        arrays, metrics = super().aggregate_train(server_round, replies)
        n = sum(1 for reply in replies if not reply.has_error())
        if short or not n:
            return arrays, metrics
        if arrays is not None:  # clipped to `norm`, noise scaled by the norm it adapted to (module doc)
            z = self.accounted_noise_multiplier(n, self.clipping_norm / norm)  # type: ignore[attr-defined]
        elif self.clipping_norm != norm:  # type: ignore[attr-defined]
            z = round_down(float(self.clipped_count_stddev))  # no model went out, but the noisy count did
        else:
            return arrays, metrics
        self.accountant.compose(self.accountant.event(z, n))
        self.last_noise_multiplier = z
        return arrays, metrics


class DifferentialPrivacyServerSideFixedClipping(
        _FleetSampling, flwr_strategies.DifferentialPrivacyServerSideFixedClipping):
    """Flower's wrapper with the fleet's sampling; it composes its releases into its `accountant` itself."""


class DifferentialPrivacyClientSideFixedClipping(
        _FleetSampling, flwr_strategies.DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper with the fleet's sampling; it composes its releases into its `accountant` itself."""


class DifferentialPrivacyServerSideAdaptiveClipping(
        _AdaptiveAccounting, flwr_strategies.DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's wrapper with the fleet's sampling and the accounting of its releases (module doc)."""


class DifferentialPrivacyClientSideAdaptiveClipping(
        _AdaptiveAccounting, flwr_strategies.DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's wrapper with the fleet's sampling and the accounting of its releases (module doc)."""


WRAPPERS: dict[str, type] = {cls.__name__: cls for cls in (
    DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping,
    DifferentialPrivacyClientSideAdaptiveClipping, DifferentialPrivacyServerSideAdaptiveClipping)}


def _wrapped(strategy: Any, depth: int = 6) -> Iterator[Any]:
    for _ in range(depth):
        if strategy is None:
            return
        yield strategy
        inner = getattr(strategy, "strategy", None)
        strategy = None if inner is strategy else inner


BUDGET_SPENT = "privacy_budget_spent"  # why a gateway ended (state "done"): the next release would pass max_epsilon


def _accounted(strategy: Any) -> tuple[Any, FleetAccountant] | tuple[None, None]:
    """The wrapper that accounts its releases, and its accountant (or None, None)."""
    for inner in _wrapped(strategy):
        accountant = getattr(inner, "accountant", None)
        if isinstance(accountant, FleetAccountant) and hasattr(inner, "accounted_noise_multiplier"):
            return inner, accountant
    return None, None


def budget_spent(strategy: Any) -> str | None:
    """Why no further round can run, when the next round's release would spend more than `max_epsilon` (the
    wrappers' own check at configure_train, asked before the round starts); None while the budget lasts."""
    inner, accountant = _accounted(strategy)
    if accountant is None or accountant.settings.max_epsilon is None:
        return None
    if not accountant.would_exceed(accountant.event(inner.accounted_noise_multiplier(), inner.num_sampled_clients)):
        return None
    return mark_budget_spent(strategy)


def mark_budget_spent(strategy: Any) -> str:
    """The budget is spent (the report says so from now on); what was spent, in words."""
    _, accountant = _accounted(strategy)
    if accountant is None:
        return "a private release would exceed the privacy budget"
    accountant.budget_spent = True
    spent = accountant.get_privacy_spent()
    return (f"the next private release would exceed max_epsilon {accountant.settings.max_epsilon} "
            f"(spent: epsilon {spent.epsilon:.6g} at delta {spent.delta:g} in {spent.num_releases} releases)")


def report(strategy: Any) -> dict[str, Any] | None:
    """The privacy spent so far (status topic and result.json), or None when nothing is accounted."""
    inner, accountant = _accounted(strategy)
    if accountant is None:
        return None
    spent = accountant.get_privacy_spent()
    z = getattr(inner, "last_noise_multiplier", None) or inner.accounted_noise_multiplier()
    return {
        "epsilon": spent.epsilon if math.isfinite(spent.epsilon) else None,
        "delta": spent.delta,
        "rounds": spent.num_releases,  # private releases composed
        "noise_multiplier": z,  # per release (adaptive clipping: z_eff of the last round)
        "method": f"{spent.accounting_method}, {SAMPLING.value}, {RELATION.value}",
        "population": accountant.config.population_size,
        "max_epsilon": accountant.settings.max_epsilon,
        "wrapper": type(inner).__name__,
        "clipping_norm": float(inner.clipping_norm),  # (adaptive clipping: the next round's)
        "budget_spent": accountant.budget_spent,  # the next release would exceed max_epsilon: no more rounds
    }
