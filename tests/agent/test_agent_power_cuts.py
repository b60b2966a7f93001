"""Power cuts: the real agent process killed (-9) at random points of its rounds, again and again.

Whatever the moment, the restarted agent must never send two different replies
to one task (the gateway would count `conflicting_reply`), never lose one (every
round has the device's update, once, in the ledger) and never leave a state it
cannot start from.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sqlite_utils", reason="the gateway side (ledger) is not in the agent-only environment")

from hw.broker import Broker, _child_env  # noqa: E402
from hw.datasets import load_watch_devices, save_device_npz  # noqa: E402
from ledger.store import Ledger  # noqa: E402
from protocol.keys import Identity  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3
KILLS = 10


@pytest.mark.parametrize("seed", [2026, 7])
def test_kill_9_at_random_moments_never_duplicates_loses_or_corrupts(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    save_device_npz(load_watch_devices([2])[0], tmp_path / "device.npz")
    gateway = Identity.generate()
    gateway.save(tmp_path / "gw.key")
    env = _child_env()
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        (tmp_path / "gw.toml").write_text(
            f'[gateway]\nname = "gw"\nkey = "gw.key"\nstate_dir = "gw"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
            '[strategy]\nname = "FedAvg"\nparams = { min_available_nodes = 1, min_train_nodes = 1, '
            "min_evaluate_nodes = 1 }\n"
            # 40 epochs: a round's training takes about a second, so kills land in it too
            f"[rounds]\nnum_rounds = {ROUNDS}\ndeadline_s = 120\nepochs = 40\nmin_devices = 1\nwait_devices_s = 120\n"
            '[enrollment]\npolicy = "open"\n[ledger]\ngossip = false\n'
        )
        (tmp_path / "agent.toml").write_text(
            f'[device]\nname = "d"\nkey = "{tmp_path / "device.key"}"\nstate_dir = "{tmp_path / "agent"}"\n'
            "resend_s = 1.0\nenroll_retry_s = 0.5\n"
            f'[gateway]\nid = "{gateway.id}"\npublic_key = "{gateway.public_key.hex()}"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[data]\nreplay = "{tmp_path / "device.npz"}"\n'
        )
        log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 (closed below)
        gw_log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115
        agent_cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(tmp_path / "agent.toml")]
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(tmp_path / "gw.toml")],
                              cwd=ROOT, env=env, stdout=gw_log, stderr=subprocess.STDOUT)
        agent, starts = None, 0
        try:
            for _ in range(KILLS):  # power cuts, at random moments of startup, enrollment, training, sending
                agent = subprocess.Popen(agent_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                starts += 1
                time.sleep(rng.uniform(0.3, 2.5))
                agent.kill()
                agent.wait(10)
                if gw.poll() is not None:
                    break
            agent = subprocess.Popen(agent_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            starts += 1
            assert gw.wait(240) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
            time.sleep(1.5)  # the last receipts reach the agent
            agent.terminate()
            assert agent.wait(30) == 0, "the agent stops cleanly after all those power cuts"
        finally:
            for process in (agent, gw):
                if process is not None and process.poll() is None:
                    process.kill()
            log.close()
            gw_log.close()
    result = json.loads((tmp_path / "gw" / "result.json").read_text())
    assert result["state"] == "done"
    assert "conflicting_reply" not in result["rejections"], result["rejections"]  # never two different replies
    assert [r["participants"] for r in result["rounds"] if r["round"] > 0] == [1] * ROUNDS  # never lost
    with Ledger.open(tmp_path / "gw" / "ledger.db", read_only=True) as ledger:
        batches = [v for v in ledger.vertices() if v.kind == "updates"]
    assert sorted(v.body["round"] for v in batches) == list(range(1, ROUNDS + 1))
    assert all(len(v.body["records"]) == 1 for v in batches)  # once each
    state = json.loads((tmp_path / "agent" / "state.json").read_text())  # not corrupted: it parses
    assert state["gateway"] == gateway.id
    assert not list((tmp_path / "agent" / "pending").glob("*.reply"))  # every reply was receipted
    assert starts >= 5 and (tmp_path / "agent.log").read_text().count("agent.start") <= starts
