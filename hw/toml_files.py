"""The TOML files the emulator and its tools write: one writer (tomli-w) for all of them.

    write_toml(home / "gateway.toml", {"gateway": {...}, "rounds": {...}})
    text = toml_text(doc)                 # the same, as a string
    f"name = {toml_value(name)}   # ..."  # one value, for a template laid out by hand with comments

Gateway and agent configs (hw/fleet_configs.py), the load generator's gateway
(hw/loadgen.py), the HIL join kit's agent.toml (hw/hil.py) and the Flower
benchmark's configs (bench/vs_flower.py) go through here, so a value means
what it says: what is written reads back equal (`tomllib.loads(toml_text(doc))
== doc`), whatever its characters (a JSON string is not always a TOML string:
JSON writes an emoji as a surrogate pair, which TOML refuses), and what TOML
cannot hold (None, a tuple, a Path: TypeError; NaN: ValueError) is an error
naming the key, not something else written silently.

Files are replaced atomically (protocol.atomic): a gateway that a fault
restarts reads its old config or its new one, never half of it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import tomli_w

from protocol.atomic import write_atomic

__all__ = ["toml_text", "toml_value", "write_toml"]


def _check(value: Any, where: str) -> None:
    """`value` reads back from TOML as itself; else a TypeError (or ValueError: NaN) naming `where`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            _check(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):  # nan != nan: it would not read back equal
            raise ValueError(f"{where}: {value} is not a finite number")
    elif not isinstance(value, (str, int)):  # bool is an int
        hint = " (a list reads back as a list)" if isinstance(value, tuple) else \
            " (write it as a string)" if isinstance(value, os.PathLike) else ""
        raise TypeError(f"{where}: TOML cannot hold {type(value).__name__} {value!r}{hint}")


def toml_text(doc: dict[str, Any]) -> str:
    """`doc` (tables of values) as a TOML document."""
    _check(doc, "")
    return tomli_w.dumps(doc)


def write_toml(path: str | os.PathLike[str], doc: dict[str, Any], mode: int = 0o644) -> None:
    """Replace `path` with `doc` as TOML, atomically."""
    write_atomic(path, toml_text(doc).encode(), mode)


def toml_value(value: Any) -> str:
    """One value (not a table) as TOML, for the right-hand side of a `key = value` line."""
    if isinstance(value, dict):
        raise TypeError("toml_value writes one value; a table is a document: use toml_text")
    _check(value, "value")
    text = tomli_w.dumps({"v": value})
    if not text.startswith("v = "):  # an array of tables is tables too
        raise TypeError("toml_value writes one value; an array of tables is a document: use toml_text")
    return text.removeprefix("v = ").rstrip("\n")
