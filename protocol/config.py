"""Reading TOML config files with errors that name the field.

Shared by every role's config (agent, gateway, emulator scenarios): a bad
config must be refused at start-up with `section.key` and the reason, never
fall back silently to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

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
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{section}.{key} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value
