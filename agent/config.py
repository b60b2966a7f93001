"""The agent's one config file (TOML), checked field by field at start-up.

    [device]
    name = "kitchen-imu"             # free text, shown on dashboards
    key = "/var/lib/starling/device.key"
    state_dir = "/var/lib/starling"
    voucher = "/etc/starling/voucher.cbor"  # optional: needed where the gateway's policy is "voucher"

    [gateway]
    id = "3fa1c0d2e4b5a6970c1d2e3f4a5b6c7d"  # the gateway's id: the device's first home
    public_key = "<64 hex chars>"    # the gateway's Ed25519 public key: the trust anchor
    root_key = "<64 hex chars>"      # optional: the city's root key; follow key rotations, roam ([city])

    [city]                           # roaming (agent/roaming.py); needs gateway.root_key
    rehome_after_s = 600.0           # re-home once the home gateway is gone this long (0: never re-home)
    prefer = []                      # gateway ids to re-home to first, in order (else spread by device id)
    # genesis = "/etc/starling/genesis.cbor"  # the city's genesis file; else learned from the gateway

    [broker]
    host = "127.0.0.1"
    port = 1883
    # tls_ca, tls_cert, tls_key, username (= the device id), password_file: protocol/transport.py

    [data]                           # either recorded windows ...
    replay = "/var/lib/starling/samples.npz"   # x_train, y_train, x_test, y_test
                                     # ... or, without `replay`, live samples from the [[sensor]]s:
    rate_hz = 50.0                   # rows per second into state_dir/samples.db
    labels = "/var/lib/starling/labels.csv"    # start,end,label intervals (agent/labels.py); a classifier needs it
    stride = 64                      # samples between window starts (default: half a window)
    capacity = 200000                # rows kept (oldest dropped first)
    retention_days = 7.0             # rows older than this are dropped
    test_fraction = 0.2              # the newest windows held out as the device's test windows
    features = ""                    # "window_stats": a model on feature rows (tabular_mlp) learns from each
                                     # window's per-channel mean, std, min, max (agent/features.py); "": none
    feature_window = 50              # with features: rows per window (2 .. 1000), `stride` rows apart

    [model]
    name = "imu_cnn"                 # a model shipped in firmware_models ...
    # path = "/var/lib/starling/model"  # ... or instead a built model's folder (`starling-models build --out DIR`)
    freeze_window_s = 86400.0        # refuse a release (model_frozen) whose expiry is more than this older
                                     # than the newest expiry accepted from the gateway (600 s .. 365 days)

    [budget]                         # see agent/budget.py: time and sample limits, when to skip a round
    max_train_s = 120.0
    max_samples = 2000

    [[sensor]]                       # any number; `starling-agent doctor` reads each once
    kind = "mpu6050"                 # "replay" (path), "mpu6050" or "bme280" (i2c_bus, address)
    i2c_bus = 1
    address = 0x68

    [inference]                      # optional (off when absent): run the model on the newest windows
    every_s = 10.0                   # how often (agent/inference.py)
    windows = 32                     # at most this many new windows per run (32: one call of the graph)
    socket = "/var/lib/starling/inference.sock"  # JSON lines to local clients (default: in state_dir; "": none)
    threshold_quantile = 0.99        # an autoencoder flags scores above this quantile of its recent scores ...
    calibration_windows = 2000       # ... over this many recent windows ...
    min_calibration = 100            # ... once it has scored at least this many

    [inference.mqtt]                 # optional: the same JSON lines to a broker of the integrator's choice
    host = "127.0.0.1"
    port = 1883
    topic = "home/imu/inference"     # default: starling/inference/<device id>
    qos = 0                          # or 1
    # tls_ca, tls_cert, tls_key, username, password_file: as in [broker]

    [personalization]                # optional, with [inference]: fine-tune the classifier's output layer on the
    steps = 50                       # device's own labelled windows for inference, each time a release arrives
    lr = 0.1                         # (agent/personalize.py); kept on the device, never sent
    weights = []                     # the weights it tunes (default: the output layer, found by shape)

A bad config is refused with the field and the reason (`ConfigError`); so is an unknown table or key
(naming it and the known ones: the ones parse_config reads).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.config import (
    ConfigError,
    bounded_setting,
    noting_lookups,
    read_toml,
    refuse_unread,
    resolve_path,
    setting,
    table,
)
from protocol.errors import ProtocolError
from protocol.membership import City
from protocol.transport import BrokerAuth, read_broker_auth

from .budget import DEFAULT_THERMAL_ZONE, Budget

__all__ = ["AgentConfig", "ConfigError", "InferenceSettings", "LocalMqtt", "Personalization", "Sampling", "load_config",
           "parse_config", "parse_personalization"]

DEFAULT_FREEZE_WINDOW_S = 86400.0
DEFAULT_REHOME_AFTER_S = 600.0
REHOME_BOUNDS_S = (1.0, 30 * 86400.0)  # besides 0 (never)
FREEZE_WINDOW_BOUNDS_S = (600.0, 365 * 86400.0)
INFERENCE_EVERY_BOUNDS_S = (0.1, 86400.0)
INFERENCE_WINDOWS_MAX = 256  # per run: 8 calls of the graph's batch of 32, a few ms
CALIBRATION_WINDOWS_BOUNDS = (10, 100_000)  # scores kept: 8 bytes each
QUANTILE_BOUNDS = (0.5, 0.9999)
INFERENCE_SOCKET = "inference.sock"  # in state_dir, unless [inference] socket says otherwise
MAX_SOCKET_PATH = 107  # bytes: sockaddr_un's sun_path holds 108, with the terminating NUL
INFERENCE_MQTT = "inference.mqtt"  # the table, as errors name it
PERSONAL_STEPS_MAX = 10_000  # SGD steps of one batch each: a few seconds on a Raspberry Pi at most
PERSONAL_LR_BOUNDS = (1e-6, 10.0)


@dataclass(frozen=True)
class AgentConfig:
    name: str
    key: Path
    state_dir: Path
    gateway_id: str
    gateway_public_key: bytes
    broker_host: str
    broker_port: int
    replay: Path | None  # recorded windows; None: live samples from `sensors` (see `sampling`)
    # The model ([model], agent/model_source.py): a model shipped in firmware_models by `name`, or a built model's
    # folder (`path`, then also `model` as text, for messages); `model_source(config)` loads either.
    model: str = "imu_cnn"
    model_path: Path | None = None
    voucher: Path | None = None  # an operator's voucher, for gateways whose policy is "voucher"
    resend_s: float = 10.0
    enroll_retry_s: float = 5.0
    broker_auth: BrokerAuth = field(default_factory=BrokerAuth)  # TLS and credentials for the broker
    sensors: tuple[dict[str, Any], ...] = ()  # [[sensor]] tables, checked: kind plus its driver's options
    budget: Budget = field(default_factory=Budget)  # how much a round may take; when to sit one out
    sampling: Sampling = field(default_factory=lambda: Sampling())  # live sampling, when there is no replay
    # A release whose expiry is more than this older than the newest expiry accepted from the gateway is
    # refused (model_frozen): it was signed that much before a release the device already knows.
    freeze_window_s: float = DEFAULT_FREEZE_WINDOW_S
    # The city's root key (`[gateway] root_key`): with it the device follows the gateway's key rotations
    # (protocol/rotation.py); without it only `gateway_public_key` ever signs for the gateway.
    gateway_root_key: bytes | None = None
    # Roaming ([city], agent/roaming.py), with the root key only: re-home to another member gateway once the home
    # one is gone this long (0: never); `prefer` these gateway ids first; `city_genesis` the city's genesis vertex
    # (checked against the root key here), or None: learned from the gateway's retained membership document.
    rehome_after_s: float = DEFAULT_REHOME_AFTER_S
    prefer: tuple[str, ...] = ()
    city_genesis: bytes | None = None
    # Inference on the device ([inference], agent/inference.py); None: off, the table is absent.
    inference: InferenceSettings | None = None
    # Personalization of the model inference runs ([personalization], agent/personalize.py); None: off.
    personalization: Personalization | None = None

    @property
    def roams(self) -> bool:
        """Whether this device re-homes when its gateway is gone: it knows the city's root key and may."""
        return self.gateway_root_key is not None and self.rehome_after_s > 0


