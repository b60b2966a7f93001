"""Reading TOML config files with errors that name the field.

Shared by every role's config (agent, gateway, emulator scenarios): a bad
config must be refused at start-up with `section.key` and the reason, never
fall back silently to a default. A misspelt key or table is refused too
(`noting_lookups`, `refuse_unread`): whatever the parser did not read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .fields import is_int

REQUIRED: Any = ...


class ConfigError(ValueError):
    """A config file is unusable; the message names the field and the reason."""


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file, turning I/O and syntax errors into `ConfigError`."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def setting(doc: dict[str, Any], section: str, key: str, kind: type | tuple[type, ...], default: Any = REQUIRED) -> Any:
    """`doc[section][key]`, checked to be of `kind` (an int is accepted for a float)."""
    table = doc.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    if key not in table:
        if default is REQUIRED:
            raise ConfigError(f"{section}.{key} is required")
        return default
    value = table[key]
    if kind is float and is_int(value):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{section}.{key} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf; no setting means them
        raise ConfigError(f"{section}.{key} must be a finite number, got {value}")
    return value


def bounded_setting(doc: dict[str, Any], section: str, key: str, kind: type, default: Any, low: Any,
                    high: Any) -> Any:
    """`setting`, which must also lie in [low, high]: "section.key must be between low and high, got v"."""
    value = setting(doc, section, key, kind, default)
    if not low <= value <= high:
        raise ConfigError(f"{section}.{key} must be between {low} and {high}, got {value}")
    return value


def table(doc: dict[str, Any], section: str) -> dict[str, Any]:
    """`doc[section]`, which must be a table when present."""
    value = doc.get(section, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(value).__name__}")
    return value


def known_keys(doc: dict[str, Any], section: str, known: Any) -> dict[str, Any]:
    """`doc[section]` (a table when present), refused when it has a key not in `known`: a misspelt key
    must not fall back silently to the default."""
    given = table(doc, section)
    _refuse_unknown(section, given, known)
    return given


def _refuse_unknown(section: str, given: Any, known: Any) -> None:
    unknown = sorted(str(key) for key in set(given) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}; known: {', '.join(sorted(known))}")


class _Noted(dict):
    """A config table that notes each key a parser looks up (`in`, `[]`, `.get`)."""

    def __init__(self, items: dict[str, Any]) -> None:
        super().__init__(items)
        self.looked_up: set[str] = set()

    def __contains__(self, key: object) -> bool:
        self.looked_up.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def __getitem__(self, key: str) -> Any:
        self.looked_up.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.looked_up.add(key)
        return super().get(key, default)


def noting_lookups(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` (and each of its tables) noting which keys the parser reading it looks up, for `refuse_unread`.
    A config's known tables and keys are thus the ones its parser reads, not a second list that can drift;
    so a parser looks each key up whatever the other values say (`"voucher" in table` counts)."""
    return _Noted({name: _Noted(value) if isinstance(value, dict) else value for name, value in doc.items()})


def refuse_unread(doc: dict[str, Any]) -> None:
    """After the parser read `doc` (from `noting_lookups`): a table or key it never looked up is unknown, and
    refused naming it and the known ones (a misspelt `num_rounds` must not leave a run unbounded)."""
    if not isinstance(doc, _Noted):
        raise TypeError("refuse_unread takes what noting_lookups returned")
    for name, value in doc.items():
        if name not in doc.looked_up:
            what = f"section [{name}]" if isinstance(value, (dict, list)) else f"key {name} (outside any section)"
            raise ConfigError(f"unknown {what}; known: {', '.join(sorted(doc.looked_up))}")
        if isinstance(value, _Noted):
            _refuse_unknown(name, value, value.looked_up)


def resolve_path(value: str, base_dir: Path, field: str) -> Path:
    """A path setting made absolute (relative to the config file); a NUL or an impossible name is refused."""
    if "\x00" in value:
        raise ConfigError(f"{field} holds a NUL character")
    try:
        return (base_dir / os.path.expanduser(value)).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # too long, a symlink loop ...
        raise ConfigError(f"{field}: {value[:80]!r} is not a usable path ({exc})") from exc


def is_file(path: Path, field: str) -> bool:
    """Whether `path` is a file; a name the OS refuses (too long) is a ConfigError naming the field."""
    try:
        return path.is_file()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: {str(path)[:80]!r} cannot be checked ({exc})") from exc
