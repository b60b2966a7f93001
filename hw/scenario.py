"""Emulator scenarios: one TOML file says what fleet to run and how.

    [run]
    name = "quickstart"
    rounds = 5
    seed = 0                   # seeds the data partition and the choice of attackers
    timeout_s = 600            # the whole run is stopped after this

    [fleet]
    gateways = 1               # > 1: a city; the gateways share one ledger by gossip
    devices = 5                # in all, split evenly over the gateways (device i -> gateway i mod N) ...
    # devices_per_gateway = 5  # ... or this many per gateway (devices = gateways x this)
    subjects = [1, 2, 3, 4, 5] # optional: which watch subjects
    enrollment = "open"        # or "voucher": gateways admit only devices with the run's operator
                               # voucher (the emulator gives one to each of its devices; a sybil has none)

    [dataset]
    source = "watch"           # or a folder of per-device .npz files: X [n, ...] and y [n]
                               # (or x_train, y_train, x_test, y_test); no y for a model that
                               # needs no labels (imu_autoencoder)
    partition = "subject"      # "subject": one device per watch subject (per file of a folder);
                               # "dirichlet": pool every window, deal them to the devices with a
                               # per-class Dirichlet(alpha) label skew (seeded)
    alpha = 0.5                # dirichlet only: small = every device sees few classes
    test_fraction = 0.2        # each device's local test split
    stride = 64
    # classes_by_neighbourhood = [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 0, 1]]
                               # label skew between neighbourhoods: device i lives in neighbourhood
                               # i mod N and keeps only its neighbourhood's classes, train and test
                               # windows alike (after the partition); with N gateways each gateway
                               # serves one neighbourhood (device i -> gateway i mod N), with one
                               # gateway it serves them all. The city's test windows are the union.
    # anomalies = { share = 0.2, kinds = ["stuck", "spike", "drift"], magnitude = 1.0 }
                               # sensor faults in a seeded share of each device's test windows (never its
                               # train windows), for a reconstruction model (imu_autoencoder): the report
                               # gives each round's anomaly AUC. stuck: every channel repeats its reading
                               # from a point in the window's first half to its end; spike: 4 samples
                               # pushed 10 standard deviations (the device's own, per channel) up or down;
                               # drift: every channel ramps to 2.5 standard deviations by the window's end
                               # (hw/anomalies.py); magnitude multiplies the spikes' and drifts' sizes

    [strategy]
    name = "FedAvg"
    params = {}

    [training]
    model = "imu_cnn"          # a model family of the zoo: "imu_cnn", "tabular_mlp" (watch windows are summarised
                               # to its 24 features), "imu_autoencoder" (no labels: the report gives the
                               # reconstruction loss per round); "synthetic" (hw/synthetic.py, device pools
                               # only); or the folder of a model built with `starling-models build --out DIR`
                               # (relative to this file), e.g. with --classes 6 for data with 6 classes.
                               # The data must fit it: its windows the model's input shape, its labels its
                               # classes, else the scenario is refused naming both (hw/model_tables.py)
    epochs = 2
    batch_size = 32
    lr = 0.05
    deadline_s = 60
    # codec = "i8"             # how devices send their updates: "i8", "f16", "f32" or "topk" (the gateways'
    # density = 0.1            # [training] codec and density, topk's share of entries: gateway/config.py)
    # download = "i8"          # how new models reach the devices: "i8"/"f16" deltas, or "full" (the gateways')

    [broker]
    kind = "auto"              # "mosquitto", "embedded" or "auto"

    [rounds]                   # optional: merged into every gateway's [rounds] (gateway/config.py)
    mode = "buffered"          # "sync" (default) or "buffered": a step every `buffer` arrived updates
    buffer = 3                 # and max_staleness, staleness_exponent, evaluate_every (steps or rounds)

    [[adversary]]              # any number: a seeded choice of devices runs hw.adversary instead
    attack = "sign_flip"       # one of hw.adversary.ATTACKS
    fraction = 0.3             # of all devices (rounded, at least 1), or count = 3
    # scale = 10.0             # scaling: sends scale x its delta; sign_flip: sends -scale x its delta
                               # (default 1; a boosted sign flip runs as hw.adversary's scaling by -scale)
    # sigma = 1.0              # gaussian_noise
    # payload = "sign_flip"    # sybil: what it does if enrolled (under fleet.enrollment = "open")
    # scale = 4.0              # inflate_examples: sends -scale x its delta (default 4: a boosted sign flip) ...
    # claim = 10000000         # ... and claims this many examples in its signed reply
    # z = 0.5                  # crafted: sends mu - z x sigma of the colluders' honest deltas (default:
                               # the paper's z_max for its gateway's devices and its colluders; the
                               # crafted attackers of one gateway collude through <workdir>/collusion/<gw>)
    # bound_multiple = 2.0     # under_bound: the [defense] median_multiple it stays just under

    [[adversary]]              # a gateway attack: no fraction or count, a target gateway instead
    attack = "tampered_aggregate"  # the target runs as hw.tampered_gateway: every round aggregate it
    target = "gw-2"            # records and offers is the honest one plus noise (not computed from its
    # scale = 0.05             # recorded inputs); the noise's std, relative to each array's RMS

    [aggregation]              # optional: goes verbatim into every gateway's config (gateway/config.py):
    weights = "capped"         # what a reply weighs: "capped", "uniform" or "reported" (gateway/weights.py)
    max_examples = 100000
    median_multiple = 2.0

    [defense]                  # optional: verbatim into every gateway's config: an UpdateBound around the
    median_multiple = 2.0      # strategy (gateway/defense.py); both tables are checked at load with the
    norm_bound = 0.0           # gateway's own parser
    centered_clipping = false

    [city]                     # optional, fleet.gateways >= 2: the city tier. Every `every` rounds the
    every = 3                  # gateways merge their latest aggregates into one city model (agreed
    rule = "weighted"          # through the ledger) and go on from it; "weighted" mean or "median"
    deadline_s = 60.0          # how long a gateway waits for the other members' offers
    audit_share = 1.0          # share of the peers' round aggregates each gateway recomputes (0 to 1)
    momentum = 0.0             # slow momentum of the city merges (0 to below 1; gateway/city_merge.py)
                               # written into every gateway's config; the report gets a `city` section

    [personalization]          # optional, a classifier: after the run each device tunes the final model to
    steps = 50                 # its training windows as an agent with [personalization] does before inference
    lr = 0.1                   # (agent/personalize.py); the report gets global_accuracy and
    weights = []               # personalized_accuracy (hw/personal_report.py); checked as the agent checks it

    [[device_profile]]         # any number: a seeded share of the devices runs slower and leaner
    name = "old-pi"            # (hw/profiles.py)
    fraction = 0.3             # of all devices, or count = 3
    cpu_slowdown = 4.0         # the device's process gets 1/4 of a core (SIGSTOP/SIGCONT duty cycle)
    max_train_s = 20.0         # its agent's [budget]
    max_samples = 500
    memory_mb = 256            # its process's memory cap (RLIMIT_DATA; in a device pool: x the pool's devices)

    [[link]]                   # any number: a seeded share of the devices reaches its broker through
    name = "lte"               # an emulated link (hw/links.py)
    fraction = 0.5
    latency_ms = 80.0
    jitter_ms = 20.0
    bandwidth_kbps = 2000.0    # kilobits per second
    loss = 0.02                # a lost segment costs a 200 ms retransmission
    outages = [[30.0, 40.0]]   # the disconnect schedule: seconds after the devices started

    [[fault]]                  # any number: the fault timeline (see hw/faults.py for every kind)
    kind = "gateway_restart"   # gateway_restart (kill -9), gateway_stop (SIGTERM), broker_restart,
    target = "gw-2"            # partition, device_churn
    at_round = 2               # after that gateway's round 2 (or at_s = seconds after the start)
    down_s = 5.0
    # overrides = { lr = 0.1 } # gateway_stop only: config values for its next start

    [[variant]]                # optional: run the scenario once per variant, one after another,
    name = "fedavg"            # results merged into one report under "comparison"
    [variant.strategy]         # a variant holds any of the sections above (not [run]); a table
    name = "FedAvg"            # overrides the base section key by key, an `adversary` or `fault` list
                               # replaces the base list (`adversary = []`: a clean run, `fault = []`:
                               # no faults; [[variant.fault]] tables: this run's faults); an empty
                               # `aggregation = {}`, `defense = {}` or `city = {}` drops the base's
                               # table (the gateway's default weights; no defense; no city tier)

(`[[run]]` would have been the natural name for variants, but TOML cannot
hold both a `[run]` table and a `[[run]]` array.)

Unknown sections or keys are errors (a typo must not silently fall back to
a default), and every error names the field.

This module holds the `Scenario` and puts it together (`parse_scenario`,
`load_scenario`); the tables are checked where their meaning lives:
hw/tables.py (what every table shares), hw/fleet_tables.py ([fleet] and
[dataset]: how many devices, whose data), hw/adversary_tables.py
([[adversary]]), hw/city_tables.py ([city], classes_by_neighbourhood),
hw/model_tables.py ([training] model, dataset.anomalies),
hw/gateway_tables.py ([aggregation], [defense], with the gateway's own
code), hw/faults.py ([[fault]]), hw/profiles.py ([[device_profile]],
[[link]]) and hw/variant_tables.py ([[variant]]).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config import Personalization, parse_personalization
from protocol.config import ConfigError, read_toml
from protocol.schemas import DEFAULT_DOWNLOAD, DOWNLOADS
from protocol.tensors import UPLOAD_CODECS, check_density

from . import model_tables
from .adversary_tables import Adversary, parse_adversaries
from .anomalies import Anomalies
from .city_tables import parse_city, parse_neighbourhoods
from .faults import Fault, parse_faults
from .fleet_tables import parse_fleet
from .gateway_tables import GATEWAY_TABLES, check_gateway_tables, check_strategy_overrides
from .profiles import DeviceProfile, LinkSpec, parse_device_profiles, parse_links
from .tables import NUMBER, check_table
from .variant_tables import variant_docs

SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "run": {"name": str, "rounds": int, "seed": int, "timeout_s": NUMBER},
    "fleet": {"gateways": int, "devices": int, "devices_per_gateway": int, "subjects": list, "runner": str,
              "pool_size": int, "enrollment": str},
    "dataset": {"source": str, "stride": int, "partition": str, "alpha": NUMBER, "test_fraction": NUMBER,
                "classes_by_neighbourhood": list, "anomalies": dict},
    "strategy": {"name": str, "params": dict, "dp": dict},
    "training": {"epochs": int, "batch_size": int, "lr": NUMBER, "deadline_s": NUMBER, "model": str, "codec": str,
                 "density": NUMBER, "download": str},
    "broker": {"kind": str},
    "aggregation": {},  # keys and values: the gateway's own parser (hw/gateway_tables.py)
    "defense": {},
    "city": {"every": int, "rule": str, "deadline_s": NUMBER, "audit_share": NUMBER, "momentum": NUMBER},
    "personalization": {"steps": int, "lr": NUMBER, "weights": list},  # checked by agent/config.py
    # the gateways' round mode (gateway/buffered.py), merged into their [rounds]; checked by gateway/config.py
    "rounds": {"mode": str, "buffer": int, "max_staleness": int, "staleness_exponent": NUMBER, "evaluate_every": int},
}
ARRAYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "adversary": {},  # checked by hw/adversary_tables.py (ADVERSARY_KEYS)
    "variant": {"name": str},  # plus any section of SCHEMA but [run], `adversary` and `fault`: hw/variant_tables.py
    "fault": {},  # checked by hw/faults.py
    "device_profile": {},  # checked by hw/profiles.py
    "link": {},  # checked by hw/profiles.py
}
ENROLLMENTS = ("open", "voucher")  # every device admitted; or only those with the run's operator voucher
RUNNERS = ("process", "pool")  # a process per device (as on a real device), or many devices per process


class ScenarioError(ConfigError):
    """The scenario file is unusable; the message names the field."""


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    rounds: int = 5
    seed: int = 0
    timeout_s: float = 600.0
    devices: int = 5
    subjects: tuple[int, ...] = ()
    source: str = "watch"
    stride: int = 64
    strategy: str = "FedAvg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    strategy_dp: dict[str, Any] = field(default_factory=dict)
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    deadline_s: float = 60.0
    codec: str = "i8"  # [training] codec: the gateways' upload codec
    density: float | None = None  # [training] density: topk's share of entries (None: the gateway's default)
    download: str = DEFAULT_DOWNLOAD  # [training] download: the gateways' model downloads (i8, f16, full)
    broker: str = "auto"
    gateways: int = 1
    partition: str = "subject"
    alpha: float = 0.5
    test_fraction: float = 0.2
    adversaries: tuple[Adversary, ...] = ()
    variants: tuple[Scenario, ...] = ()
    runner: str = "process"
    pool_size: int = 100
    model: str = "imu_cnn"
    enrollment: str = "open"
    faults: tuple[Fault, ...] = ()
    device_profiles: tuple[DeviceProfile, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    aggregation: dict[str, Any] = field(default_factory=dict)  # [aggregation], verbatim into the gateways' configs
    defense: dict[str, Any] = field(default_factory=dict)  # [defense], likewise ({}: none)
    city: dict[str, Any] = field(default_factory=dict)  # [city] with every key set ({}: no city tier)
    gateway_rounds: dict[str, Any] = field(default_factory=dict)  # [rounds]: mode, buffer, ... ({}: the defaults)
    neighbourhoods: tuple[tuple[int, ...], ...] = ()  # dataset.classes_by_neighbourhood (): no label skew
    anomalies: Anomalies | None = None  # dataset.anomalies (None: every test window as recorded)
    # [personalization]: the devices' tuning of the final model, measured (hw/personal_report.py); None: not asked
    personalization: Personalization | None = None

    @property
    def model_spec(self) -> model_tables.ModelSpec:
        """The model as its manifest describes it: family, task, input shape, classes (hw/model_tables.py)."""
        return model_tables.model_spec(self.model)

    def devices_of(self, gateway: int) -> list[int]:
        """Indices (0-based) of the devices that belong to gateway `gateway` (0-based): i mod gateways."""
        return [i for i in range(self.devices) if i % self.gateways == gateway]

    def classes_of(self, device: int) -> tuple[int, ...] | None:
        """The classes device `device` (0-based) keeps: its neighbourhood's (i mod N); None: all of them."""
        return self.neighbourhoods[device % len(self.neighbourhoods)] if self.neighbourhoods else None

    def gateway_attacks(self) -> dict[str, Adversary]:
        """Gateway name -> the gateway attack it runs."""
        return {a.target: a for a in self.adversaries if a.on_gateway}

    def attack_label(self) -> str | None:
        return ", ".join(a.label() for a in self.adversaries) or None

    def defense_label(self) -> str | None:
        """E.g. "weights reported; defense median_multiple=2.0" (None: the gateway's defaults)."""
        parts = []
        if "weights" in self.aggregation:
            parts.append(f"weights {self.aggregation['weights']}")
        rest = {k: v for k, v in self.aggregation.items() if k != "weights"}
        if rest:
            parts.append("aggregation " + ", ".join(f"{k}={v}" for k, v in rest.items()))
        if self.defense:
            parts.append("defense " + ", ".join(f"{k}={v}" for k, v in self.defense.items()))
        return "; ".join(parts) or None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["subjects"] = list(self.subjects)
        doc["neighbourhoods"] = [list(classes) for classes in self.neighbourhoods]
        doc["adversaries"] = [{k: v for k, v in asdict(a).items() if v is not None} for a in self.adversaries]
        doc["variants"] = [v.name for v in self.variants]
        doc["faults"] = [{k: v for k, v in asdict(f).items() if v not in (None, "", {})} for f in self.faults]
        doc["device_profiles"] = [{k: v for k, v in asdict(p).items() if v is not None} for p in self.device_profiles]
        doc["links"] = [{k: v for k, v in asdict(link).items() if v is not None} for link in self.links]
        return doc


