"""Product bugs the hostile suite found, one failing test each (strict xfail until fixed).

Each test states the behaviour the project promises (a refusal counted by
reason, a ConfigError naming the field) and shows the input that breaks it.
When a fix lands, its test passes, strict xfail turns that into a failure, and
the marker (and the matching filter in known_bugs.py) should go.
"""

from __future__ import annotations

import os
import time

import pytest
import world
from agent_rig import Rig, make_agent, refused_total
from test_config_files import AGENT_TOML, GATEWAY_TOML, ROOT

from agent.config import ConfigError
from agent.config import load_config as load_agent
from gateway.config import load_config as load_gateway
from hw.scenario import ScenarioError, load_scenario
from ledger import gossip as g
from ledger.store import Ledger
from mqttlink import Message
from protocol import cbor


def _tracebacks(watch) -> list[str]:
    lines = [f"{r.name} {r.getMessage()}" for r in watch.bad]
    watch.bad.clear()  # reported by this test's own assertion (an xfail), not again at teardown
    return lines


class Published(list):
    def __call__(self, topic, payload, retain):
        self.append((topic, payload))


def test_a_want_for_a_sequence_beyond_sqlite_integers_is_refused_as_schema(tmp_path, no_tracebacks_in_logs):
    ledger = Ledger(tmp_path / "a.db", world.GATEWAY)
    ledger.init_genesis("city", [world.GATEWAY.public_key])
    gossip = g.Gossip(ledger, world.GATEWAY.id, Published())
    gossip.handle(g.want_topic(world.GATEWAY.id),
                  cbor.dumps({"from": world.PEER.id, "creator": world.GATEWAY.id, "seq": 2**63}))
    ledger.close()
    logged = _tracebacks(no_tracebacks_in_logs)
    assert gossip.refused == {"schema": 1} and not logged, (gossip.refused, logged)


def test_a_snapshot_chunk_numbered_with_booleans_is_refused_as_schema(tmp_path):
    source = Ledger(tmp_path / "source.db", world.GATEWAY)
    genesis = source.init_genesis("city", [world.GATEWAY.public_key])
    source.enroll_device(world.DEVICE.public_key, "d", "open")
    source.write_checkpoint()
    source.enroll_device(world.HOSTILE.public_key, "h", "open")
    answers = Published()
    g.Gossip(source, world.GATEWAY.id, answers).handle(
        g.want_topic(world.GATEWAY.id), cbor.dumps({"from": world.PEER.id, "checkpoint": True}))
    ((topic, snapshot),) = answers
    doc = cbor.loads(snapshot)
    doc["chunk"] = False
    doc["chunks"] = True
    replica = Ledger(tmp_path / "replica.db", world.PEER)
    replica.insert_vertex(genesis)
    gossip = g.Gossip(replica, world.PEER.id, Published(), bootstrap_s=3600)
    gossip.handle(topic, cbor.dumps(doc))
    source.close()
    replica.close()
    assert gossip.refused == {"schema": 1} and gossip.bootstrapped_from is None


def test_a_task_is_saved_even_when_a_saved_task_vanishes_meanwhile(tmp_path, no_tracebacks_in_logs):
    agent = make_agent(tmp_path / "dev")
    tasks = agent.config.state_dir / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    # Deterministic stand-in for the race: a listed task file that is gone by the time it is stat'ed.
    os.symlink(tasks / "gone-meanwhile", tasks / ("0" * 32 + ".task"))
    agent._on_message(Message(agent.t_task, world.task(world.STRANGER), time.time()))
    logged = _tracebacks(no_tracebacks_in_logs)
    saved = [p for p in tasks.glob("*.task") if not p.is_symlink()]
    assert saved and not logged, logged


def test_a_task_id_that_is_no_safe_file_name_is_refused_and_counted(tmp_path, no_tracebacks_in_logs):
    agent = make_agent(tmp_path / "dev")
    rig = Rig(agent)
    try:
        rig.deliver(agent.t_task, world.task(world.DEVICE, task_id="train\x00-3", deadline=world.PAST))
        deadline = time.monotonic() + 5
        while refused_total(agent) < 1 and not no_tracebacks_in_logs.bad and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        rig.close()
    logged = _tracebacks(no_tracebacks_in_logs)
    assert refused_total(agent) == 1 and not logged, (agent.counters.refused_tasks, logged)


def _replace(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


CONFIG_CASES = [
    ("5: [[sensor]] kind as an array raises TypeError (unhashable) in agent/config.py _sensors",
     load_agent, ConfigError, lambda: _replace(AGENT_TOML, 'kind = "mpu6050"', 'kind = ["mpu6050"]')),
    ("6: a path setting with a NUL raises ValueError from Path.resolve (agent)",
     load_agent, ConfigError, lambda: _replace(AGENT_TOML, 'state_dir = "state"', 'state_dir = "st\\u0000ate"')),
    ("6: a path setting with a NUL raises ValueError from Path.resolve (gateway)",
     load_gateway, ConfigError, lambda: _replace(GATEWAY_TOML, 'state_dir = "state"', 'state_dir = "\\u0000"')),
    ("6: ledger.genesis longer than NAME_MAX raises OSError (File name too long) from is_file()",
     load_gateway, ConfigError, lambda: _replace(GATEWAY_TOML, 'genesis = ""', f'genesis = "{"a" * 300}"')),
    ("6: dataset.source with a NUL raises ValueError in hw/scenario.py",
     load_scenario, ScenarioError,
     lambda: _replace((ROOT / "hw/scenarios/quickstart.toml").read_text(), 'source = "watch"', 'source = "\\u0000"')),
    ("7: budget.max_samples = nan raises ValueError from int(nan) in agent/config.py _budget",
     load_agent, ConfigError, lambda: _replace(AGENT_TOML, "max_samples = 2000", "max_samples = nan")),
    ("7: budget.max_samples = 1e400 raises OverflowError from int(inf)",
     load_agent, ConfigError, lambda: _replace(AGENT_TOML, "max_samples = 2000", "max_samples = 1e400")),
    ("8: strategy.name = '../x' raises TypeError from importlib (relative import without a package)",
     load_gateway, ConfigError, lambda: _replace(GATEWAY_TOML, 'name = "FedAvg"', 'name = "../../etc/passwd"')),
    ("9: a top-level `data = 5` raises TypeError ('int' is not iterable) in agent parse_config",
     load_agent, ConfigError, lambda: "data = 5\n" + AGENT_TOML.replace("[data]\n", "[datax]\n")),
]


FIXED_CONFIG_BUGS = {"5", "6 agent", "6 gateway", "6 genesis", "6 scenario", "7", "8", "9"}


def _case_id(case: tuple) -> str:
    number = case[0].split(":")[0]
    if number == "6":
        return "6 " + next(w for w in ("agent", "gateway", "genesis", "scenario") if w in case[0] or
                           (w == "scenario" and "dataset.source" in case[0]))
    return number


@pytest.mark.parametrize("bug, load, error, text", [
    pytest.param(*case, id=_case_id(case), marks=() if _case_id(case) in FIXED_CONFIG_BUGS else
                 pytest.mark.xfail(strict=True, reason=f"BUG {case[0]}"))
    for case in CONFIG_CASES
])
def test_a_bad_config_value_is_a_config_error_not_a_crash(tmp_path, bug, load, error, text):
    path = tmp_path / "file.toml"
    path.write_text(text())
    with pytest.raises(error):
        load(path)
