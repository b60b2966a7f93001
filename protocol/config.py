"""Reading TOML config files with errors that name the field.

Shared by every role's config (agent, gateway, emulator scenarios): a bad
config must be refused at start-up with `section.key` and the reason, never
fall back silently to a default.
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


def table(doc: dict[str, Any], section: str) -> dict[str, Any]:
    """`doc[section]`, which must be a table when present."""
    value = doc.get(section, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(value).__name__}")
    return value


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
