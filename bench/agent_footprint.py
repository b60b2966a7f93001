"""What the agent costs a device: memory, CPU, a training step, inference, idling, and the install.

    python bench/agent_footprint.py [--idle-s 60] [--skip-install] [--live] [--no-inference]
                                    [--inference-every-s 10]

The real `starling-agent` process (IMU CNN on LiteRT, one watch-data subject
replayed) goes through one federated round against a real gateway and
Mosquitto. With `--live` the agent samples a sensor at 50 Hz the whole time
(a replay sensor streaming the subject's windows, labels from a label file)
and trains on its sample store, prefilled with the subject's last 40 minutes
as a device that has been running would hold; idle CPU then includes sampling.
Inference is on (unless `--no-inference`): `[inference] every_s` as the
config's default (10 s; `--inference-every-s` to stress it), its results read
from the local socket by a client the whole time, so peak RSS and CPU include
it. Measured from /proc: the agent's peak RSS (VmHWM) and its CPU
seconds for the round; then its CPU use over `--idle-s` seconds of idling
(connected, no tasks). The train step time is the median of 50 `train`
signature calls at batch 32 in this process; `inference_ms` the median of 200
`predict` calls on one window (the graph runs its batch of 32 regardless: the
cost of a window alone), `inference_ms_per_window_at_32` a full batch's median
divided by 32; `personalize_ms` the median of 5 tunings of a release with the
[personalization] defaults (`--personalize` also turns it on in the agent, once
per release: `personalized` counts them). install_mb is the size of a fresh virtual environment holding
only the `agent` extra (hw/install.sh into a scratch root).

Prints {"peak_rss_mb", "cpu_s", "train_step_ms", "inference_ms", "personalize_ms", "inference_runs", "idle_cpu_pct",
"install_mb", ...}. Goals (issue 5, 16): peak RSS <= 90 MB with inference on, idle CPU <= 1%,
install <= 200 MB, inference <= 5 ms per window.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.proc_usage import cpu_seconds, peak_rss_mb  # noqa: E402
from hw.broker import Broker, _child_env  # noqa: E402
from hw.datasets import load_watch_devices, save_device_npz  # noqa: E402
from protocol.keys import Identity  # noqa: E402


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


def inference_ms(calls: int = 200) -> tuple[float, float]:
    """IMU CNN `predict` in this process: the median ms for one window, and per window in a full batch."""
    from firmware_models.runtime import TrainableModel

    model = TrainableModel.from_package()
    x = np.random.default_rng(0).normal(size=(model.batch_size, 128, 6)).astype(np.float32)
    model.predict(x)  # warm up
    medians = []
    for batch in (x[:1], x):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            model.predict(batch)
            times.append((time.perf_counter() - start) * 1000)
        medians.append(statistics.median(times))
    return medians[0], medians[1] / len(x)


class Reader(threading.Thread):
    """A local consumer of the agent's results: connects to its socket (once it is there) and counts lines."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.lines, self.stop = path, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(str(self.path))
                    sock.settimeout(0.5)
                    while not self.stop.is_set():
                        try:
                            chunk = sock.recv(65536)
                        except TimeoutError:
                            continue
                        if not chunk:
                            break
                        self.lines += chunk.count(b"\n")
            except OSError:
                time.sleep(0.2)  # not listening yet


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


def personalize_ms(repeats: int = 5) -> float:
    """One [personalization] with its defaults (agent/personalize.py: 50 steps on the output layer) of the IMU
    CNN to a wearer's training windows, in this process: the median ms (once per release on a device)."""
    from agent.config import Personalization
    from agent.personalize import Personalizer
    from firmware_models.runtime import TrainableModel

    model = TrainableModel.from_package()
    device = load_watch_devices([1])[0]
    tuner, release = Personalizer(Personalization(), model, seed=0), model.get_weights()
    tuner.fit(release, device.x_train, device.y_train)  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tuner.fit(release, device.x_train, device.y_train)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def one_round(work: Path, idle_s: float, live: bool = False, inference_every_s: float = 10.0,
              personalize: bool = False) -> dict[str, float]:
    device = load_watch_devices([1])[0]
    data = work / "device.npz"
    save_device_npz(device, data)
    data_config = live_data_config(work, device) if live else f'[data]\nreplay = "{data}"\n'
    sock = work / "inference.sock"
    inference = inference_every_s > 0
    if inference:
        data_config += f'[inference]\nevery_s = {inference_every_s}\nsocket = "{sock}"\n'
        data_config += "[personalization]\n" if personalize else ""  # its defaults
    reader = Reader(sock)

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
            if inference:
                reader.start()
            try:
                if gw.wait(600) != 0:
                    raise RuntimeError("the gateway failed: " + (work / "gateway.log").read_text()[-2000:])
                time.sleep(2.0)  # the last receipt and release settle
                round_cpu, peak = cpu_seconds(agent.pid), peak_rss_mb(agent.pid)
                print(f"round done: agent cpu {round_cpu:.1f} s, peak RSS {peak:.0f} MB; idling {idle_s:.0f} s",
                      file=sys.stderr, flush=True)
                before, start = cpu_seconds(agent.pid), time.monotonic()
                time.sleep(idle_s)
                idle = (cpu_seconds(agent.pid) - before) / (time.monotonic() - start) * 100
                peak = max(peak, peak_rss_mb(agent.pid))
            finally:
                agent.terminate()
                agent.wait(30)
                reader.stop.set()
                if gw.poll() is None:
                    gw.kill()
    figures = {"peak_rss_mb": round(peak, 1), "cpu_s": round(round_cpu, 2), "idle_cpu_pct": round(idle, 3)}
    if inference:
        log = (work / "agent.log").read_text()
        figures["inference_runs"] = sum(1 for line in log.splitlines() if " inference.done " in line)
        figures["inference_lines_read"] = reader.lines
        if personalize:
            figures["personalized"] = sum(1 for line in log.splitlines() if " inference.personalized " in line)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--skip-install", action="store_true", help="do not measure the install size")
    parser.add_argument("--live", action="store_true", help="sample a 50 Hz sensor and train on the sample store")
    parser.add_argument("--no-inference", action="store_true", help="the agent without [inference]")
    parser.add_argument("--personalize", action="store_true", help="with [personalization] (its defaults)")
    parser.add_argument("--inference-every-s", type=float, default=10.0, help="[inference] every_s (default: "
                        "the config's default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("one round with the real agent process", file=sys.stderr, flush=True)
        every_s = 0.0 if args.no_inference else args.inference_every_s
        figures = one_round(work, args.idle_s, args.live, every_s, args.personalize and not args.no_inference)
        figures["train_step_ms"] = round(train_step_ms(), 2)
        one, per_window = inference_ms()
        figures["inference_ms"], figures["inference_ms_per_window_at_32"] = round(one, 3), round(per_window, 4)
        figures["personalize_ms"] = round(personalize_ms(), 1)
        if not args.skip_install:
            print("installing the agent extra into a scratch root", file=sys.stderr, flush=True)
            figures["install_mb"] = round(install_mb(work), 1)
    figures["idle_s"] = args.idle_s
    figures["data"] = "live 50 Hz" if args.live else "replay"
    figures["inference"] = "off" if args.no_inference else f"every {args.inference_every_s:g} s" + (
        ", personalized" if args.personalize else "")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
