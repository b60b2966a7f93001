"""The agent's one config file (TOML), checked field by field at start-up.

    [device]
    name = "kitchen-imu"             # free text, shown on dashboards
    key = "/var/lib/starling/device.key"
    state_dir = "/var/lib/starling"
    voucher = "/etc/starling/voucher.cbor"  # optional: needed where the gateway's policy is "voucher"

    [gateway]
    id = "3fa1c0d2e4b5a6970c1d2e3f4a5b6c7d"  # the gateway's id
    public_key = "<64 hex chars>"    # the gateway's Ed25519 public key: the trust anchor

    [broker]
    host = "127.0.0.1"
    port = 1883
    # tls_ca, tls_cert, tls_key, username (= the device id), password_file: protocol/transport.py

    [data]
    replay = "/var/lib/starling/samples.npz"   # x_train, y_train, x_test, y_test

    [model]
    name = "imu_cnn"                 # a model shipped in firmware_models

A bad config is refused with the field and the reason (`ConfigError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.config import ConfigError, read_toml, setting
from protocol.transport import BrokerAuth, read_broker_auth

__all__ = ["AgentConfig", "ConfigError", "load_config", "parse_config"]


@dataclass(frozen=True)
class AgentConfig:
    name: str
    key: Path
    state_dir: Path
    gateway_id: str
    gateway_public_key: bytes
    broker_host: str
    broker_port: int
    replay: Path
    model: str = "imu_cnn"
    voucher: Path | None = None  # an operator's voucher, for gateways whose policy is "voucher"
    resend_s: float = 10.0
    enroll_retry_s: float = 5.0
    broker_auth: BrokerAuth = field(default_factory=BrokerAuth)  # TLS and credentials for the broker


def parse_config(doc: dict[str, Any], base_dir: Path = Path(".")) -> AgentConfig:
    """Build an `AgentConfig` from a parsed TOML document; paths are relative to `base_dir`."""

    def path(section: str, key: str) -> Path:
        return (base_dir / os.path.expanduser(setting(doc, section, key, str))).resolve()

    gw_id = setting(doc, "gateway", "id", str)
    if len(gw_id) != 32 or any(c not in "0123456789abcdef" for c in gw_id):
        raise ConfigError("gateway.id must be 32 lowercase hex characters")
    try:
        gw_key = bytes.fromhex(setting(doc, "gateway", "public_key", str))
    except ValueError:
        raise ConfigError("gateway.public_key must be hex") from None
    if len(gw_key) != 32:
        raise ConfigError("gateway.public_key must be 32 bytes (64 hex characters)")
    port = setting(doc, "broker", "port", int, 1883)
    if not 0 < port < 65536:
        raise ConfigError(f"broker.port {port} is not a TCP port")
    resend = setting(doc, "device", "resend_s", float, 10.0)
    if resend <= 0:
        raise ConfigError("device.resend_s must be positive")
    return AgentConfig(
        name=setting(doc, "device", "name", str),
        key=path("device", "key"),
        state_dir=path("device", "state_dir"),
        gateway_id=gw_id,
        gateway_public_key=gw_key,
        broker_host=setting(doc, "broker", "host", str, "127.0.0.1"),
        broker_port=port,
        replay=path("data", "replay"),
        model=setting(doc, "model", "name", str, "imu_cnn"),
        voucher=path("device", "voucher") if "voucher" in doc.get("device", {}) else None,
        resend_s=resend,
        enroll_retry_s=setting(doc, "device", "enroll_retry_s", float, 5.0),
        broker_auth=read_broker_auth(doc, base_dir),
    )


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and check the TOML config at `path`."""
    return parse_config(read_toml(path), Path(path).parent)
