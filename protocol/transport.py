"""How a Starling client proves itself to the broker: TLS and MQTT credentials.

Read from the `[broker]` table of a gateway's or an agent's config:

    [broker]
    host = "broker.city.example"
    port = 8883
    tls_ca = "/etc/starling/ca.crt"        # TLS on: verify the broker against this CA
    tls_cert = ""                           # optional client certificate ...
    tls_key = ""                            # ... and its key (both or neither)
    username = "gw-<gateway id>"            # a device's username is its device id
    password_file = "/etc/starling/mqtt.password"   # first line; mode 0600

All empty (the default) means plain MQTT without credentials: tests and the
emulator on loopback. The shipped broker config (hw/mosquitto/) needs TLS and
a username/password. The password lives in its own file, not in the config,
and is refused when others can read it.
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, is_file, resolve_path, setting


@dataclass(frozen=True)
class BrokerAuth:
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str = ""
    password_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def password(self) -> str:
        """The password file's first line; refused when group or others may read the file."""
        if self.password_file is None:
            return ""
        mode = self.password_file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(f"{self.password_file} is readable by others (mode {stat.S_IMODE(mode):o}); "
                                  "chmod 600 it")
        lines = self.password_file.read_text().splitlines()
        return lines[0] if lines else ""

    def apply(self, client: Any) -> None:
        """Configure a paho `Client` (before connect): TLS 1.2+ with hostname checks, credentials."""
        if self.tls:
            client.tls_set(ca_certs=str(self.tls_ca), certfile=str(self.tls_cert) if self.tls_cert else None,
                           keyfile=str(self.tls_key) if self.tls_key else None, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.username:
            client.username_pw_set(self.username, self.password() or None)


def read_broker_auth(doc: dict[str, Any], base_dir: Path = Path("."), section: str = "broker") -> BrokerAuth:
    """The TLS and credential fields of `[broker]` (or of another table holding the same keys, such as an
    agent's `[inference.mqtt]`); every named file must exist. Errors name `section.key`."""

    def path(key: str) -> Path | None:
        value = setting(doc, section, key, str, "")
        if not value:
            return None
        resolved = resolve_path(value, base_dir, f"{section}.{key}")
        if not is_file(resolved, f"{section}.{key}"):
            raise ConfigError(f"{section}.{key}: {resolved} is not a file")
        return resolved

    auth = BrokerAuth(path("tls_ca"), path("tls_cert"), path("tls_key"),
                      setting(doc, section, "username", str, ""), path("password_file"))
    if (auth.tls_cert is None) != (auth.tls_key is None):
        raise ConfigError(f"{section}.tls_cert and {section}.tls_key go together: set both or neither")
    if auth.tls_cert is not None and not auth.tls:
        raise ConfigError(f"{section}.tls_cert needs {section}.tls_ca (the CA that signed the broker's certificate)")
    if auth.password_file is not None and not auth.username:
        raise ConfigError(f"{section}.password_file needs {section}.username")
    if auth.password_file is not None:
        try:
            auth.password()
        except PermissionError as exc:
            raise ConfigError(f"{section}.password_file: {exc}") from exc
    return auth
