"""Checks for one field of a decoded message: its type, then its limits.

Every decoder of untrusted CBOR (message schemas, tensors, envelopes, the
ledger's vertices and snapshots) checks its fields with these, so a field
is refused for the same reasons and in the same words wherever it arrives.
Each `check_*` returns the value it accepted and raises `SchemaError` for a
wrong type, `LimitExceeded` for a value out of bounds and `NonFiniteValues`
for NaN or infinity.

CBOR true and false decode to Python's `True` and `False`, which are ints:
`is_int`, `is_number` and `is_finite_number` are the one place that tells them apart.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import LimitExceeded, NonFiniteValues, SchemaError, _brief


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An integer or a float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number (`is_number`) whose float is finite: not NaN or infinity, nor an int beyond the float range."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer (bignum) too large for a float
        return False


def check_fields(body: dict[str, Any], names: set[str], what: str) -> None:
    """`body` has exactly the keys `names` (the ledger's vertex bodies: no optional fields)."""
    if set(body) != names:
        missing, unknown = names - set(body), set(body) - names
        raise SchemaError(f"{what}: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}")


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if not is_int(value):
        raise SchemaError(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise LimitExceeded(f"{name}={_brief(value)} is outside [{lo}, {hi}]")
    return value


def check_float(value: Any, name: str, lo: float, hi: float) -> float:
    """A float, strictly: for values signed as they were encoded (an int would not re-encode the same)."""
    if type(value) is not float:
        raise SchemaError(f"{name} must be a float")
    return _finite_within(value, name, lo, hi)


def check_number(value: Any, name: str, lo: float, hi: float) -> float:
    """An int or a float, returned as a float (for fields the receiver converts anyway)."""
    if not is_number(value):
        raise SchemaError(f"{name} must be a number")
    try:
        number = float(value)
    except OverflowError as exc:  # an integer (bignum) beyond the float range
        raise LimitExceeded(f"{name} is outside [{lo}, {hi}]") from exc
    return _finite_within(number, name, lo, hi)


def _finite_within(value: float, name: str, lo: float, hi: float) -> float:
    if not math.isfinite(value):
        raise NonFiniteValues(f"{name} is not finite")
    if not lo <= value <= hi:
        raise LimitExceeded(f"{name}={value} is outside [{lo}, {hi}]")
    return value


def check_text(value: Any, name: str, max_len: int, min_len: int = 0) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{name} must be text")
    if not min_len <= len(value) <= max_len:
        raise LimitExceeded(f"{name} must have {min_len} to {max_len} characters")
    return value


def check_bytes(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise SchemaError(f"{name} must be {size} bytes")
    return value


def check_list(value: Any, name: str, max_len: int, min_len: int = 0) -> list[Any] | tuple[Any, ...]:
    """A list (or a tuple, from a caller: a decoded message always holds lists) of a bounded length."""
    if not isinstance(value, list | tuple):
        raise SchemaError(f"{name} must be a list")
    if not min_len <= len(value) <= max_len:
        raise LimitExceeded(f"{name} must have {min_len} to {max_len} items, has {len(value)}")
    return value
