"""Bad config is refused at start, naming the field and the reason."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.config import ConfigError as AgentConfigError
from agent.config import parse_config as parse_agent
from gateway import config as gateway_config
from gateway.config import ConfigError as GatewayConfigError
from gateway.config import parse_config as parse_gateway
from hw.scenario import ScenarioError, load_scenario, parse_scenario
from protocol.config import ConfigError, tomllib  # tomllib: the stdlib's, or tomli on Python 3.10

ROOT = Path(__file__).resolve().parent.parent
GOOD_AGENT = {
    "device": {"name": "d", "key": "k", "state_dir": "s"},
    "gateway": {"id": "0123456789abcdef0123456789abcdef", "public_key": "ab" * 32},
    "broker": {"host": "127.0.0.1", "port": 1883},
    "data": {"replay": "x.npz"},
}
GOOD_GATEWAY = {
    "gateway": {"name": "gw", "key": "k", "state_dir": "s"},
    "strategy": {"name": "FedAvg"},
    "enrollment": {"policy": "allowlist", "allowlist": []},
}


def with_(doc, section, key, value):
    return {**doc, section: {**doc.get(section, {}), key: value}}


def test_a_good_agent_config_parses():
    config = parse_agent(GOOD_AGENT, Path("/tmp"))
    assert config.gateway_public_key == bytes.fromhex("ab" * 32) and config.key == Path("/tmp/k")


@pytest.mark.parametrize(
    "section, key, value, field",
    [
        ("gateway", "public_key", "abcd", "gateway.public_key"),
        ("gateway", "id", "NOT-HEX-AT-ALL!!", "gateway.id"),
        ("broker", "port", 70000, "broker.port"),
        ("broker", "port", "1883", "broker.port"),
        ("device", "resend_s", -1, "device.resend_s"),
    ],
)
def test_a_bad_agent_field_is_named(section, key, value, field):
    with pytest.raises(AgentConfigError, match=field.replace(".", r"\.")):
        parse_agent(with_(GOOD_AGENT, section, key, value))


def test_a_missing_agent_field_is_named():
    doc = {**GOOD_AGENT, "data": {}}
    with pytest.raises(AgentConfigError, match=r"data\.replay is required"):
        parse_agent(doc)


def test_an_unknown_strategy_is_a_config_error_listing_the_known_ones():
    with pytest.raises(GatewayConfigError, match="FedAvg") as err:
        parse_gateway(with_(GOOD_GATEWAY, "strategy", "name", "FedAverage"))
    assert "strategy.name" in str(err.value)


def test_a_parameter_the_strategy_does_not_take_is_a_config_error():
    with pytest.raises(GatewayConfigError, match=r"strategy\.params.*fraction_trian"):
        parse_gateway(with_(GOOD_GATEWAY, "strategy", "params", {"fraction_trian": 0.5}))


def test_a_real_flower_strategy_with_parameters_is_built():
    config = parse_gateway(with_(GOOD_GATEWAY, "strategy", "params", {"fraction_train": 0.5, "min_train_nodes": 3}))
    strategy = config.make_strategy()
    assert type(strategy).__name__ == "FedAvg" and strategy.fraction_train == 0.5


def test_broker_tls_and_credentials_are_read_with_paths_relative_to_the_config(tmp_path):
    (tmp_path / "ca.crt").write_text("ca")
    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n")
    secret.chmod(0o600)
    doc = {**GOOD_GATEWAY, "broker": {"tls_ca": "ca.crt", "username": "gw-x", "password_file": "pw"},
           "ingest": {"workers": 3}}
    config = parse_gateway(doc, tmp_path)
    assert config.broker_auth.tls_ca == tmp_path / "ca.crt" and config.broker_auth.password() == "s3cret"
    assert config.ingest_workers == 3


@pytest.mark.parametrize("broker, match", [
    ({"tls_ca": "missing.crt"}, r"broker\.tls_ca: .*missing\.crt is not a file"),
    ({"tls_ca": "ca.crt", "tls_cert": "ca.crt"}, r"tls_cert and broker\.tls_key go together"),
    ({"tls_cert": "ca.crt", "tls_key": "ca.crt"}, r"tls_cert needs broker\.tls_ca"),
    ({"password_file": "pw"}, r"password_file needs broker\.username"),
    ({"username": "u", "password_file": "open-pw"}, r"password_file: .*readable by others"),
])
def test_bad_broker_credentials_are_named(tmp_path, broker, match):
    (tmp_path / "ca.crt").write_text("ca")
    for name, mode in (("pw", 0o600), ("open-pw", 0o644)):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(mode)
    with pytest.raises(GatewayConfigError, match=match):
        parse_gateway({**GOOD_GATEWAY, "broker": broker}, tmp_path)


@pytest.mark.parametrize("workers", [-1, 65, "two"])
def test_a_bad_number_of_ingest_workers_is_named(workers):
    with pytest.raises(GatewayConfigError, match=r"ingest\.workers"):
        parse_gateway({**GOOD_GATEWAY, "ingest": {"workers": workers}})


def test_the_enrollment_policy_must_be_chosen_explicitly():
    doc = {k: v for k, v in GOOD_GATEWAY.items() if k != "enrollment"}
    with pytest.raises(GatewayConfigError, match=r"enrollment\.policy is required"):
        parse_gateway(doc)


def test_a_users_own_strategy_is_found_by_import_path():
    config = parse_gateway(with_(GOOD_GATEWAY, "strategy", "name", "flwr.serverapp.strategy.fedmedian:FedMedian"))
    assert type(config.make_strategy()).__name__ == "FedMedian"


def test_an_import_path_that_is_not_a_strategy_is_refused():
    with pytest.raises(GatewayConfigError, match=r"strategy\.name.*not a Flower strategy"):
        parse_gateway(with_(GOOD_GATEWAY, "strategy", "name", "collections:OrderedDict"))
    with pytest.raises(GatewayConfigError, match=r"strategy\.name: cannot import"):
        parse_gateway(with_(GOOD_GATEWAY, "strategy", "name", "no_such_module:Thing"))


def test_a_missing_required_strategy_parameter_is_named():
    with pytest.raises(GatewayConfigError, match=r"needs parameter\(s\) \['client_learning_rate'\]"):
        parse_gateway(with_(GOOD_GATEWAY, "strategy", "name", "QFedAvg"))


def test_a_dp_wrapper_is_built_around_the_strategy():
    dp = {"wrapper": "DifferentialPrivacyClientSideFixedClipping",
          "params": {"noise_multiplier": 0.1, "clipping_norm": 1.0, "num_sampled_clients": 5}}
    # A privacy cost is accounted (noise > 0): that needs uniform weights and enough devices per round.
    doc = {**with_(GOOD_GATEWAY, "strategy", "dp", dp), "aggregation": {"weights": "uniform"},
           "rounds": {**GOOD_GATEWAY.get("rounds", {}), "min_devices": 5}}
    strategy = parse_gateway(doc).make_strategy()
    assert type(strategy).__name__ == "DifferentialPrivacyClientSideFixedClipping"
    assert type(strategy.strategy).__name__ == "FedAvg"


@pytest.mark.parametrize("section, table, match", [
    ("aggregation", {"weight": "uniform"}, r"unknown key aggregation\.weight; known: max_examples, median_multiple, weights"),
    ("aggregation", {"weights": "uniform", "max_example": 10}, r"unknown key aggregation\.max_example; known"),
    ("aggregation", {"median_multiple": float("nan")}, r"aggregation\.median_multiple must be a finite number"),
    ("aggregation", {"max_examples": True}, r"aggregation\.max_examples must be int, got bool"),
    ("defense", {"norm_bounds": 1.0}, r"unknown key defense\.norm_bounds; known: centered_clipping, median_mult"),
    ("defense", {"strategy": "FedAvg"}, r"unknown key defense\.strategy"),  # (UpdateBound's own argument)
    ("defense", {"centered_clipping": "no"}, r"defense\.centered_clipping must be bool, got str"),  # "no" is truthy
    ("defense", {"median_multiple": 2.0, "centered_clipping": 1}, r"defense\.centered_clipping must be bool, got int"),
    ("defense", {"norm_bound": True}, r"defense\.norm_bound must be float, got bool"),
    ("defense", {"median_multiple": "2"}, r"defense\.median_multiple must be float, got str"),
    ("defense", {"norm_bound": float("nan")}, r"defense\.norm_bound must be a finite number, got nan"),
    ("defense", {"median_multiple": float("inf")}, r"defense\.median_multiple must be a finite number, got inf"),
    ("defense", {"norm_bound": -1.0}, r"defense: UpdateBound refused them: norm_bound must be finite and not negative"),
    ("defense", {"median_multiple": -2}, r"defense: UpdateBound refused them: median_multiple must be finite"),
    ("defense", "on", r"\[defense\] must be a table"),
])
def test_a_bad_aggregation_or_defense_setting_is_named_not_ignored(section, table, match):
    with pytest.raises(GatewayConfigError, match=match):
        parse_gateway({**GOOD_GATEWAY, section: table})


def test_good_aggregation_and_defense_tables_are_taken_as_written():
    config = parse_gateway({**GOOD_GATEWAY, "aggregation": {"weights": "reported", "max_examples": 500},
                            "defense": {"norm_bound": 3, "median_multiple": 0, "centered_clipping": True}})
    assert (config.weights.rule, config.weights.max_examples, config.weights.median_multiple) == ("reported", 500, 1.0)
    assert config.defense == {"norm_bound": 3.0, "median_multiple": 0.0, "centered_clipping": True}
    bound = config.make_strategy()
    assert (type(bound).__name__, bound.norm_bound, bound.median_multiple, bound.centered_clipping) == (
        "UpdateBound", 3.0, 0.0, True)
    assert parse_gateway({**GOOD_GATEWAY, "defense": {}}).defense is None  # an empty table: no defense


def test_the_blobs_table_is_taken_as_written_and_defaults_to_keeping_four_tags_serving():
    default = parse_gateway(GOOD_GATEWAY).blobs
    assert (default.keep, default.max_mb, default.serve, default.fetch_timeout_s) == (4, 0.0, True, 30.0)
    assert default.retention.max_bytes is None  # max_mb 0: no byte cap
    config = parse_gateway({**GOOD_GATEWAY, "blobs": {"keep": 2, "max_mb": 1.5, "serve": False,
                                                      "serve_mb_per_s": 8, "fetch_timeout_s": 5}}).blobs
    assert (config.keep, config.max_mb, config.serve, config.serve_mb_per_s, config.fetch_timeout_s) == (
        2, 1.5, False, 8.0, 5.0)
    assert (config.retention.keep_tags, config.retention.max_bytes) == (2, 1_572_864)
    assert (config.exchange.fetch_timeout_s, config.exchange.give_bytes_per_s) == (5.0, 8 * 1024 * 1024)


@pytest.mark.parametrize("table, match", [
    ({"keep": 0}, r"blobs\.keep must be 1 to 1000000 \(tags kept; the newest is always kept\), got 0"),
    ({"keep": -3}, r"blobs\.keep must be 1 to"),
    ({"keep": 10**7}, r"blobs\.keep must be 1 to 1000000"),
    ({"keep": 2.5}, r"blobs\.keep must be int, got float"),
    ({"keep": True}, r"blobs\.keep must be int, got bool"),
    ({"max_mb": -1}, r"blobs\.max_mb must not be negative, got -1"),
    ({"max_mb": 1e300}, r"blobs\.max_mb must be at most 1000000000 \(0: no cap\)"),
    ({"max_mb": float("inf")}, r"blobs\.max_mb must be a finite number"),
    ({"max_mb": "10"}, r"blobs\.max_mb must be float, got str"),
    ({"serve": "yes"}, r"blobs\.serve must be bool, got str"),
    ({"serve": 1}, r"blobs\.serve must be bool, got int"),
    ({"serve_mb_per_s": 0}, r"blobs\.serve_mb_per_s must be positive, got 0"),
    ({"fetch_timeout_s": 0}, r"blobs\.fetch_timeout_s must be positive, got 0"),
    ({"fetch_timeout_s": 1e6}, r"blobs\.fetch_timeout_s must be at most 86400"),
    ({"fetch_timeout_s": float("nan")}, r"blobs\.fetch_timeout_s must be a finite number"),
    ({"keep_tags": 4}, r"unknown key blobs\.keep_tags; known: fetch_timeout_s, keep, max_mb, serve, serve_mb_per_s"),
    ("lots", r"\[blobs\] must be a table"),
])
def test_a_bad_blobs_setting_is_refused_naming_it(table, match):
    with pytest.raises(GatewayConfigError, match=match):
        parse_gateway({**GOOD_GATEWAY, "blobs": table})


@pytest.mark.parametrize("dp, match", [
    ({"wrapper": "Nope"}, r"strategy\.dp\.wrapper"),
    ({"wrapper": "DifferentialPrivacyServerSideFixedClipping", "params": {"clipping_norm": 1.0}},
     r"strategy\.dp\.params.*needs parameter"),
    ({"wrapper": "DifferentialPrivacyServerSideFixedClipping",
      "params": {"noise_multiplier": -1.0, "clipping_norm": 1.0, "num_sampled_clients": 5}}, r"strategy\.dp\.params.*refused"),
])
def test_a_bad_dp_wrapper_config_is_named(dp, match):
    with pytest.raises(GatewayConfigError, match=match):
        parse_gateway(with_(GOOD_GATEWAY, "strategy", "dp", dp))


def test_an_unknown_enrollment_policy_is_refused():
    with pytest.raises(GatewayConfigError, match=r"enrollment\.policy"):
        parse_gateway(with_(GOOD_GATEWAY, "enrollment", "policy", "anyone"))


def test_the_gateway_command_refuses_a_bad_config_with_exit_2(tmp_path):
    conf = tmp_path / "gw.toml"
    conf.write_text('[gateway]\nname = "gw"\nkey = "k"\nstate_dir = "s"\n[strategy]\nname = "Nope"\n'
                    '[enrollment]\npolicy = "open"\n')
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--config", str(conf)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "strategy.name" in done.stderr


def test_the_shipped_quickstart_scenario_is_valid():
    scenario = load_scenario(ROOT / "hw" / "scenarios" / "quickstart.toml")
    assert (scenario.devices, scenario.rounds, scenario.strategy) == (5, 5, "FedAvg")


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"fleet": {"devices": 11}}, "fleet.devices"),
        ({"fleet": {"devcies": 3}}, "fleet.devcies"),
        ({"trainig": {}}, "trainig"),
        ({"training": {"lr": "fast"}}, "training.lr"),
        ({"run": {"rounds": 0}}, "run.rounds"),
        ({"broker": {"kind": "rabbit"}}, "broker.kind"),
        ({"dataset": {"source": "/no/such/folder"}}, "dataset.source"),
    ],
)
def test_a_bad_scenario_names_the_field(doc, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        parse_scenario(doc)


@pytest.mark.parametrize("key, value, match", [
    ("genesis", "missing.cbor", r"ledger\.genesis: .*missing\.cbor is not a file"),
    ("bootstrap_s", -1.0, r"ledger\.bootstrap_s must not be negative"),
    ("checkpoint_every", -5, r"ledger\.checkpoint_every must not be negative"),
    ("gossip", "yes", r"ledger\.gossip must be bool"),
])
def test_a_bad_ledger_setting_is_named(tmp_path, key, value, match):
    with pytest.raises(GatewayConfigError, match=match):
        parse_gateway({**GOOD_GATEWAY, "ledger": {key: value}}, tmp_path)


# Every table's keys, as the parsers read them (an unknown one is refused naming these).
GATEWAY_KEYS = {
    "gateway": "key, name, rotations, state_dir",
    "broker": "host, password_file, port, tls_ca, tls_cert, tls_key, username",
    "ledger": "bootstrap_s, checkpoint_every, genesis, gossip",
    "ingest": "workers",
    "model": "manifest, mcu_python, release_ttl_s",
    "strategy": "dp, name, params",
    "rounds": ("batch_size, buffer, deadline_s, epochs, evaluate_every, interval_s, lr, max_staleness, min_devices, "
               "mode, num_rounds, staleness_exponent, wait_devices_s"),
    "training": "codec, density, download",
    "aggregation": "max_examples, median_multiple, weights",
    "defense": "centered_clipping, median_multiple, norm_bound",
    "blobs": "fetch_timeout_s, keep, max_mb, serve, serve_mb_per_s",
    "city": "audit_share, deadline_s, every, max_examples, momentum, rule",
    "enrollment": "allowlist, operator_keys, policy",
}
AGENT_KEYS = {
    "device": "enroll_retry_s, key, name, resend_s, state_dir, voucher",
    "gateway": "id, public_key, root_key",
    "broker": "host, password_file, port, tls_ca, tls_cert, tls_key, username",
    "data": "capacity, feature_window, features, labels, rate_hz, replay, retention_days, stride, test_fraction",
    "model": "freeze_window_s, name, path",
    "budget": "low_power_file, max_cpu_temp_c, max_samples, max_train_s, thermal_zone",
    "city": "genesis, prefer, rehome_after_s",
    "inference": "calibration_windows, every_s, min_calibration, mqtt, socket, threshold_quantile, windows",
    "personalization": "lr, steps, weights",
}


@pytest.mark.parametrize("parse, good, section, typo, known", [
    *[pytest.param(parse_gateway, GOOD_GATEWAY, section, typo, GATEWAY_KEYS[section], id=f"gateway {section}.{typo}")
      for section, typo in [
          ("gateway", "rotation"), ("broker", "tls-ca"), ("ledger", "checkpoint_evry"), ("ingest", "worker"),
          ("model", "manifest_path"), ("strategy", "param"), ("rounds", "num_round"), ("aggregation", "weight"),
          ("defense", "norm_bounds"), ("blobs", "keep_tags"), ("city", "evry"), ("enrollment", "operator_key"),
          ("training", "codecs")]],
    *[pytest.param(parse_agent, GOOD_AGENT, section, typo, AGENT_KEYS[section], id=f"agent {section}.{typo}")
      for section, typo in [
          ("device", "resend"), ("gateway", "rootkey"), ("broker", "hots"), ("data", "retention_s"),
          ("model", "freeze_window"), ("budget", "max_train"), ("city", "rehome_after"), ("inference", "every")]],
])
def test_a_misspelt_key_in_any_table_is_refused_naming_it_and_the_known_ones(parse, good, section, typo, known):
    # e.g. `[rounds] num_round = 100` would otherwise leave the run unbounded, silently
    with pytest.raises(ConfigError, match=re.escape(f"unknown key {section}.{typo}; known: {known}")):
        parse(with_(good, section, typo, 1))


@pytest.mark.parametrize("parse, good, name, value, match", [
    pytest.param(parse_gateway, GOOD_GATEWAY, "round", {"num_rounds": 5}, (
        r"unknown section \[round\]; known: aggregation, blobs, broker, city, defense, enrollment, gateway, ingest, "
        r"ledger, model, rounds, strategy, training$"), id="gateway [round]"),
    pytest.param(parse_gateway, GOOD_GATEWAY, "trainig", {}, r"unknown section \[trainig\]", id="gateway [trainig]"),
    pytest.param(parse_gateway, GOOD_GATEWAY, "num_rounds", 5,
                 r"unknown key num_rounds \(outside any section\); known: agg", id="gateway top-level key"),
    pytest.param(parse_agent, GOOD_AGENT, "sensors", [{"kind": "mpu6050"}],
                 r"unknown section \[sensors\]; known: broker, budget, city, data, device, gateway, inference, model, "
                 r"personalization, sensor$",
                 id="agent [[sensors]]"),
    pytest.param(parse_agent, GOOD_AGENT, "budgets", {"max_train_s": 1.0}, r"unknown section \[budgets\]",
                 id="agent [budgets]"),
])
def test_an_unknown_section_is_refused_naming_it_and_the_known_ones(parse, good, name, value, match):
    with pytest.raises(ConfigError, match=match):
        parse({**good, name: value})


def test_the_keys_read_only_when_present_are_known_and_taken():
    agent = parse_agent(with_(with_(GOOD_AGENT, "gateway", "root_key", "cd" * 32), "device", "voucher", "v.cbor"),
                        Path("/tmp"))
    assert agent.gateway_root_key == bytes.fromhex("cd" * 32) and agent.voucher == Path("/tmp/v.cbor")
    assert parse_gateway(with_(GOOD_GATEWAY, "gateway", "rotations", "chain.cbor"), Path("/tmp")).rotations == Path(
        "/tmp/chain.cbor")


def docstring_config(module) -> dict:
    """The example config in a config module's docstring (its indented lines), placeholders filled in."""
    lines = [line for line in module.__doc__.splitlines() if line.startswith("    ") or not line.strip()]
    text = textwrap.dedent("\n".join(lines))
    return tomllib.loads(text.replace("<64 hex chars>", "ab" * 32).replace("<64 hex>", "ab" * 32))


@pytest.mark.parametrize("module, parse, sections", [
    pytest.param(gateway_config, parse_gateway, set(GATEWAY_KEYS), id="gateway"),
    pytest.param(agent_config, parse_agent, {*AGENT_KEYS, "sensor"}, id="agent"),
])
def test_the_documented_example_configs_load(module, parse, sections, tmp_path):
    (tmp_path / "genesis.cbor").write_bytes(b"")  # the files the examples name (only their existence is checked)
    doc = docstring_config(module)
    assert set(doc) == sections  # the example shows every section
    parse(doc, tmp_path)
