"""What the agent costs a device: memory, CPU, a training step, idling, and the install.

    python bench/agent_footprint.py [--idle-s 60] [--skip-install] [--live]

The real `starling-agent` process (IMU CNN on LiteRT, one watch-data subject
replayed) goes through one federated round against a real gateway and
Mosquitto. With `--live` the agent samples a sensor at 50 Hz the whole time
(a replay sensor streaming the subject's windows, labels from a label file)
and trains on its sample store, prefilled with the subject's last 40 minutes
as a device that has been running would hold; idle CPU then includes sampling. Measured from /proc: the agent's peak RSS (VmHWM) and its CPU
seconds for the round; then its CPU use over `--idle-s` seconds of idling
(connected, no tasks). The train step time is the median of 50 `train`
signature calls at batch 32 in this process. install_mb is the size of a
fresh virtual environment holding only the `agent` extra (hw/install.sh into
a scratch root).

Prints {"peak_rss_mb", "cpu_s", "train_step_ms", "idle_cpu_pct", "install_mb", ...}.
Goals (issue 5): peak RSS <= 90 MB, idle CPU <= 1%, install <= 200 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from hw.broker import Broker, _child_env  # noqa: E402
from hw.datasets import load_watch_devices, save_device_npz  # noqa: E402
from protocol.keys import Identity  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def train_step_ms(steps: int = 50) -> float:
    from firmware_models.runtime import TrainableModel

    model = TrainableModel.from_package()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(model.batch_size, 128, 6)).astype(np.float32)
    y = rng.integers(0, 7, size=model.batch_size)
    model.train_step(x, y, 0.01)  # warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_step(x, y, 0.01)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def install_mb(work: Path) -> float:
    root = work / "install-root"
    replay = work / "device.npz"  # written by one_round
    done = subprocess.run(["bash", str(ROOT / "hw" / "install.sh"), "--gateway-id", "0" * 32, "--gateway-key",
                           "00" * 32, "--broker", "127.0.0.1", "--replay", str(replay), "--no-start"],
                          env={**os.environ, "STARLING_ROOT": str(root)}, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"install.sh failed: {done.stderr[-2000:]}")
    venv = root / "opt" / "starling" / "venv"
    return sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def live_data_config(work: Path, device) -> str:
    """[data] and [[sensor]] for live sampling, with the sample store prefilled and every window labelled."""
    from agent.sample_store import SampleStore

    stream = device.x_train.reshape(-1, 6)
    np.savez(work / "stream.npz", samples=stream)
    now = time.time()
    times = now - 1 - np.arange(len(stream))[::-1] / 50.0  # as sampled at 50 Hz up to a second ago
    (work / "agent").mkdir(exist_ok=True)
    with SampleStore(work / "agent" / "samples.db", channels=6) as store:
        store.append_many(times, stream)
    (work / "labels.csv").write_text(f"start,end,label\n{times[0] - 1},{now + 3600},1\n")
    return (f'[data]\nrate_hz = 50.0\nlabels = "{work / "labels.csv"}"\n'
            f'[[sensor]]\nkind = "replay"\npath = "{work / "stream.npz"}"\nrate_hz = 50.0\n')


def one_round(work: Path, idle_s: float, live: bool = False) -> dict[str, float]:
    device = load_watch_devices([1])[0]
    data = work / "device.npz"
    save_device_npz(device, data)
    data_config = live_data_config(work, device) if live else f'[data]\nreplay = "{data}"\n'

    gateway = Identity.generate()
    gateway.save(work / "gw.key")
    with Broker(work / "broker", kind="mosquitto") as broker:
        (work / "gw.toml").write_text(
            f'[gateway]\nname = "bench"\nkey = "gw.key"\nstate_dir = "gw"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
            '[strategy]\nname = "FedAvg"\nparams = { min_available_nodes = 1, min_train_nodes = 1, '
            "min_evaluate_nodes = 1 }\n"
            "[rounds]\nnum_rounds = 1\ndeadline_s = 300\nepochs = 1\nmin_devices = 1\nwait_devices_s = 120\n"
            '[enrollment]\npolicy = "open"\n[ledger]\ngossip = false\n'
        )
        (work / "agent.toml").write_text(
            f'[device]\nname = "bench"\nkey = "{work / "device.key"}"\nstate_dir = "{work / "agent"}"\n'
            f'[gateway]\nid = "{gateway.id}"\npublic_key = "{gateway.public_key.hex()}"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n' + data_config
        )
        env = _child_env()
        with open(work / "gateway.log", "wb") as glog, open(work / "agent.log", "wb") as alog:
            gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(work / "gw.toml")],
                                  cwd=ROOT, env=env, stdout=glog, stderr=subprocess.STDOUT)
            agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(work / "agent.toml")],
                                     cwd=ROOT, env=env, stdout=alog, stderr=subprocess.STDOUT)
            try:
                if gw.wait(600) != 0:
                    raise RuntimeError("the gateway failed: " + (work / "gateway.log").read_text()[-2000:])
                time.sleep(2.0)  # the last receipt and release settle
                round_cpu, peak = cpu_s(agent.pid), peak_rss_mb(agent.pid)
                print(f"round done: agent cpu {round_cpu:.1f} s, peak RSS {peak:.0f} MB; idling {idle_s:.0f} s",
                      file=sys.stderr, flush=True)
                before, start = cpu_s(agent.pid), time.monotonic()
                time.sleep(idle_s)
                idle = (cpu_s(agent.pid) - before) / (time.monotonic() - start) * 100
                peak = max(peak, peak_rss_mb(agent.pid))
            finally:
                agent.terminate()
                agent.wait(30)
                if gw.poll() is None:
                    gw.kill()
    return {"peak_rss_mb": round(peak, 1), "cpu_s": round(round_cpu, 2), "idle_cpu_pct": round(idle, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--skip-install", action="store_true", help="do not measure the install size")
    parser.add_argument("--live", action="store_true", help="sample a 50 Hz sensor and train on the sample store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("one round with the real agent process", file=sys.stderr, flush=True)
        figures = one_round(work, args.idle_s, args.live)
        figures["train_step_ms"] = round(train_step_ms(), 2)
        if not args.skip_install:
            print("installing the agent extra into a scratch root", file=sys.stderr, flush=True)
            figures["install_mb"] = round(install_mb(work), 1)
    figures["idle_s"] = args.idle_s
    figures["data"] = "live 50 Hz" if args.live else "replay"
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
