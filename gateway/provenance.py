"""What shaped a model: the inputs a strategy really aggregated, their effective weights, and each update's share.

Selection comes from Flower's own computation, not a second implementation:
every Flower strategy aggregates its training metrics over exactly the replies
it aggregated (FedAvg: all of them; Krum and MultiKrum: the ones they
selected; Bulyan: its selection), through its `train_metrics_aggr_fn`
constructor parameter. The gateway passes a `SelectionRecorder` there (around
Flower's own `aggregate_metricrecords`), so after `aggregate_train` it knows
which replies' contents went in.

Inputs are recorded in the order the strategy aggregated them (its `train_metrics_aggr_fn` gets them in
that order: the replies' order for FedAvg and the coordinate rules, Krum's score order for MultiKrum and
Bulyan), and `sequence` lists every content it aggregated with the weight Flower weighed it by: float32
sums depend on their order, so this is what a recompute needs (gateway/recompute.py).

    rule kind     inputs recorded                               effective weights
    weighted      every aggregated reply                       its weight / the sum (FedAvg, FedProx, FedOpt ...)
    selected      the replies the rule selected (Krum, MultiKrum)   the same, over the selected
    coordinate    every input the coordinate-wise rule saw     none (the rule decides per coordinate:
                  (FedMedian, FedTrimmedAvg; Bulyan: its selection)   FedMedian, FedTrimmedAvg, Bulyan)

Contribution scores (`contributions`): how much each accepted update moved the
model the way the round went, to first order: the projection of its delta on
the round's delta, `w_i * <d_i, D> / |D|^2` (w_i its effective weight; 1/n for
coordinate rules), so a plain weighted mean's scores sum to 1; a free rider
scores about 0, an update against the round below 0, and an input the rule
left out exactly 0. O(devices x parameters) per round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

WEIGHTED, SELECTED, COORDINATE = "weighted", "selected", "coordinate"
_SELECTING = ("MultiKrum",)  # Krum is a MultiKrum selecting one
_COORDINATE = ("FedMedian", "FedTrimmedAvg", "Bulyan")


def rule_kind(strategy: Any) -> str:
    """How a strategy combines its inputs (the innermost one, under any wrappers)."""
    while getattr(strategy, "strategy", None) is not None and strategy.strategy is not strategy:
        strategy = strategy.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names & set(_COORDINATE):
        return COORDINATE
    if names & set(_SELECTING):
        return SELECTED
    return WEIGHTED


class SelectionRecorder:
    """A strategy's `train_metrics_aggr_fn` that notes the contents it is called with, then does the real work."""

    def __init__(self, inner: Callable[..., Any] | None = None) -> None:
        if inner is None:
            from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

            inner = aggregate_metricrecords
        self._inner = inner
        self._seen: list[Any] | None = None

    def __call__(self, contents: list[Any], weighted_by_key: str) -> Any:
        self._seen = list(contents)
        return self._inner(contents, weighted_by_key)

    def take(self) -> list[Any] | None:
        """The contents of the last call (None if there was none since the last take)."""
        seen, self._seen = self._seen, None
        return seen


@dataclass(frozen=True)
class Source:
    """One reply the strategy got: who sent which update, the Flower content it arrived in, and its delta
    (as the device sent it: coordinate-wise strategies consume the contents' arrays while aggregating)."""

    device: bytes
    digest: bytes
    content: Any
    delta: Callable[[], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Provenance:
    """What shaped one round's model: the rule's kind and the inputs it took, with their effective weights.

    `scores()` is the costly part (a dot product per accepted update): the gateway calls it once the
    round's model is out, off the round's critical path."""

    kind: str  # WEIGHTED, SELECTED or COORDINATE
    inputs: tuple[tuple[bytes, float | None], ...]  # (update digest, effective weight); None for coordinate rules
    # Every content the strategy aggregated, in its order: (update digest, the weight Flower got for it, its
    # `weight_key` value; None for coordinate rules, which weigh nothing). Byte-identical updates appear once
    # each here, merged in `inputs`.
    sequence: tuple[tuple[bytes, int | float | None], ...]
    _replies: tuple[Source, ...]
    _weights: dict[int, float]  # id(content) -> the weight its update had in the rule (0: left out)
    _base: dict[str, np.ndarray]
    _output: dict[str, np.ndarray]

    def scores(self) -> tuple[tuple[bytes, bytes, float], ...]:
        """(device key, update digest, contribution) for every accepted update of the round."""
        round_delta = {k: np.asarray(self._output[k], np.float32) - self._base[k] for k in self._base}
        norm = sum(float(np.vdot(d, d)) for d in round_delta.values())
        scores = []
        for reply in self._replies:
            weight = self._weights.get(id(reply.content), 0.0)
            if weight == 0.0 or norm == 0.0:
                scores.append((reply.device, reply.digest, 0.0))
                continue
            delta = reply.delta()
            dot = sum(float(np.vdot(delta[k], round_delta[k])) for k in self._base)
            scores.append((reply.device, reply.digest, weight * dot / norm))
        return tuple(scores)


def provenance(kind: str, replies: list[Source], selected: list[Any] | None, weight_key: str,
               base: dict[str, np.ndarray], output: dict[str, np.ndarray]) -> Provenance:
    """From the replies the strategy got and the contents it aggregated (None: all of them). Byte-identical
    updates (a free rider's zeros from two devices) are one input, their weights summed; each device's
    record keeps its own score."""
    by_content = {id(r.content): r.digest for r in replies}
    aggregated = selected if selected is not None else [r.content for r in replies]
    chosen = [(by_content[id(c)], c) for c in aggregated if id(c) in by_content]  # in the strategy's order
    inputs: dict[bytes, float | None] = {}
    if kind == COORDINATE:
        weights = {id(c): 1.0 / len(chosen) for _, c in chosen} if chosen else {}
        inputs = {digest: None for digest, _ in chosen}  # the rule, not a weight, decided
        sequence = tuple((digest, None) for digest, _ in chosen)
    else:
        given = {id(c): next(iter(c.metric_records.values()))[weight_key] for _, c in chosen}
        raw = {key: float(value) for key, value in given.items()}
        total = sum(raw.values()) or 1.0  # summed in Flower's order: each share is exactly Flower's factor
        weights = {key: value / total for key, value in raw.items()}
        for digest, content in chosen:
            inputs[digest] = (inputs.get(digest) or 0.0) + weights[id(content)]
        sequence = tuple((digest, given[id(content)]) for digest, content in chosen)
    return Provenance(kind, tuple(inputs.items()), sequence, tuple(replies), weights, base, output)
