"""Checks every table of a scenario shares: known keys of the right types, finite numbers, and "a share
of the fleet" (`fraction` of all devices, or `count`) — for [fleet], [[adversary]], [[device_profile]],
[[link]] and [[fault]] alike, so each says what is wrong the same way, naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from protocol.config import ConfigError

NUMBER = (int, float)  # a number in a table's schema: TOML's integers and floats alike (never a bool)


def array_of_tables(items: Any, where: str, error: type[ConfigError] = ConfigError) -> list[Any]:
    """`items` as the list a `[[where]]` array gives (each table is checked by its parser)."""
    if not isinstance(items, list):
        raise error(f"{where} must be an array of tables ([[{where}]])")
    return items


def check_table(at: str, table: Any, schema: dict[str, Any], extra: tuple[str, ...] = (),
                error: type[ConfigError] = ConfigError) -> None:
    """`table` is a dict whose keys are in `schema` (or `extra`, not checked) with values of their types."""
    if not isinstance(table, dict):
        raise error(f"{at} must be a table")
    for key, value in table.items():
        if key in extra:
            continue
        if key not in schema:
            raise error(f"unknown key {at}.{key}; known: {', '.join([*schema, *extra])}")
        if isinstance(value, bool) or not isinstance(value, schema[key]):  # TOML true is not 1
            raise error(f"{at}.{key} has the wrong type ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{at}.{key} must be a finite number, got {value}")


def check_share(at: str, table: dict[str, Any], error: type[ConfigError] = ConfigError) -> None:
    """Exactly one of `fraction` (in (0, 1]) and `count` (at least 1)."""
    if ("fraction" in table) == ("count" in table):
        raise error(f"{at}: give either fraction (of all devices) or count, not "
                    f"{'both' if 'fraction' in table else 'neither'}")
    if "fraction" in table and not 0 < table["fraction"] <= 1:
        raise error(f"{at}.fraction must be in (0, 1], got {table['fraction']}")
    if "count" in table and table["count"] < 1:
        raise error(f"{at}.count must be at least 1, got {table['count']}")


def share_size(total: int, fraction: float | None, count: int | None) -> int:
    """How many of `total` devices a share takes: `count`, or `fraction` rounded (at least 1); 0 for neither."""
    if count is not None:
        return count
    return max(1, round(fraction * total)) if fraction else 0
