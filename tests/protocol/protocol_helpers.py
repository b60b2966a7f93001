"""Shared helpers for the protocol tests (not a test module)."""

from __future__ import annotations

import math
from typing import Any

import cbor2


def strict_equal(a: Any, b: Any) -> bool:
    """Equality that also compares types (True is not 1, 1.0 is not 1), NaN == NaN and the sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        # keys compare by strict equality too: find each key of a among b's keys
        for ka, va in a.items():
            matches = [kb for kb in b if strict_equal(ka, kb)]
            if len(matches) != 1 or not strict_equal(va, b[matches[0]]):
                return False
        return True
    if isinstance(a, cbor2.CBORTag):
        return a.tag == b.tag and strict_equal(a.value, b.value)
    if isinstance(a, cbor2.CBORSimpleValue):
        return a.value == b.value
    return a == b