@dataclass(frozen=True)
class Sampling:
    """How live samples become a round's data ([data] without `replay`)."""

    rate_hz: float = 50.0
    labels: Path | None = None
    stride: int = 0  # 0: half a window
    capacity: int = 200_000
    retention_s: float = 7 * 86400.0
    test_fraction: float = 0.2
    features: str = ""  # "": the model takes raw windows (or readings); "window_stats": rows (agent/features.py)
    feature_window: int = 50  # rows of samples per feature row


@dataclass(frozen=True)
class LocalMqtt:
    """Where inference results go besides the socket ([inference.mqtt]): a broker the integrator chose, which
    need not be the gateway's. Only what is configured here leaves the device."""

    host: str
    port: int = 1883
    topic: str = ""  # "": starling/inference/<device id>
    qos: int = 0  # results are a stream: a lost one is replaced by the next run's
    auth: BrokerAuth = field(default_factory=BrokerAuth)


@dataclass(frozen=True)
class InferenceSettings:
    """How the device uses its model ([inference]; agent/inference.py)."""

    every_s: float = 10.0
    windows: int = 32
    socket: Path | None = None  # None: no socket (`socket = ""`)
    threshold_quantile: float = 0.99
    calibration_windows: int = 2000
    min_calibration: int = 100
    mqtt: LocalMqtt | None = None