def parse_scenario(doc: dict[str, Any], base_dir: Path = Path(".")) -> Scenario:
    """A scenario document (as read from TOML), checked; `base_dir`: where its relative paths are."""
    for section, table in doc.items():
        if section in ARRAYS:
            continue
        if section not in SCHEMA:
            raise ScenarioError(f"unknown section [{section}]; known: {', '.join([*SCHEMA, *ARRAYS])}")
        if section in GATEWAY_TABLES:
            if not isinstance(table, dict):
                raise ScenarioError(f"[{section}] must be a table")
        else:
            check_table(section, table, SCHEMA[section], error=ScenarioError)
    get = lambda s, k, d: doc.get(s, {}).get(k, d)  # noqa: E731
    try:
        fleet = parse_fleet(doc, base_dir)
        gateways, devices, source = fleet.gateways, fleet.devices, fleet.source
        adversaries = parse_adversaries(doc.get("adversary", []), gateways)
        neighbourhoods = parse_neighbourhoods(doc.get("dataset", {}), source, devices, gateways)
        city = parse_city(doc["city"], gateways, get("run", "rounds", 5)) if "city" in doc else {}
        model, anomalies = model_tables.parse_model_and_data(doc, base_dir, source, neighbourhoods)
        faults = parse_faults(doc.get("fault", []), gateways)
        device_profiles = parse_device_profiles(doc.get("device_profile", []))
        links = parse_links(doc.get("link", []))
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from exc
    for where, specs in (("device_profile", device_profiles), ("link", links)):
        asked = sum(spec.devices(devices) for spec in specs)
        if asked > devices:
            raise ScenarioError(f"{where}: the profiles take {asked} devices, but the fleet has only {devices}")
    attackers = sum(a.devices(devices) for a in adversaries)
    if attackers > devices:
        raise ScenarioError(f"adversary: {attackers} attacking devices, but the fleet has only {devices}")
    scenario = Scenario(
        name=get("run", "name", "scenario"),
        rounds=get("run", "rounds", 5),
        seed=get("run", "seed", 0),
        timeout_s=float(get("run", "timeout_s", 600.0)),
        devices=devices,
        subjects=fleet.subjects,
        source=source,
        stride=get("dataset", "stride", 64),
        strategy=get("strategy", "name", "FedAvg"),
        strategy_params=dict(get("strategy", "params", {})),
        strategy_dp=dict(get("strategy", "dp", {})),
        epochs=get("training", "epochs", 2),
        batch_size=get("training", "batch_size", 32),
        lr=float(get("training", "lr", 0.05)),
        deadline_s=float(get("training", "deadline_s", 60.0)),
        codec=get("training", "codec", "i8"),
        density=_density(get("training", "density", None)),
        download=get("training", "download", DEFAULT_DOWNLOAD),
        broker=get("broker", "kind", "auto"),
        gateways=gateways,
        partition=fleet.partition,
        alpha=fleet.alpha,
        test_fraction=fleet.test_fraction,
        adversaries=adversaries,
        runner=get("fleet", "runner", "process"),
        pool_size=get("fleet", "pool_size", 100),
        model=model,
        enrollment=get("fleet", "enrollment", "open"),
        faults=faults,
        device_profiles=device_profiles,
        links=links,
        aggregation=copy.deepcopy(dict(doc.get("aggregation", {}))),
        defense=copy.deepcopy(dict(doc.get("defense", {}))),
        city=city,
        gateway_rounds=copy.deepcopy(dict(doc.get("rounds", {}))),
        neighbourhoods=neighbourhoods,
        anomalies=anomalies,
        personalization=_personalization(doc, model),
    )
    if scenario.runner not in RUNNERS:
        raise ScenarioError(f"fleet.runner must be one of {', '.join(RUNNERS)}, not {scenario.runner!r}")
    if scenario.enrollment not in ENROLLMENTS:
        raise ScenarioError(f"fleet.enrollment must be one of {', '.join(ENROLLMENTS)}, not {scenario.enrollment!r}")
    if scenario.model == "synthetic" and scenario.runner != "pool":
        raise ScenarioError('training.model = "synthetic" runs in device pools: set fleet.runner = "pool"')
    for name, value in (("fleet.pool_size", scenario.pool_size), ("run.rounds", scenario.rounds), ("fleet.devices", scenario.devices),
                        ("dataset.stride", scenario.stride), ("training.epochs", scenario.epochs),
                        ("training.batch_size", scenario.batch_size), ("training.lr", scenario.lr),
                        ("training.deadline_s", scenario.deadline_s), ("run.timeout_s", scenario.timeout_s)):
        if value <= 0:
            raise ScenarioError(f"{name} must be positive, got {value}")
    if scenario.broker not in ("auto", "mosquitto", "embedded"):
        raise ScenarioError(f"broker.kind must be auto, mosquitto or embedded, not {scenario.broker!r}")
    if scenario.codec not in UPLOAD_CODECS:
        raise ScenarioError(f"training.codec must be one of {', '.join(UPLOAD_CODECS)}, not {scenario.codec!r}")
    if scenario.download not in DOWNLOADS:
        raise ScenarioError(f"training.download must be one of {', '.join(DOWNLOADS)}, not {scenario.download!r}")
    try:
        check_strategy_overrides(scenario.faults, scenario.strategy, scenario.strategy_params, scenario.strategy_dp,
                                 scenario.defense)
        if any(section in doc for section in GATEWAY_TABLES):
            check_gateway_tables(doc, scenario.strategy, scenario.strategy_params, scenario.strategy_dp)
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from exc
    if "variant" in doc:
        scenario = _with_variants(scenario, doc, base_dir)
    return scenario


