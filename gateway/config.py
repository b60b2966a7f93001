"""The gateway's config file (TOML), checked at start-up, before any round runs.

    [gateway]
    name = "gw-harbour"
    key = "gateway.key"                  # Ed25519 key, mode 0600
    rotations = ""                       # after a key rotation: the chain file `starling-ledger rotate`
                                         # wrote ("" = never rotated); the gateway keeps its first id
    state_dir = "state"                  # ledger.db, result.json

    [broker]
    host = "127.0.0.1"
    port = 1883
    # tls_ca, tls_cert, tls_key, username, password_file: see protocol/transport.py

    [ledger]
    genesis = "genesis.cbor"              # the city's genesis vertex (starling-ledger init); "" = this
                                          # gateway roots a ledger of its own (and has no [city])
    gossip = true                         # share the ledger with the other gateways over MQTT
    bootstrap_s = 5.0                     # a new gateway waits this long for a peer's checkpoint
    checkpoint_every = 1000               # write a checkpoint after this many new vertices (0: never)

    [ingest]
    workers = 0                           # >= 1: that many processes share the reply topic (MQTT 5 shared
                                          # subscription) and check signatures in parallel; 0: in-process

    [model]
    manifest = ""                         # default: the shipped imu_cnn manifest
    release_ttl_s = 604800.0              # a model release expires after this (devices refuse it then)
    mcu_python = ""                       # a Python with TensorFlow: also publish each release as an int8
                                          # TFLite Micro model (gateway/mcu.py); "" = no MCU exports

    [strategy]
    name = "FedAvg"                       # a class in flwr.serverapp.strategy, or module:Class
    params = { min_available_nodes = 5 }  # its constructor arguments
    # [strategy.dp] wrapper = "...", params = {...}: a Flower DP wrapper (see strategies.py); with
    #   noise_multiplier > 0 its privacy cost is accounted: target_delta = 1e-5, population_size,
    #   max_epsilon, accounting = true (gateway/privacy.py); that needs weights = "uniform" below

    [rounds]
    # num_rounds = 100                    # the lineage's last round; absent: rounds go on until stopped
    interval_s = 0.0                      # between round starts (0: one after another)
    evaluate_every = 1                    # federated evaluation after every n-th round (and the last)
    deadline_s = 60.0                     # an exchange closes when all replied or this passed
    epochs = 2
    batch_size = 32
    lr = 0.05
    min_devices = 5                       # a round waits for this many enrolled, online devices ...
    wait_devices_s = 120.0                # ... this long at a time: then a bounded run (num_rounds) fails,
                                          # a service says so in its log and waits on
    mode = "sync"                         # "sync": a round is one exchange, closed when all replied; "buffered":
                                          # FedBuff (gateway/buffered.py): every device trains all the time and
                                          # a step (a "round") aggregates every `buffer` arrived updates
    # buffer = 3                          # buffered only: K, the updates a step aggregates
    # max_staleness = 4                   # buffered only: an update trained more steps behind is refused
    # staleness_exponent = 0.5            # buffered only: an update s steps behind weighs (1 + s) ** -exponent
                                          # (0.5: FedBuff's 1/sqrt(1 + s); 0: staleness does not count)
                                          # with FedAvg, FedProx, FedMedian or FedTrimmedAvg, without DP

    [training]                            # how devices send their updates (the task's codec)
    codec = "i8"                          # "i8" (int8, a per-tensor scale), "f16", "f32", or "topk": per
                                          # tensor, only the density share of largest entries (int8 values,
                                          # their indices), with error feedback on the device (what is not
                                          # sent is added to its next round's delta: agent/error_feedback.py)
    density = 0.1                         # topk: the share of each tensor's entries sent, in (0, 1]
                                          # (the other codecs send every entry and ignore it)
    download = "i8"                       # how each new model reaches devices holding the one before it: a
                                          # signed delta, "i8" (int8, a per-tensor scale) or "f16"; the
                                          # release is base + that delta, exactly what devices rebuild;
                                          # "full": the float32 model only (always there as the fallback)

    [aggregation]
    weights = "capped"                    # what a reply weighs: "capped" (min(claim, cap)), "uniform", or
                                          # "reported" (the device's own claim: trusted devices only)
    max_examples = 100000                 # "capped": at most this many examples ...
    median_multiple = 1.0                 # ... and at most this many times the exchange's median claim

    [defense]                             # optional: every update bounded before the strategy sees it
    median_multiple = 2.0                 # no update longer than this many times the round's median (0: none)
    norm_bound = 0.0                      # nor than this L2 norm (0: none)
    centered_clipping = false             # clip around the previous round's direction (gateway/defense.py)

    [blobs]                               # every update and model the ledger names, kept by digest in
                                          # state_dir/blobs and served to member gateways and auditors
    keep = 4                              # tags kept: a tag is a model version (a release and the updates
                                          # trained on it, so about one round); with the city tier, city
                                          # epochs (every + 2 versions each). At least 1: the head is kept
    max_mb = 0.0                          # and of those only the newest that fit in this many MB (0: no cap)
    serve = true                          # answer wants on starling/blobs/want/<gateway id>
    serve_mb_per_s = 64.0                 # serving budget: a want beyond it is answered "busy"
    fetch_timeout_s = 30.0                # a fetch from other gateways, every holder tried, gives up after this

    [city]                                # optional: the city tier (gateway/city.py); needs [ledger] genesis
    every = 3                             # rounds per city epoch: the members merge their models
    rule = "weighted"                     # "weighted" (by the examples the ledger records) or "median"
    deadline_s = 60.0                     # after its own offer, how long a gateway waits for the others'
    audit_share = 1.0                     # share of the peers' round aggregates recomputed (city_audit.py);
                                          # absent: 2 / (members - 1), i.e. all of them up to 3 gateways
    max_examples = 100000                 # an update counts at most this many examples in an offer's weight
    momentum = 0.0                        # slow momentum: each merge adds momentum x (the last city model -
                                          # the one before); 0.5-0.7 helps gateways whose neighbourhoods differ

    [enrollment]
    policy = "voucher"                    # required: "voucher", "allowlist", or "open" (emulator only)
    operator_keys = ["<64 hex>"]          # "voucher": operator public keys whose vouchers admit devices
    allowlist = []                        # "allowlist": device public keys (hex)

An unknown table or key, in any table, is refused (naming it and the known ones: the ones parse_config
reads), as is a value of the wrong type (a bool for a number, an int or a string for true/false) or not
finite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.config import (
    ConfigError,
    is_file,
    known_keys,
    noting_lookups,
    read_toml,
    refuse_unread,
    resolve_path,
    setting,
)
from protocol.schemas import CODEC, DEFAULT_DOWNLOAD, DENSITY, DOWNLOAD, DOWNLOADS, MAX_EXAMPLES
from protocol.tensors import DEFAULT_DENSITY, UPLOAD_CODECS, check_density
from protocol.transport import BrokerAuth, read_broker_auth

from .blob_keeper import BlobSettings
from .buffered import MAX_BUFFER, MAX_STALENESS, MODES, BufferSettings, check_strategy
from .city import CitySettings
from .city_merge import RULES as CITY_RULES
from .strategies import make_strategy
from .weights import RULES, WeightRule

POLICIES = ("voucher", "allowlist", "open")
MAX_INGEST_WORKERS = 64
MAX_BLOB_TAGS = 1_000_000  # blobs.keep
MAX_BLOB_MB = 1e9  # blobs.max_mb (a petabyte: "no cap" is 0)
MAX_FETCH_TIMEOUT_S = 86400.0  # blobs.fetch_timeout_s, city.deadline_s
MAX_CITY_EVERY = 1_000_000  # city.every
MAX_STALENESS_EXPONENT = 10.0  # rounds.staleness_exponent (at 10 an update one step behind weighs 1/1024)


@dataclass(frozen=True)
class GatewayConfig:
    name: str
    key: Path
    state_dir: Path
    rotations: Path | None = None  # the key rotation chain file (protocol/rotation.py); None: never rotated
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_auth: BrokerAuth = field(default_factory=BrokerAuth)
    ingest_workers: int = 0  # processes sharing the reply topic; 0 = the gateway checks replies itself
    genesis: Path | None = None  # the city's genesis vertex file; None: the gateway roots its own ledger
    gossip: bool = True  # gossip the ledger with other gateways (starling/ledger/#)
    bootstrap_s: float = 5.0  # a new gateway waits this long for a peer's final checkpoint before replaying
    checkpoint_every: int = 1000  # vertices after the newest checkpoint that make this gateway write one
    manifest: Path | None = None
    release_ttl_s: float = 7 * 86400.0  # devices refuse a model release older than this
    mcu_python: Path | None = None  # a Python with TensorFlow for MCU exports of each release (gateway/mcu.py)
    strategy: str = "FedAvg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    strategy_dp: dict[str, Any] | None = None
    defense: dict[str, Any] | None = None  # [defense]: gateway/defense.py's UpdateBound parameters
    num_rounds: int | None = None  # the lineage's last round; None: rounds go on until the gateway is stopped
    interval_s: float = 0.0  # between round starts
    evaluate_every: int = 1  # federated evaluation after every n-th round (and round 0 and the last)
    deadline_s: float = 60.0
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    min_devices: int = 2
    wait_devices_s: float = 120.0
    codec: str = "i8"  # [training] codec: how devices encode their updates (protocol/tensors.py UPLOAD_CODECS)
    density: float = DEFAULT_DENSITY  # [training] density: topk's share of each tensor's entries
    download: str = DEFAULT_DOWNLOAD  # [training] download: "i8"/"f16" deltas beside each release, or "full"
    weights: WeightRule = field(default_factory=WeightRule)  # [aggregation]: what a reply weighs
    blobs: BlobSettings = field(default_factory=BlobSettings)  # [blobs]: updates and models kept by digest
    city: CitySettings | None = None  # [city]: the city tier; None: this gateway merges with nobody
    buffered: BufferSettings | None = None  # [rounds] mode = "buffered": its settings; None: synchronous rounds
    policy: str = "open"
    allowlist: tuple[bytes, ...] = ()
    operator_keys: tuple[bytes, ...] = ()  # who may sign vouchers

    def make_strategy(self, selection_recorder=None, population=None):
        """Instantiate the configured Flower strategy; a bad name or parameter is a ConfigError.
        `population()`: the devices enrolled now (what the privacy accountant reports as its population)."""
        strategy = make_strategy(self.strategy, self.strategy_params, self.strategy_dp, selection_recorder,
                                 self.defense, population)
        if self.strategy_dp:
            from .privacy import check_gateway

            check_gateway(self.strategy_dp, self.weights.rule, self.min_devices)
        return strategy


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _optional_positive(name: str, value: int | None) -> int | None:
    return None if value is None else int(_positive(name, value))


def _non_negative(name: str, value: float) -> float:
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def _keys(items: list, field: str) -> list[bytes]:
    keys = []
    for item in items:
        try:
            key = bytes.fromhex(item)
        except (ValueError, TypeError):
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{field}: {item!r} is not a 64-hex-character public key")
        keys.append(key)
    return keys


def parse_config(doc: dict[str, Any], base_dir: Path = Path(".")) -> GatewayConfig:
    doc = noting_lookups(doc)  # what this function reads is what a gateway config may hold

    def path(section: str, key: str, default: Any = ...) -> Path | None:
        value = setting(doc, section, key, str, default)
        return None if value in (None, "") else resolve_path(value, base_dir, f"{section}.{key}")

    policy = setting(doc, "enrollment", "policy", str)  # no default: "open" must be a deliberate choice
    if policy not in POLICIES:
        raise ConfigError(f"enrollment.policy must be one of {POLICIES}, got {policy!r}")
    allowlist = _keys(setting(doc, "enrollment", "allowlist", list, []), "enrollment.allowlist")
    operator_keys = _keys(setting(doc, "enrollment", "operator_keys", list, []), "enrollment.operator_keys")
    if policy == "voucher" and not operator_keys:
        raise ConfigError("enrollment.operator_keys: the voucher policy needs at least one operator key")
    port = setting(doc, "broker", "port", int, 1883)
    if not 0 < port < 65536:
        raise ConfigError(f"broker.port {port} is not a TCP port")
    workers = setting(doc, "ingest", "workers", int, 0)
    if not 0 <= workers <= MAX_INGEST_WORKERS:
        raise ConfigError(f"ingest.workers must be 0 to {MAX_INGEST_WORKERS}, got {workers}")
    config = GatewayConfig(
        name=setting(doc, "gateway", "name", str),
        key=path("gateway", "key"),
        rotations=path("gateway", "rotations", None),
        state_dir=path("gateway", "state_dir"),
        broker_host=setting(doc, "broker", "host", str, "127.0.0.1"),
        broker_port=port,
        broker_auth=read_broker_auth(doc, base_dir),
        ingest_workers=workers,
        genesis=path("ledger", "genesis", ""),
        gossip=setting(doc, "ledger", "gossip", bool, True),
        bootstrap_s=_non_negative("ledger.bootstrap_s", setting(doc, "ledger", "bootstrap_s", float, 5.0)),
        checkpoint_every=int(_non_negative("ledger.checkpoint_every",
                                           setting(doc, "ledger", "checkpoint_every", int, 1000))),
        manifest=path("model", "manifest", ""),
        mcu_python=_mcu_python(path("model", "mcu_python", "")),
        release_ttl_s=_positive("model.release_ttl_s", setting(doc, "model", "release_ttl_s", float, 7 * 86400.0)),
        strategy=setting(doc, "strategy", "name", str, "FedAvg"),
        strategy_params=dict(setting(doc, "strategy", "params", dict, {})),
        strategy_dp=setting(doc, "strategy", "dp", dict, None),
        defense=_defense(doc),
        num_rounds=_optional_positive("rounds.num_rounds", setting(doc, "rounds", "num_rounds", int, None)),
        interval_s=_non_negative("rounds.interval_s", setting(doc, "rounds", "interval_s", float, 0.0)),
        evaluate_every=int(_positive("rounds.evaluate_every", setting(doc, "rounds", "evaluate_every", int, 1))),
        deadline_s=_positive("rounds.deadline_s", setting(doc, "rounds", "deadline_s", float, 60.0)),
        epochs=int(_positive("rounds.epochs", setting(doc, "rounds", "epochs", int, 1))),
        batch_size=int(_positive("rounds.batch_size", setting(doc, "rounds", "batch_size", int, 32))),
        lr=_positive("rounds.lr", setting(doc, "rounds", "lr", float, 0.05)),
        min_devices=int(_positive("rounds.min_devices", setting(doc, "rounds", "min_devices", int, 2))),
        wait_devices_s=_positive("rounds.wait_devices_s", setting(doc, "rounds", "wait_devices_s", float, 120.0)),
        buffered=_buffered(doc),
        codec=_codec(doc),
        density=_density(doc),
        download=_download(doc),
        weights=_weight_rule(doc),
        blobs=_blobs(doc),
        city=_city(doc),
        policy=policy,
        allowlist=tuple(allowlist),
        operator_keys=tuple(operator_keys),
    )
    refuse_unread(doc)
    if config.genesis is not None and not is_file(config.genesis, "ledger.genesis"):
        raise ConfigError(f"ledger.genesis: {config.genesis} is not a file")
    if config.city is not None and config.genesis is None:
        raise ConfigError("city: the city tier needs the city's ledger ([ledger] genesis)")
    if config.city is not None and not config.blobs.serve:
        raise ConfigError("city: the city tier needs [blobs] serve = true (members fetch each other's models)")
    strategy = config.make_strategy()  # fail now, not mid-run
    if config.buffered is not None and (why := check_strategy(strategy, config.strategy_dp)) is not None:
        raise ConfigError(f'rounds.mode = "buffered" does not work with strategy {config.strategy!r}: {why}')
    return config


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    return parse_config(read_toml(path), Path(path).parent)


TRAINING = "training"  # the table; its keys are the task's (protocol/schemas.py CODEC, DENSITY) and DOWNLOAD


def _codec(doc: dict[str, Any]) -> str:
    codec = setting(doc, TRAINING, CODEC, str, "i8")
    if codec not in UPLOAD_CODECS:
        raise ConfigError(f"{TRAINING}.{CODEC} must be one of {UPLOAD_CODECS}, got {codec!r}")
    return codec


def _download(doc: dict[str, Any]) -> str:
    download = setting(doc, TRAINING, DOWNLOAD, str, DEFAULT_DOWNLOAD)
    if download not in DOWNLOADS:
        raise ConfigError(f"{TRAINING}.{DOWNLOAD} must be one of {DOWNLOADS}, got {download!r}")
    return download


def _density(doc: dict[str, Any]) -> float:
    density = setting(doc, TRAINING, DENSITY, float, DEFAULT_DENSITY)
    try:
        density = check_density(density)
    except ValueError as exc:
        raise ConfigError(f"{TRAINING}.{DENSITY}: {exc}") from None
    return density


def _buffered(doc: dict[str, Any]) -> BufferSettings | None:
    """[rounds] mode and the buffered mode's keys (None: synchronous rounds; the keys are refused there)."""
    mode = setting(doc, "rounds", "mode", str, "sync")
    if mode not in MODES:
        raise ConfigError(f"rounds.mode must be one of {MODES}, got {mode!r}")
    given = [k for k in ("buffer", "max_staleness", "staleness_exponent") if k in doc.get("rounds", {})]
    buffer = setting(doc, "rounds", "buffer", int, BufferSettings.buffer)  # (read in either mode: known keys)
    staleness = setting(doc, "rounds", "max_staleness", int, BufferSettings.max_staleness)
    exponent = setting(doc, "rounds", "staleness_exponent", float, BufferSettings.staleness_exponent)
    if mode == "sync":
        if given:
            raise ConfigError(f'rounds.{given[0]} is a setting of rounds.mode = "buffered" (the mode is "sync")')
        return None
    if not 1 <= buffer <= MAX_BUFFER:
        raise ConfigError(f"rounds.buffer must be 1 to {MAX_BUFFER} (updates per buffered step), got {buffer}")
    if not 0 <= staleness <= MAX_STALENESS:
        raise ConfigError(f"rounds.max_staleness must be 0 to {MAX_STALENESS} (steps behind the head), got {staleness}")
    if not 0.0 <= exponent <= MAX_STALENESS_EXPONENT:
        raise ConfigError(f"rounds.staleness_exponent must be 0 to {MAX_STALENESS_EXPONENT} (a stale update weighs "
                          f"(1 + staleness) ** -exponent), got {exponent}")
    return BufferSettings(buffer, staleness, exponent)