@dataclass(frozen=True)
class Personalization:
    """How the device tailors the model it runs to its own data ([personalization]; agent/personalize.py)."""

    steps: int = 50  # SGD steps, one batch of the device's labelled training windows each
    lr: float = 0.1
    weights: tuple[str, ...] = ()  # the weights tuned; (): the classifier's output layer


def parse_config(doc: dict[str, Any], base_dir: Path = Path(".")) -> AgentConfig:
    """Build an `AgentConfig` from a parsed TOML document; paths are relative to `base_dir`."""
    doc = noting_lookups(doc)  # what this function reads is what an agent config may hold

    def path(section: str, key: str) -> Path:
        return resolve_path(setting(doc, section, key, str), base_dir, f"{section}.{key}")

    gw_id = setting(doc, "gateway", "id", str)
    if not _is_gateway_id(gw_id):
        raise ConfigError("gateway.id must be 32 lowercase hex characters")
    gw_key = _public_key(setting(doc, "gateway", "public_key", str), "gateway.public_key")
    root_key = table(doc, "gateway").get("root_key")
    root_key = None if root_key is None else _public_key(setting(doc, "gateway", "root_key", str), "gateway.root_key")
    port = setting(doc, "broker", "port", int, 1883)
    if not 0 < port < 65536:
        raise ConfigError(f"broker.port {port} is not a TCP port")
    sensors = _sensors(doc.get("sensor", []), base_dir)
    replay = "replay" in table(doc, "data")
    if not replay and not sensors:
        raise ConfigError("data.replay is required when there is no [[sensor]]: the agent needs recorded "
                          "windows or live sensors")
    resend = setting(doc, "device", "resend_s", float, 10.0)
    if resend <= 0:
        raise ConfigError("device.resend_s must be positive")
    freeze_window = setting(doc, "model", "freeze_window_s", float, DEFAULT_FREEZE_WINDOW_S)
    low, high = FREEZE_WINDOW_BOUNDS_S
    if not low <= freeze_window <= high:
        raise ConfigError(f"model.freeze_window_s must be between {low:.0f} and {high:.0f} seconds, got {freeze_window}")
    state_dir = path("device", "state_dir")
    if "personalization" in doc and "inference" not in doc:
        raise ConfigError("[personalization] needs [inference]: the personalized model is the one inference runs")
    config = AgentConfig(
        name=setting(doc, "device", "name", str),
        key=path("device", "key"),
        state_dir=state_dir,
        gateway_id=gw_id,
        gateway_public_key=gw_key,
        broker_host=setting(doc, "broker", "host", str, "127.0.0.1"),
        broker_port=port,
        replay=path("data", "replay") if replay else None,
        **_model(doc, base_dir),
        voucher=path("device", "voucher") if "voucher" in table(doc, "device") else None,
        resend_s=resend,
        enroll_retry_s=setting(doc, "device", "enroll_retry_s", float, 5.0),
        broker_auth=read_broker_auth(doc, base_dir),
        sensors=sensors,
        budget=_budget(doc, base_dir),
        sampling=_sampling(doc, base_dir),
        freeze_window_s=freeze_window,
        gateway_root_key=root_key,
        **_city(doc, base_dir, root_key),
        inference=_inference(doc, base_dir, state_dir),
        personalization=parse_personalization(doc),
    )
    refuse_unread(doc)
    return config


