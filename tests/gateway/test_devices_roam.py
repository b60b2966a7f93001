"""A device whose gateway is killed for good re-homes to another member of its city and trains there (issue 14).

Real processes on a real Mosquitto broker: two gateways (`starling-gateway run`) sharing one genesis and
gossiping their ledger, and two devices (`starling-agent run`, real TFLite training on watch data) homed at
gateway A. They know only the city's root key and A: the members come from A's retained membership
document. One device is revoked at A (`starling-ledger revoke`). A trains a round with the other, then is
killed (-9) and never comes back. Both devices re-home to B within the timeout (3 s); B admits the honest
one by its ledger enrollment and records its updates in B's next rounds; the revoked one B refuses, as A
would: revocation follows a device everywhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from required_tools import needs

from hw.broker import Broker, _child_env, find_mosquitto
from hw.city import write_genesis
from hw.datasets import load_watch_devices, save_device_npz
from ledger.store import Ledger
from protocol.keys import Identity

pytestmark = needs(find_mosquitto() is not None, "needs mosquitto (hw/install-system.sh)")

ROOT = Path(__file__).resolve().parents[2]
REHOME_AFTER_S = 3.0


def eventually(condition, timeout: float, what: str, logs: list[Path]) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tails}")
        time.sleep(0.2)


def gateway_toml(tmp: Path, name: str, broker: Broker, genesis: Path, interval_s: float) -> Path:
    (tmp / name).mkdir()
    path = tmp / f"{name}.toml"
    path.write_text(
        f'[gateway]\nname = "{name}"\nkey = "{name}.key"\nstate_dir = "{name}"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        '[strategy]\nname = "FedAvg"\nparams = { min_available_nodes = 1, min_train_nodes = 1, '
        "min_evaluate_nodes = 1 }\n"
        f"[rounds]\ninterval_s = {interval_s}\ndeadline_s = 20\nepochs = 1\nmin_devices = 1\nwait_devices_s = 120\n"
        "evaluate_every = 1000\n"
        '[enrollment]\npolicy = "open"\n'
        f'[ledger]\ngenesis = "{genesis}"\n'
    )
    return path


def agent_toml(tmp: Path, name: str, broker: Broker, home: Identity, root: Identity, data: Path) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f'[device]\nname = "{name}"\nkey = "{tmp / name}.key"\nstate_dir = "{tmp / name}"\n'
        "resend_s = 1.0\nenroll_retry_s = 0.5\n"
        f'[gateway]\nid = "{home.id}"\npublic_key = "{home.public_key.hex()}"\nroot_key = "{root.public_key.hex()}"\n'
        f"[city]\nrehome_after_s = {REHOME_AFTER_S}\n"
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[data]\nreplay = "{data}"\n'
    )
    return path


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=_child_env(), stdout=out,
                                stderr=subprocess.STDOUT)


def test_a_device_whose_gateway_is_killed_for_good_rehomes_and_trains_at_another_member(tmp_path: Path):
    a, b = Identity.generate(), Identity.generate()
    a.save(tmp_path / "a.key")
    b.save(tmp_path / "b.key")
    genesis = write_genesis(tmp_path / "city", "harbour", [a.public_key, b.public_key])
    root = Identity.load(tmp_path / "city" / "operator.key")
    save_device_npz(load_watch_devices([2])[0], tmp_path / "device.npz")
    honest, thief = Identity.generate(), Identity.generate()
    honest.save(tmp_path / "honest.key")
    thief.save(tmp_path / "thief.key")
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "honest", "thief")}
    processes: dict[str, subprocess.Popen] = {}
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        try:
            for name, interval in (("a", 0), ("b", 0.5)):  # both serve until stopped
                conf = gateway_toml(tmp_path, name, broker, genesis, interval)
                processes[name] = start(["gateway.cli", "run", "--config", str(conf)], logs[name])
            for name in ("honest", "thief"):
                conf = agent_toml(tmp_path, name, broker, a, root, tmp_path / "device.npz")
                processes[name] = start(["agent.cli", "run", "--config", str(conf)], logs[name])

            # The thief enrolls at A and the operator revokes it there; gossip carries that to B.
            eventually(lambda: "enroll.accepted" in logs["thief"].read_text(), 60, "the thief enrolled at A",
                       list(logs.values()))
            revoked = subprocess.run(
                [sys.executable, "-m", "ledger.cli", "revoke", "--db", str(tmp_path / "a" / "ledger.db"),
                 "--key", str(tmp_path / "a.key"), "--device", thief.public_key.hex(), "--reason", "stolen"],
                cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=60, check=False)
            assert revoked.returncode == 0, revoked.stderr

            def b_knows(check) -> bool:
                try:
                    with Ledger.open(tmp_path / "b" / "ledger.db", read_only=True) as ledger:
                        return check(ledger)
                except Exception:  # noqa: BLE001 (not created yet, or busy: look again)
                    return False

            # A trains a round with the honest device; the device has A's membership document; B knows both devices.
            eventually(lambda: re.search(r"receipt\.accepted round=[1-9]", logs["honest"].read_text()) is not None,
                       60, "A accepted a training update of the honest device", list(logs.values()))
            eventually(lambda: (tmp_path / "honest" / "members.cbor").exists(), 10, "the device learned the members",
                       list(logs.values()))
            eventually(lambda: b_knows(lambda lg: lg.is_revoked(thief.public_key)
                                       and lg.is_enrolled(honest.public_key)), 20,
                       "B learned the enrollment and the revocation", list(logs.values()))

            processes["a"].kill()  # for good: A is never started again
            processes["a"].wait(10)
            killed = time.monotonic()

            eventually(lambda: "agent.rehomed" in logs["honest"].read_text(), REHOME_AFTER_S + 20,
                       "the honest device re-homed", list(logs.values()))
            rehomed = time.monotonic() - killed
            line = next(x for x in logs["honest"].read_text().splitlines() if "agent.rehomed" in x)
            assert f"from={a.id}" in line and f"to={b.id}" in line, line
            quiet = float(re.search(r"after_s=([0-9.]+)", line).group(1))  # since A last spoke to it
            assert REHOME_AFTER_S <= quiet < REHOME_AFTER_S + 2, line
            assert rehomed < REHOME_AFTER_S + 5  # the device cannot know when A died, only when it last spoke

            # B's next rounds record the roamer's updates; B refuses the revoked one, as A would. The device
            # trains deterministically, so B's round 1 (from the genesis model, as A's was) may get the very update
            # A's round 1 recorded: the ledger holds it once, and B logs it as known instead of writing it again.
            def on_record_at_b(round_: int, ledger: Ledger) -> bool:
                return round_ in {v.body["round"] for v in ledger.vertices_of("updates") if v.creator == b.public_key} \
                    or f"ledger.record_known round={round_} device={honest.id}" in logs["b"].read_text()

            eventually(lambda: b_knows(lambda lg: all(on_record_at_b(r, lg) for r in (1, 2, 3))), 60,
                       "B recorded three rounds of updates", list(logs.values()))
            eventually(lambda: "enroll.refused reason=revoked" in logs["thief"].read_text(), 20,
                       "B refused the revoked device", list(logs.values()))
            for name in ("b", "honest", "thief"):
                processes[name].terminate()
            for name in ("b", "honest", "thief"):
                assert processes[name].wait(60) == 0, f"{name} stops cleanly\n{logs[name].read_text()[-3000:]}"
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait(10)

    result = json.loads((tmp_path / "b" / "result.json").read_text())
    assert result["state"] == "stopped", result
    trained = [r for r in result["rounds"] if r["round"] > 0 and r["participants"]]
    assert [(r["round"], r["participants"]) for r in trained[:3]] == [(1, 1), (2, 1), (3, 1)], result["rounds"]
    assert result["enroll_rejections"].get("revoked", 0) >= 1, result["enroll_rejections"]
    recorded = {}
    for name, creator in (("a", a), ("b", b)):
        with Ledger.open(tmp_path / name / "ledger.db", read_only=True) as ledger:
            recorded[name] = [(v.body["round"], record[0]) for v in ledger.vertices_of("updates")
                              if v.creator == creator.public_key for record in v.body["records"]]
    assert honest.public_key in {device for _, device in recorded["a"]}  # A trained with it ...
    first = [(r, d) for r, d in recorded["b"] if r <= 3]  # ... then B's next rounds did (a repeat of A's is known)
    assert first == [(r, honest.public_key) for r in (1, 2, 3) if r != 1 or "ledger.record_known round=1" not in
                     logs["b"].read_text()], recorded["b"][:3]
    assert {device for _, device in recorded["b"]} == {honest.public_key}  # never the revoked one
    home = json.loads((tmp_path / "honest" / "home.json").read_text())
    assert (home["gateway"], home["previous"], home["configured"]) == (b.id, a.id, a.id)
    assert json.loads((tmp_path / "honest" / "state.json").read_text())["gateway"] == b.id
    assert "model_rollback" not in logs["honest"].read_text()  # B's lineage is behind A's: taken as the new home's
