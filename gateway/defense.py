"""A defense that composes with any strategy: bound every update before the strategy sees it.

    [defense]
    norm_bound = 0.0            # a fixed bound on an update's L2 norm (0: none) ...
    median_multiple = 2.0       # ... and at most this many times the round's median update norm (0: none)
    centered_clipping = false   # the stronger rule: clip around the previous round's direction

`UpdateBound` wraps a Flower strategy the way Flower's DP wrappers do (it
takes `strategy` and delegates everything). In `aggregate_train` it rewrites
each reply's arrays in place before handing them on, so the wrapped strategy,
the gateway's provenance (which reply went in) and every other wrapper keep
working unchanged:

- norm bound: an update whose delta is longer than the bound is scaled down to it (a boosted
  update weighs no more than an honest one; what it still can do is point the wrong way);
- centered clipping (Karimireddy, He and Jaggi, ICML 2021): every delta is clipped to the bound
  *around v*, the previous round's aggregate delta (`v + clip(x - v)`), so a weighted mean of the
  clipped updates is one step of the centered-clipping iteration; updates far from where the
  fleet was going lose their pull, whatever their direction. `v` is server-side state: saved with
  each release and restored after a restart (`starling_state`, strategy_state.py).

What it costs on clean runs, and which attacks it does not stop, is in the README ("Defense").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from protocol.fields import is_number

PARAMETERS: dict[str, type] = {  # the [defense] keys (UpdateBound's parameters) and their types
    "norm_bound": float,
    "median_multiple": float,
    "centered_clipping": bool,
}


class UpdateBound(Strategy):
    """Any strategy, with every update's norm bounded first (and optionally clipped around the last round)."""

    starling_state = ("momentum",)  # centered clipping's v: what the last round's aggregate moved

    def __init__(self, strategy: Strategy, norm_bound: float = 0.0, median_multiple: float = 2.0,
                 centered_clipping: bool = False) -> None:
        """`norm_bound`: no update's delta longer than this (0: no fixed bound); `median_multiple`: none longer
        than this many times the round's median delta norm (0: no relative bound); at least one is set.
        `centered_clipping`: clip around the previous round's aggregate delta instead of around zero."""
        for name, value in (("norm_bound", norm_bound), ("median_multiple", median_multiple)):
            if not is_number(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and not negative, got {value!r}")
        if not isinstance(centered_clipping, bool):  # ("no" would be truthy: clipping on)
            raise TypeError(f"centered_clipping must be true or false, got {type(centered_clipping).__name__} "
                             f"{centered_clipping!r}")
        if norm_bound == 0 and median_multiple == 0:
            raise ValueError("set norm_bound or median_multiple (or both): otherwise nothing is bounded")
        self.strategy = strategy
        self.norm_bound = float(norm_bound)
        self.median_multiple = float(median_multiple)
        self.centered_clipping = centered_clipping
        self.momentum: dict[str, np.ndarray] | None = None
        self._base: dict[str, np.ndarray] | None = None
        self.bounded = 0  # replies whose delta was cut in the last round (for the log and the tests)

    def summary(self) -> None:
        log(INFO, "\t├──> UpdateBound: norm_bound %s, median_multiple %s, centered clipping %s",
            self.norm_bound, self.median_multiple, self.centered_clipping)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._base = {k: v.numpy() for k, v in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._base is not None and replies:
            self._bound(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None and self._base is not None:
            self.momentum = {k: v.numpy() - self._base[k] for k, v in arrays.items()}
        return arrays, metrics

    def _bound(self, replies: list[Message]) -> None:
        base = self._base
        center = self.momentum if self.centered_clipping and self.momentum is not None else None
        deltas = []
        for reply in replies:
            record = next(iter(reply.content.array_records.values()))
            delta = {k: record[k].numpy() - base[k] for k in base}
            if center is not None:
                delta = {k: delta[k] - center[k] for k in base}
            deltas.append(delta)
        norms = [math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values())) for delta in deltas]
        bound = min(b for b in (self.norm_bound or math.inf,
                                self.median_multiple * float(np.median(norms)) if self.median_multiple else math.inf))
        self.bounded = 0
        for reply, delta, norm in zip(replies, deltas, norms):
            if norm <= bound:
                continue
            self.bounded += 1
            scale = bound / norm
            offset = center if center is not None else {k: 0.0 for k in base}
            key = next(iter(reply.content.array_records))
            reply.content[key] = ArrayRecord(  # in place: the same content object, as the gateway tracks it
                {k: Array((base[k] + offset[k] + delta[k] * scale).astype(np.float32)) for k in base})
        if self.bounded:
            log(INFO, "update_bound: %d of %d updates cut to norm %.4g", self.bounded, len(replies), bound)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