def _model(doc: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """[model] name or path (not both): a packaged model, or a built model's folder, checked now (a folder that is
    no built model stops the agent at start, not at its first round)."""
    from .model_source import ModelError, read_folder

    name = setting(doc, "model", "name", str, "imu_cnn")
    folder = setting(doc, "model", "path", str, "")
    given = table(doc, "model")
    if "name" in given and "path" in given:
        raise ConfigError("model.name and model.path are both set: give one (name: a model shipped in "
                          "firmware_models; path: a built model's folder)")
    if "path" not in given:
        if not name:
            raise ConfigError("model.name must not be empty")
        return {"model": name}
    if not folder:
        raise ConfigError("model.path must not be empty")
    path = resolve_path(folder, base_dir, "model.path")
    try:
        read_folder(path)
    except ModelError as exc:
        raise ConfigError(f"model.path: {exc}") from exc
    return {"model": str(path), "model_path": path}


def _is_gateway_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _city(doc: dict[str, Any], base_dir: Path, root_key: bytes | None) -> dict[str, Any]:
    """The [city] table: roaming needs the root key; a genesis file must be the root's genesis (checked now, so
    a wrong file stops the agent at start instead of leaving it unable to roam when its gateway is gone)."""
    rehome = setting(doc, "city", "rehome_after_s", float, DEFAULT_REHOME_AFTER_S)
    low, high = REHOME_BOUNDS_S
    if rehome != 0 and not low <= rehome <= high:
        raise ConfigError(f"city.rehome_after_s must be 0 (never) or between {low:.0f} and {high:.0f} seconds, "
                          f"got {rehome}")
    prefer = setting(doc, "city", "prefer", list, [])
    if not all(isinstance(g, str) and _is_gateway_id(g) for g in prefer):
        raise ConfigError("city.prefer must be a list of gateway ids (32 lowercase hex characters)")
    genesis_path = setting(doc, "city", "genesis", str, "")
    if root_key is None and any(key in table(doc, "city") for key in ("rehome_after_s", "prefer", "genesis")):
        raise ConfigError("[city] needs gateway.root_key: the device checks the city's members with it")
    genesis = None
    if genesis_path:
        path = resolve_path(genesis_path, base_dir, "city.genesis")
        try:
            genesis = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"city.genesis: cannot read {path}: {exc.strerror}") from exc
        try:
            City.from_genesis(genesis, root_key)
        except ProtocolError as exc:
            raise ConfigError(f"city.genesis: {path} is not a genesis the root key signed ({exc})") from exc
    return {"rehome_after_s": rehome, "prefer": tuple(prefer), "city_genesis": genesis}


