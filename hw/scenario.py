"""Emulator scenarios: one TOML file says what fleet to run and how.

    [run]
    name = "quickstart"
    rounds = 5
    seed = 0
    timeout_s = 600            # the whole run is stopped after this

    [fleet]
    devices = 5                # one device per subject (watch data) or per .npz file
    subjects = [1, 2, 3, 4, 5] # optional: which watch subjects

    [dataset]
    source = "watch"           # or a folder of per-device .npz files (x_train, y_train, x_test, y_test)
    stride = 64

    [strategy]
    name = "FedAvg"
    params = {}

    [training]
    epochs = 2
    batch_size = 32
    lr = 0.05
    deadline_s = 60

    [broker]
    kind = "auto"              # "mosquitto", "embedded" or "auto"

Unknown sections or keys are errors (a typo must not silently fall back to
a default), and every error names the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocol.config import ConfigError, read_toml

SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "run": {"name": str, "rounds": int, "seed": int, "timeout_s": (int, float)},
    "fleet": {"devices": int, "subjects": list},
    "dataset": {"source": str, "stride": int},
    "strategy": {"name": str, "params": dict, "dp": dict},
    "training": {"epochs": int, "batch_size": int, "lr": (int, float), "deadline_s": (int, float)},
    "broker": {"kind": str},
}


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
    broker: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["subjects"] = list(self.subjects)
        return doc


def parse_scenario(doc: dict[str, Any], base_dir: Path = Path(".")) -> Scenario:
    for section, table in doc.items():
        if section not in SCHEMA:
            raise ScenarioError(f"unknown section [{section}]; known: {', '.join(SCHEMA)}")
        if not isinstance(table, dict):
            raise ScenarioError(f"[{section}] must be a table")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ScenarioError(f"unknown key {section}.{key}; known: {', '.join(SCHEMA[section])}")
            kind = SCHEMA[section][key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ScenarioError(f"{section}.{key} has the wrong type ({type(value).__name__})")
    get = lambda s, k, d: doc.get(s, {}).get(k, d)  # noqa: E731
    subjects = tuple(get("fleet", "subjects", []))
    if not all(isinstance(s, int) and 1 <= s <= 10 for s in subjects):
        raise ScenarioError("fleet.subjects must be watch subject ids between 1 and 10")
    devices = get("fleet", "devices", len(subjects) or 5)
    if subjects and len(subjects) != devices:
        raise ScenarioError(f"fleet.subjects names {len(subjects)} subjects for {devices} devices")
    source = get("dataset", "source", "watch")
    if source != "watch":
        folder = (base_dir / source).resolve()
        if not folder.is_dir():
            raise ScenarioError(f"dataset.source: {folder} is not a folder of .npz files")
        source = str(folder)
    elif not 1 <= devices <= 10:
        raise ScenarioError(f"fleet.devices: the watch data has 10 subjects, asked for {devices}")
    scenario = Scenario(
        name=get("run", "name", "scenario"),
        rounds=get("run", "rounds", 5),
        seed=get("run", "seed", 0),
        timeout_s=float(get("run", "timeout_s", 600.0)),
        devices=devices,
        subjects=subjects,
        source=source,
        stride=get("dataset", "stride", 64),
        strategy=get("strategy", "name", "FedAvg"),
        strategy_params=dict(get("strategy", "params", {})),
        strategy_dp=dict(get("strategy", "dp", {})),
        epochs=get("training", "epochs", 2),
        batch_size=get("training", "batch_size", 32),
        lr=float(get("training", "lr", 0.05)),
        deadline_s=float(get("training", "deadline_s", 60.0)),
        broker=get("broker", "kind", "auto"),
    )
    for name, value in (("run.rounds", scenario.rounds), ("fleet.devices", scenario.devices),
                        ("dataset.stride", scenario.stride), ("training.epochs", scenario.epochs),
                        ("training.batch_size", scenario.batch_size), ("training.lr", scenario.lr),
                        ("training.deadline_s", scenario.deadline_s), ("run.timeout_s", scenario.timeout_s)):
        if value <= 0:
            raise ScenarioError(f"{name} must be positive, got {value}")
    if scenario.broker not in ("auto", "mosquitto", "embedded"):
        raise ScenarioError(f"broker.kind must be auto, mosquitto or embedded, not {scenario.broker!r}")
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    try:
        doc = read_toml(path)
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from exc
    return parse_scenario(doc, Path(path).parent)
