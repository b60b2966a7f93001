"""What a device's reply weighs: never simply what the device says.

A reply claims how many examples it trained (or evaluated) on, and Flower's
weighted strategies (FedAvg and its family) weigh each reply by that number.
A device can claim anything its signature covers: one enrolled device
claiming 10,000,000 examples would outweigh a whole city. The gateway gives
each reply an *effective* weight instead, by the `[aggregation] weights` rule:

    capped     min(claim, cap): cap = `max_examples`, and at most `median_multiple` times the
               median claim of the exchange (the default: honest devices differ a few-fold, an
               inflated claim is cut to a couple of honest ones)
    uniform    1 for every reply (every device counts the same)
    reported   the claim itself (Flower's default; only where every device is trusted)

The same rule weighs the evaluation averages (accuracy and loss in the status and
report), so a device cannot steer those either. What an attacker can still do
is in the README ("Weights").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("capped", "uniform", "reported")


@dataclass(frozen=True)
class WeightRule:
    rule: str = "capped"
    max_examples: int = 100_000  # "capped": no reply weighs more than this many examples ...
    median_multiple: float = 2.0  # ... nor more than this many times the exchange's median claim

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"weights rule must be one of {RULES}, not {self.rule!r}")
        if self.max_examples < 1 or not (math.isfinite(self.median_multiple) and self.median_multiple >= 1):
            raise ValueError("max_examples must be >= 1 and median_multiple a finite number >= 1")

    def effective(self, claims: list[int]) -> list[int]:
        """The weight of each reply of one exchange, from what the replies claim (each >= 1)."""
        if self.rule == "reported":
            return list(claims)
        if self.rule == "uniform":
            return [1] * len(claims)
        if not claims:
            return []
        cap = min(self.max_examples, max(1, math.floor(self.median_multiple * _median(claims))))
        return [min(claim, cap) for claim in claims]


def _median(values: list[int]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