def _inference(doc: dict[str, Any], base_dir: Path, state_dir: Path) -> InferenceSettings | None:
    """The [inference] table (None when absent: inference is off) and its optional [inference.mqtt]."""
    if "inference" not in doc:
        return None

    def bounded(key: str, kind: type, default: Any, low: Any, high: Any) -> Any:
        return bounded_setting(doc, "inference", key, kind, default, low, high)

    every = bounded("every_s", float, 10.0, *INFERENCE_EVERY_BOUNDS_S)
    windows = bounded("windows", int, 32, 1, INFERENCE_WINDOWS_MAX)
    quantile = bounded("threshold_quantile", float, 0.99, *QUANTILE_BOUNDS)
    kept = bounded("calibration_windows", int, 2000, *CALIBRATION_WINDOWS_BOUNDS)
    least = bounded("min_calibration", int, min(100, kept), 1, kept)
    socket = setting(doc, "inference", "socket", str, str(state_dir / INFERENCE_SOCKET))
    socket_path = resolve_path(socket, base_dir, "inference.socket") if socket else None
    if socket_path is not None and len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"inference.socket: {socket_path} is {len(os.fsencode(socket_path))} bytes long; a Unix "
                          f"socket's path takes at most {MAX_SOCKET_PATH} (choose a shorter one)")
    mqtt = table(doc, "inference").get("mqtt")
    return InferenceSettings(every, windows, socket_path, quantile, kept, least,
                             None if mqtt is None else _local_mqtt(mqtt, base_dir))


def parse_personalization(doc: dict[str, Any]) -> Personalization | None:
    """The [personalization] table (None when absent); also the emulator's (hw/scenario.py)."""
    if "personalization" not in doc:
        return None
    steps = bounded_setting(doc, "personalization", "steps", int, Personalization.steps, 1, PERSONAL_STEPS_MAX)
    lr = bounded_setting(doc, "personalization", "lr", float, Personalization.lr, *PERSONAL_LR_BOUNDS)
    weights = setting(doc, "personalization", "weights", list, [])
    if not all(isinstance(name, str) and name for name in weights) or len(set(weights)) != len(weights):
        raise ConfigError("personalization.weights must be a list of distinct weight names (the model's manifest "
                          "lists them)")
    return Personalization(steps, lr, tuple(weights))


def _local_mqtt(given: Any, base_dir: Path) -> LocalMqtt:
    """[inference.mqtt], checked like a top-level table: errors and unknown keys say `inference.mqtt.<key>`."""
    if not isinstance(given, dict):
        raise ConfigError(f"[{INFERENCE_MQTT}] must be a table, got {type(given).__name__}")
    doc = noting_lookups({INFERENCE_MQTT: given})
    port = setting(doc, INFERENCE_MQTT, "port", int, 1883)
    if not 0 < port < 65536:
        raise ConfigError(f"{INFERENCE_MQTT}.port {port} is not a TCP port")
    topic = setting(doc, INFERENCE_MQTT, "topic", str, "")
    if any(c in topic for c in "+#\x00") or topic.startswith("$") or len(topic.encode()) > 1024:
        raise ConfigError(f"{INFERENCE_MQTT}.topic must be a plain MQTT topic (no +, #, NUL, no leading $), "
                          f"got {topic[:80]!r}")
    qos = setting(doc, INFERENCE_MQTT, "qos", int, 0)
    if qos not in (0, 1):
        raise ConfigError(f"{INFERENCE_MQTT}.qos must be 0 or 1, got {qos}")
    host = setting(doc, INFERENCE_MQTT, "host", str)
    if not host:
        raise ConfigError(f"{INFERENCE_MQTT}.host must not be empty")
    local = LocalMqtt(host, port, topic, qos, read_broker_auth(doc, base_dir, INFERENCE_MQTT))
    refuse_unread(doc)
    return local