def _weight_rule(doc: dict[str, Any]) -> WeightRule:
    rule = setting(doc, "aggregation", "weights", str, "capped")
    if rule not in RULES:
        raise ConfigError(f"aggregation.weights must be one of {RULES}, got {rule!r}")
    max_examples = setting(doc, "aggregation", "max_examples", int, 100_000)
    if max_examples < 1:
        raise ConfigError(f"aggregation.max_examples must be at least 1, got {max_examples}")
    multiple = setting(doc, "aggregation", "median_multiple", float, WeightRule.median_multiple)
    if multiple < 1:
        raise ConfigError(f"aggregation.median_multiple must be at least 1, got {multiple}")
    return WeightRule(rule, max_examples, multiple)


def _blobs(doc: dict[str, Any]) -> BlobSettings:
    keep = setting(doc, "blobs", "keep", int, BlobSettings.keep)
    if not 1 <= keep <= MAX_BLOB_TAGS:
        raise ConfigError(f"blobs.keep must be 1 to {MAX_BLOB_TAGS} (tags kept; the newest is always kept), "
                          f"got {keep}")
    max_mb = _non_negative("blobs.max_mb", setting(doc, "blobs", "max_mb", float, BlobSettings.max_mb))
    if max_mb > MAX_BLOB_MB:
        raise ConfigError(f"blobs.max_mb must be at most {MAX_BLOB_MB:.0f} (0: no cap), got {max_mb}")
    serve = setting(doc, "blobs", "serve", bool, BlobSettings.serve)
    rate = _positive("blobs.serve_mb_per_s", setting(doc, "blobs", "serve_mb_per_s", float,
                                                      BlobSettings.serve_mb_per_s))
    timeout = _positive("blobs.fetch_timeout_s", setting(doc, "blobs", "fetch_timeout_s", float,
                                                         BlobSettings.fetch_timeout_s))
    if timeout > MAX_FETCH_TIMEOUT_S:
        raise ConfigError(f"blobs.fetch_timeout_s must be at most {MAX_FETCH_TIMEOUT_S:.0f}, got {timeout}")
    return BlobSettings(keep, max_mb, serve, rate, timeout)


