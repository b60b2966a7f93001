"""How many hostile messages each surface was sent in this pytest session (printed at the end)."""

from __future__ import annotations

FLOOR = 100_000  # the suite's promise: at least this many mutated messages per run
SENT: dict[str, int] = {}


def count(surface: str, n: int) -> None:
    SENT[surface] = SENT.get(surface, 0) + n


def total() -> int:
    return sum(SENT.values())
