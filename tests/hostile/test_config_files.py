"""Hostile config and scenario files: a mutated file is refused with `ConfigError` (`ScenarioError` for
scenarios) naming the problem, never with another exception.

The files start as real, complete configs (every section the parsers know) and
the shipped scenarios in hw/scenarios/; they are bent as text (bytes flipped,
lines dropped, duplicated or swapped, values replaced by other TOML values:
huge or negative numbers, nan/inf, wrong types, nested tables, NUL characters)
and read through the real entry points (`load_config`, `load_scenario`).
A hypothesis property does the same on the parsed document, key by key.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import known_bugs
import pytest
import tally
import world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError
from agent.config import load_config as load_agent
from agent.config import parse_config as parse_agent
from gateway.config import load_config as load_gateway
from gateway.config import parse_config as parse_gateway
from hw.scenario import ScenarioError, load_scenario
from protocol.config import read_toml

ROOT = Path(__file__).resolve().parents[2]
PER_KIND = 2_000

AGENT_TOML = f"""\
[device]
name = "kitchen-imu"
key = "device.key"
state_dir = "state"

[gateway]
id = "{world.GATEWAY.id}"
public_key = "{world.GATEWAY.public_key.hex()}"
root_key = "{world.OPERATOR.public_key.hex()}"

[broker]
host = "127.0.0.1"
port = 1883

[data]
rate_hz = 50.0
stride = 64
capacity = 200000
retention_days = 7.0
test_fraction = 0.2

[model]
name = "imu_cnn"

[budget]
max_train_s = 120.0
max_samples = 2000

[[sensor]]
kind = "mpu6050"
i2c_bus = 1
address = 0x68

[[sensor]]
kind = "replay"
path = "samples.npz"
"""

GATEWAY_TOML = f"""\
[gateway]
name = "gw-harbour"
key = "gateway.key"
rotations = ""
state_dir = "state"

[broker]
host = "127.0.0.1"
port = 1883

[ledger]
genesis = ""
gossip = true
bootstrap_s = 5.0
checkpoint_every = 1000

[ingest]
workers = 0

[model]
manifest = ""
release_ttl_s = 604800.0

[strategy]
name = "FedAvg"
params = {{ min_available_nodes = 5, fraction_train = 0.5 }}

[rounds]
num_rounds = 5
deadline_s = 60.0
epochs = 2
batch_size = 32
lr = 0.05
min_devices = 5
wait_devices_s = 120.0

[blobs]
keep = 4
max_mb = 0.0
serve = true
serve_mb_per_s = 64.0
fetch_timeout_s = 30.0

[enrollment]
policy = "voucher"
operator_keys = ["{world.OPERATOR.public_key.hex()}"]
allowlist = ["{world.DEVICE.public_key.hex()}"]
"""

TOML_VALUES = [
    "-1", "0", "1", "65536", "9223372036854775807", "-9223372036854775808", "1e400", "-1e400", "nan", "inf",
    "-inf", "-0.0", "0.5", "true", "false", '""', '"x"', '"\\u0000"', '"../../etc/passwd"', '"~/x"', "[]",
    "[1, 2]", '["a"]', "[[1], [2]]", "{}", "{ a = 1 }", "{ a = { b = { c = 1 } } }", "1979-05-27T07:32:00Z",
    "07:32:00", "0x7f", '"' + "a" * 5000 + '"', '"FedProx"', '"flwr.serverapp.strategy:FedAvg"', '"os:system"',
    '"open"', '"allowlist"', '"voucher"', "[" + ", ".join(['"00"'] * 40) + "]",
]
ASSIGNMENT = re.compile(r"^(\s*[\w.\"-]+\s*=\s*)(.*)$")


def mutate_text(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    roll = rng.random()
    if roll < 0.45:  # a value replaced by another TOML value
        indexes = [i for i, line in enumerate(lines) if ASSIGNMENT.match(line)]
        i = rng.choice(indexes)
        lines[i] = ASSIGNMENT.sub(lambda m: m.group(1) + rng.choice(TOML_VALUES), lines[i])
    elif roll < 0.55:
        del lines[rng.randrange(len(lines))]
    elif roll < 0.62:
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif roll < 0.68:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif roll < 0.74:  # a key renamed
        i = rng.randrange(len(lines))
        lines[i] = lines[i].replace(" =", "x =", 1)
    elif roll < 0.8:  # a section renamed or repeated
        headers = [i for i, line in enumerate(lines) if line.startswith("[")]
        i = rng.choice(headers)
        lines.insert(rng.randrange(len(lines)), lines[i] if rng.random() < 0.5 else lines[i].replace("]", "x]"))
    else:  # raw bytes
        data = bytearray(text.encode())
        for _ in range(rng.choice([1, 2, 8])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return data.decode("utf-8", "surrogateescape")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("kind, text, load, error", [
    ("agent", AGENT_TOML, load_agent, ConfigError),
    ("gateway", GATEWAY_TOML, load_gateway, ConfigError),
    ("scenario quickstart", (ROOT / "hw/scenarios/quickstart.toml").read_text(), load_scenario, ScenarioError),
    ("scenario attacks", (ROOT / "hw/scenarios/attacks.toml").read_text(), load_scenario, ScenarioError),
])
def test_a_mutated_config_file_is_refused_with_a_config_error_and_nothing_else(tmp_path, kind, text, load, error):
    path = tmp_path / "file.toml"
    write(path, text)
    load(path)  # the unmutated file is good
    rng = random.Random(f"config {kind}")
    per = PER_KIND // 2 if kind.startswith("scenario") else PER_KIND
    refused = 0
    known: dict[int, int] = {}
    for _ in range(per):
        mutant = mutate_text(rng, text)
        write(path, mutant)
        try:
            load(path)
        except error:
            refused += 1
        except Exception as exc:  # noqa: BLE001 - the point: nothing but the config error may escape
            bug = known_bugs.config_bug(exc)
            if bug is None:
                pytest.fail(f"{kind}: {type(exc).__name__}: {exc}\n--- the file:\n{mutant[:3000]}")
            known[bug] = known.get(bug, 0) + 1
    tally.count(f"config file: {kind}", per)
    print(f"\n{kind}: {refused} of {per} mutants refused, the rest still valid; known bugs hit: {known}")
    assert refused > per // 4


# What a TOML file can hold (no null, no bytes): a config's values come from text.
SCALARS = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=30)
           | st.sampled_from(["", "FedAvg", "open", "voucher", "mpu6050", "replay", "ab" * 32]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                     max_size=4), max_leaves=8)


def _replace(doc: dict, data, values) -> dict:
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    section = data.draw(st.sampled_from(sorted(doc)))
    if isinstance(doc[section], dict) and doc[section] and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(doc[section])))
        doc[section][key] = data.draw(values)
    else:
        doc[section] = data.draw(values)
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(data=st.data())
def test_any_value_in_any_field_of_a_parsed_config_is_a_config_error_or_fine(data, tmp_path_factory):
    tally.count("config document (property)", 2)
    base = tmp_path_factory.getbasetemp()
    for text, parse in ((AGENT_TOML, parse_agent), (GATEWAY_TOML, parse_gateway)):
        doc = _replace(read_toml_text(text, base), data, VALUES)
        try:
            parse(doc, base)
        except ConfigError:
            pass
        except Exception as exc:
            if known_bugs.config_bug(exc) is None:
                raise


def read_toml_text(text: str, folder: Path) -> dict:
    path = folder / "property.toml"
    path.write_text(text)
    return read_toml(path)