def _public_key(text: str, field: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{field} must be hex") from None
    if len(key) != 32:
        raise ConfigError(f"{field} must be 32 bytes (64 hex characters)")
    return key


FEATURE_KINDS = ("window_stats",)  # agent/features.py KINDS (not imported: config parsing stays numpy-free)
FEATURE_WINDOW_BOUNDS = (2, 1000)  # agent/features.py: 2 .. MAX_WINDOW rows


def _sampling(doc: dict[str, Any], base_dir: Path) -> Sampling:
    def positive(key: str, kind: type, default: float) -> Any:
        value = setting(doc, "data", key, kind, default)
        if not value > 0:
            raise ConfigError(f"data.{key} must be positive, got {value}")
        return value

    labels = setting(doc, "data", "labels", str, "")
    test_fraction = setting(doc, "data", "test_fraction", float, 0.2)
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be at least 0 and below 1, got {test_fraction}")
    stride = setting(doc, "data", "stride", int, 0)
    if stride < 0:
        raise ConfigError(f"data.stride must not be negative, got {stride}")
    features = setting(doc, "data", "features", str, "")
    if features and features not in FEATURE_KINDS:
        raise ConfigError(f"data.features must be one of {', '.join(FEATURE_KINDS)} (or \"\": none), got {features!r}")
    if features and "replay" in table(doc, "data"):
        raise ConfigError("data.features is for live samples: a replay file holds the model's inputs already")
    feature_window = setting(doc, "data", "feature_window", int, Sampling.feature_window)
    low, high = FEATURE_WINDOW_BOUNDS
    if not low <= feature_window <= high:
        raise ConfigError(f"data.feature_window must be between {low} and {high} rows, got {feature_window}")
    return Sampling(
        rate_hz=positive("rate_hz", float, 50.0),
        labels=resolve_path(labels, base_dir, "data.labels") if labels else None,
        stride=stride,
        capacity=positive("capacity", int, 200_000),
        retention_s=positive("retention_days", float, 7.0) * 86400.0,
        test_fraction=test_fraction,
        features=features,
        feature_window=feature_window,
    )


def _budget(doc: dict[str, Any], base_dir: Path) -> Budget:
    def number(key: str, default: float) -> float:
        value = setting(doc, "budget", key, float, default)
        if value < 0:
            raise ConfigError(f"budget.{key} must not be negative, got {value}")
        return value

    def file(key: str, default: Path | None) -> Path | None:
        value = setting(doc, "budget", key, str, "" if default is None else str(default))
        return resolve_path(value, base_dir, f"budget.{key}") if value else None

    return Budget(
        max_train_s=number("max_train_s", 0.0),
        max_samples=int(number("max_samples", 0)),
        max_cpu_temp_c=number("max_cpu_temp_c", 80.0),
        thermal_zone=file("thermal_zone", DEFAULT_THERMAL_ZONE),
        low_power_file=file("low_power_file", None),
    )


SENSOR_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "replay": {"path": str, "rate_hz": (int, float), "loop": bool, "name": str},
    "mpu6050": {"i2c_bus": int, "address": int, "rate_hz": (int, float), "accel_range_g": int, "gyro_range_dps": int},
    "bme280": {"i2c_bus": int, "address": int, "rate_hz": (int, float)},
}


def _sensors(tables: Any, base_dir: Path) -> tuple[dict[str, Any], ...]:
    """The [[sensor]] tables: a known kind and only that driver's options, of the right types."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("sensor must be an array of tables ([[sensor]])")
    out = []
    for i, entry in enumerate(tables):
        kind = entry.get("kind")
        if not isinstance(kind, str) or kind not in SENSOR_OPTIONS:
            raise ConfigError(f"sensor[{i}].kind must be one of {sorted(SENSOR_OPTIONS)}, got {kind!r}")
        options = {k: v for k, v in entry.items() if k != "kind"}
        for key, value in options.items():
            expected = SENSOR_OPTIONS[kind].get(key)
            if expected is None:
                raise ConfigError(f"sensor[{i}].{key}: a {kind} sensor takes {sorted(SENSOR_OPTIONS[kind])}")
            if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
                raise ConfigError(f"sensor[{i}].{key} has the wrong type ({type(value).__name__})")
        if kind == "replay":
            if "path" not in options:
                raise ConfigError(f"sensor[{i}].path is required for a replay sensor")
            options["path"] = str(resolve_path(options["path"], base_dir, f"sensor[{i}].path"))
        if "address" in options and not 0x03 <= options["address"] <= 0x77:
            raise ConfigError(f"sensor[{i}].address {options['address']:#x} is not a 7-bit I2C address")
        out.append({"kind": kind, **options})
    return tuple(out)


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and check the TOML config at `path`."""
    return parse_config(read_toml(path), Path(path).parent)