def _city(doc: dict[str, Any]) -> CitySettings | None:
    """[city]: None when the table is absent (no city tier)."""
    if "city" not in doc:
        return None
    every = setting(doc, "city", "every", int, CitySettings.every)
    if not 1 <= every <= MAX_CITY_EVERY:
        raise ConfigError(f"city.every must be 1 to {MAX_CITY_EVERY} (rounds per city epoch), got {every}")
    rule = setting(doc, "city", "rule", str, CitySettings.rule)
    if rule not in CITY_RULES:
        raise ConfigError(f"city.rule must be one of {sorted(CITY_RULES)}, got {rule!r}")
    deadline = _positive("city.deadline_s", setting(doc, "city", "deadline_s", float, CitySettings.deadline_s))
    if deadline > MAX_FETCH_TIMEOUT_S:
        raise ConfigError(f"city.deadline_s must be at most {MAX_FETCH_TIMEOUT_S:.0f}, got {deadline}")
    share = setting(doc, "city", "audit_share", float, None)
    if share is not None and not 0.0 <= share <= 1.0:
        raise ConfigError(f"city.audit_share must be 0 to 1 (the share of peers' aggregates recomputed), got {share}")
    cap = setting(doc, "city", "max_examples", int, CitySettings.max_examples)
    if not 1 <= cap <= MAX_EXAMPLES:
        raise ConfigError(f"city.max_examples must be 1 to {MAX_EXAMPLES}, got {cap}")
    momentum = setting(doc, "city", "momentum", float, CitySettings.momentum)
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"city.momentum must be at least 0 and below 1 (the slow momentum's beta), got {momentum}")
    return CitySettings(every, rule, deadline, share, cap, momentum)


def _defense(doc: dict[str, Any]) -> dict[str, Any] | None:
    """[defense]: UpdateBound's parameters, each of its type (finite numbers, true or false); None: no table.
    The ranges (not negative, at least one bound set) are UpdateBound's to refuse, naming the parameter."""
    from .defense import PARAMETERS  # (Flower, which parse_config needs for the strategy anyway)

    given = known_keys(doc, "defense", PARAMETERS)  # (each given key is read: refuse_unread would pass them)
    return {key: setting(doc, "defense", key, PARAMETERS[key]) for key in given} or None


def _mcu_python(path: Path | None) -> Path | None:
    if path is not None and not (is_file(path, "model.mcu_python") and os.access(path, os.X_OK)):
        raise ConfigError(f"model.mcu_python: {path} is not an executable file")
    return path