def _density(value: Any) -> float | None:
    """training.density: None (absent) or a number in (0, 1]."""
    try:
        return None if value is None else check_density(value)
    except ValueError as exc:
        raise ScenarioError(f"training.density: {exc}") from None


def _personalization(doc: dict[str, Any], model: str) -> Personalization | None:
    """[personalization], checked as the agent checks it (agent/config.py); it tunes a classifier's labels."""
    if "personalization" not in doc:
        return None
    try:
        settings = parse_personalization({"personalization": doc["personalization"]})
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from exc
    if model == model_tables.SYNTHETIC or model_tables.model_spec(model).task != model_tables.CLASSIFICATION:
        raise ScenarioError(f"[personalization] tunes a classifier to each device's labels; training.model {model!r} "
                            "is not one")
    return settings


def _with_variants(scenario: Scenario, doc: dict[str, Any], base_dir: Path) -> Scenario:
    """`scenario` with its variants: each the base document with a [[variant]] merged over it, parsed."""
    variants = []
    for at, name, run_doc in variant_docs(doc, SCHEMA, ScenarioError):
        try:
            merged = parse_scenario(run_doc, base_dir)
        except ScenarioError as exc:
            raise ScenarioError(f"{at} ({name}): {exc}") from exc
        variants.append(replace(merged, name=name))
    return replace(scenario, variants=tuple(variants))


def load_scenario(path: str | Path) -> Scenario:
    try:
        doc = read_toml(path)
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from exc
    return parse_scenario(doc, Path(path).parent)
