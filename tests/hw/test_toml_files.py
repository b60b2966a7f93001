"""The one TOML writer (hw/toml_files.py): what it writes reads back as written, and what TOML cannot hold
is refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hw.toml_files import toml_text, toml_value, write_toml
from protocol.config import tomllib

AWKWARD = ['plain', 'a "quoted" \\ back\\slash', "tab\there\nnewline", "é and 🐦 (outside the BMP)", "\x7f\x01",
           "[not a table]", "# not a comment", "'single'", ""]


def test_configs_read_back_equal_whatever_their_strings_hold(tmp_path: Path):
    doc = {
        "gateway": {"name": AWKWARD[3], "key": "/tmp/dir with spaces/gateway.key"},
        "broker": {"host": "127.0.0.1", "port": 1883},
        "strategy": {"name": "FedAvg", "params": {}, "dp": {"wrapper": "X", "params": {"clip": 1e-9}}},
        "rounds": {"lr": 0.1, "epochs": 2, "deadline_s": 60.0, "flag": True, "list": [1, 2.5, "x"]},
        "odd": {text: text for text in AWKWARD if text},
        "nested": {"a": {"b": {"c": [[1, 2], ["x"]]}}},
    }
    write_toml(tmp_path / "c.toml", doc)
    assert tomllib.loads((tmp_path / "c.toml").read_text()) == doc
    assert tomllib.loads(toml_text(doc)) == doc
    for text in AWKWARD:
        assert tomllib.loads(f"v = {toml_value(text)}")["v"] == text
    assert tomllib.loads(f"v = {toml_value([1, 'two', 3.5])}")["v"] == [1, "two", 3.5]


def test_the_emulators_gateway_config_is_written_through_it_and_read_by_the_gateway(tmp_path: Path):
    from gateway.config import load_config
    from hw.fleet import GatewayRun
    from hw.fleet_configs import gateway_config
    from hw.scenario import parse_scenario
    from protocol.keys import Identity

    scenario = parse_scenario({"strategy": {"name": "FedProx", "params": {"proximal_mu": 0.1}}})
    g = GatewayRun(0, "gw-1", Identity.generate(), tmp_path, tmp_path / "gw.log", ["d1", "d2"])
    g.identity.save(g.key)
    path = gateway_config(scenario, g, ("127.0.0.1", 1883), None)
    assert tomllib.loads(path.read_text()) == g.config
    config = load_config(path)  # what the gateway makes of it
    assert (config.strategy, config.strategy_params, config.lr, config.num_rounds, config.min_devices) == (
        "FedProx", {"proximal_mu": 0.1}, scenario.lr, scenario.rounds, 2)


@pytest.mark.parametrize("doc, error, message", [
    ({"a": {"x": None}}, TypeError, "a.x: TOML cannot hold NoneType"),
    ({"a": {"x": (1, 2)}}, TypeError, "a.x: TOML cannot hold tuple (1, 2) (a list reads back as a list)"),
    ({"a": {"x": Path("/p")}}, TypeError, "(write it as a string)"),
    ({"a": {"x": [1, float("nan")]}}, ValueError, "a.x[1]: nan is not a finite number"),
    ({"a": {1: 2}}, TypeError, "a: key 1 is not a string"),
])
def test_what_toml_cannot_hold_is_refused_naming_the_key(tmp_path: Path, doc, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        write_toml(tmp_path / "bad.toml", doc)
    assert not (tmp_path / "bad.toml").exists()  # nothing half-written
    with pytest.raises(TypeError, match="a table is a document"):
        toml_value({"a": 1})
