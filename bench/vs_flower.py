"""Starling side by side with Flower's own deployment runtime, on the same task, 3 seeds a side; prints JSON.

    python bench/vs_flower.py                                   # 10 devices, 5 rounds, 3 seeds: ~30 min on 2 cores
    python bench/vs_flower.py --devices 2 --rounds 1 --seeds 1  # smoke size, about 1.5 min

The task, identical on every side: the watch data (subjects 1..N, one per
device, the very `.npz` files the Starling emulator writes, stride 64), the
IMU CNN (the shipped `.tflite`, trained through the LiteRT interpreter by
`firmware_models.runtime.TrainableModel`), FedAvg with every device training
and evaluating every round, R rounds, the Starling quickstart's local
training (2 epochs, lr 0.2, batch 32); accuracy is the test-example-weighted
mean of each device's accuracy on its own test windows.

Three sides (issue 17), each run once per seed (--seeds, default 3). Seed k
sets every device's shuffling, identically on every side: it makes the Starling
devices' keys, each agent seeds round r's shuffles with (its key's seed, r)
(agent/learner.py `round_rng`), and the Flower ClientApp of the same device gets
that seed as its node `seed` and does the same. Both train loops cut batches
alike, so the sides' kth runs are paired: they differ by what the runtimes do
(int8 uploads, capped weights, compact downloads), not by the shuffles' luck:

1. `flower`: Flower as it ships, subprocess isolation (its default):
   `flower-superlink --insecure` (it starts `flower-superexec`, which starts
   `flwr-serverapp`) and N `flower-supernode --insecure` on loopback, each
   starting its own `flower-superexec`, which starts a new `flwr-clientapp`
   process for every message (train, evaluate) that imports Flower, LiteRT,
   the model and the data again. The Flower App in `bench/flower_app/` is
   submitted with `flwr run`: a ServerApp running `flwr.serverapp.strategy.FedAvg`
   and a ClientApp that trains with `TrainableModel.train_epochs` and replies
   with the trained weights as float32 (Flower's default).
2. `flower_process`: the same deployment with `--isolation process` on the
   SuperLink and on every SuperNode: they start no app process; the bench
   starts, as Flower's process-isolation guide has the operator do, one
   `flower-superexec --runtime-api-address <its Runtime API> --insecure` per
   SuperNode (and one for the SuperLink's ServerApp). In flwr 1.42 that is
   what process isolation is: `flwr-clientapp` takes a one-task `--token` and
   exits after one message, and SuperExec's subprocess executor (the only
   local one; warm pools are Kubernetes-only, not for ClientApps) starts one
   per message. So a ClientApp still starts per message here too; what
   differs is who starts it. `devices_processes` counts the ClientApp
   processes of each side.
3. `starling`: one Mosquitto, one gateway (`python -m gateway.cli run`, the
   same Flower FedAvg over its MQTT grid, Ed25519-signed messages, the ledger),
   N agents (`python -m agent.cli run`) replaying the same files, with the
   gateway's defaults: devices send int8 weight deltas (`[training] codec =
   "i8"`), and each new model reaches them as a signed int8 delta from the one
   before (`download = "i8"`; the full float32 model stays retained as the
   fallback). The first model is the family's initial weights, which every
   agent was started with: no device downloads it.

What is measured, the same way on every side:
- Bytes on the wire: every device connection goes through a counting TCP
  relay in this process (hw.links.LinkRelay with no impairment and a byte
  tap; supernodes -> relay -> SuperLink; agents -> relay -> Mosquitto).
  Counted: all TCP payload bytes of the device connections both ways, i.e.
  HTTP / MQTT framing and headers included, TCP/IP packet headers not. The
  server's internal connections (ServerApp and its SuperExec -> SuperLink,
  `flwr run` -> Control API; gateway -> Mosquitto) and each device's own
  loopback ones (ClientApp and SuperExec -> SuperNode) are not counted.
- The round window: Flower from the ServerApp's `evaluate_fn` call before
  round 1 to its call after round R's evaluation (start-up, node registration
  and the ServerApp's imports are outside it, the FAB download is inside it).
  Starling from the start of the gateway's round 0 (which distributes and
  evaluates the initial model; Flower sends the initial model in round 1's
  train messages) to the end of round R (the gateway's `round.done` log
  lines, which it writes as a round closes). Bytes and seconds per
  round are the window's totals divided by R, so Starling's round 0 is charged
  to Starling; `rounds_1_to_n` shows Starling without it.
- Server CPU seconds and peak RSS from /proc (utime+stime of
  /proc/<pid>/stat, VmHWM of /proc/<pid>/status: bench/proc_usage.py's
  Sampler, following each process tree), sampled every 0.2 s over the
  whole life of the processes, start-up included. Flower: `flower-superlink`
  and all its descendants (`flower-superexec`, `flwr-serverapp`); with
  process isolation the ServerApp's `flower-superexec` and its
  `flwr-serverapp` too. Starling: the gateway process and its descendants
  and Mosquitto (as the SuperLink is Flower's broker); `broker_cpu_s` and
  `broker_peak_rss_mb` show Mosquitto's share. Peak RSS is the sum of the
  counted processes' VmHWM. `server_cpu_s_window` is the CPU spent inside the
  round window. The devices' processes are not counted as server; their CPU
  (supernodes, their superexecs and every `flwr-clientapp`; agents) is
  `devices_cpu_s`, `devices_peak_rss_mb` the largest sum of their VmRSS seen
  in one sample, `devices_processes` per program (count, CPU, summed VmHWM).
- `idle_bytes_per_s`: what the devices exchange while no round runs, over
  --idle-s seconds (Flower: registered nodes polling before `flwr run`;
  Starling: agents connected after the gateway exits).

Output, one JSON line on stdout: `{"config", "flower", "flower_process",
"starling", "ratio", "goals", "runs"}`. Each side's entry is over its seeds:
means of `bytes_per_round` {up, down, total}, `seconds_per_round`,
`final_accuracy`, server and device figures, and `spread` ({mean, min, max,
std, values} of bytes per round, seconds per round, final accuracy); `runs`
holds every run's full figures with per-round detail. `ratio` is Starling's
mean over each baseline's mean (`ratio.flower`, `ratio.flower_process`).
Goals (issue 17): bytes per round <= 0.15x of both baselines; Starling's mean
final accuracy >= each baseline's mean - 0.01; seconds per round <= 0.5x of
`flower_process` (the summaries over the seeds, `ratio`, `goals` and the
table: bench/vs_flower_summary.py). Progress and a summary table go to stderr. Every process
started is stopped, also on failure or SIGTERM; every wait is bounded
(--timeout-s per run). The runs go seed by seed, the sides in turn, so that
a slow spell of the machine touches every side. All sides' devices share this
machine's cores: on 2 cores, 10 devices' per-message ClientApp processes
dominate Flower's round time.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proc_usage import Sampler, Usage, alive, tree  # noqa: E402
from bench.vs_flower_summary import SIDES, judge, summarize, table  # noqa: E402
from hw.broker import Broker, _child_env, free_port  # noqa: E402
from hw.emulate import prepare_devices  # noqa: E402
from hw.fleet import Process  # noqa: E402
from hw.links import LinkRelay  # noqa: E402
from hw.scenario import Scenario  # noqa: E402
from hw.toml_files import write_toml  # noqa: E402

FLOWER_APP = ROOT / "bench" / "flower_app"
SAMPLE_S = 0.2
PROGRAMS = ("flower-", "flwr-", "mosquitto")  # named by these in server_processes, devices_processes


def say(text: str) -> None:
    print(f"vs_flower: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- bytes on the wire


class CountingRelay(LinkRelay):
    """hw.links.LinkRelay without impairment, timestamping every chunk it relays (`up`: device -> server)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[float, int, int]] = []  # (time, +up, +down), appended in time order
        super().__init__(target, tap=self._count)

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self.events.append((time.time(), n, 0) if direction == "up" else (time.time(), 0, n))

    @property
    def connections(self) -> int:
        return self.stats.connections

    def totals(self, start: float = 0.0, end: float = float("inf")) -> tuple[int, int]:
        """Bytes (up, down) relayed in [start, end)."""
        with self._lock:
            events = list(self.events)
        times = [e[0] for e in events]
        lo, hi = bisect.bisect_left(times, start), bisect.bisect_left(times, end)
        return sum(e[1] for e in events[lo:hi]), sum(e[2] for e in events[lo:hi])


# --------------------------------------------------------------------------- processes
# (started and stopped here; their CPU and memory are sampled by bench/proc_usage.py's Sampler)


class Processes:
    """Every process of one run (hw.fleet.Process), each stopped with its descendants at the end."""

    def __init__(self) -> None:
        self.procs: list[Process] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = Process(cmd, log, env)
        proc.start()
        self.procs.append(proc)
        return proc.popen

    def close(self, timeout: float = 15.0) -> None:
        """SIGTERM every process (the roots, then their leftover descendants); SIGKILL after `timeout`."""
        popens = [p.popen for p in self.procs if p.popen is not None]
        family: list[int] = []
        for p in popens:
            family += [pid for pid in tree(p.pid) if pid != p.pid]
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in popens:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        # Descendants (superexecs, app processes) that outlived their parent: by pid, the ones we saw.
        left = [pid for pid in family if alive(pid)]
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 5.0
        while left and time.monotonic() < end:
            time.sleep(0.1)
            left = [pid for pid in left if alive(pid)]
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.procs = []


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout:.0f} s; see {log}")


def _exited(proc: subprocess.Popen) -> bool:
    """True once `proc` has exited (a zombie keeps its /proc entry, and its CPU, until it is reaped)."""
    return proc.returncode is not None or not alive(proc.pid)


# --------------------------------------------------------------------------- figures


def _per_round(relay: CountingRelay, bounds: list[float]) -> list[dict[str, Any]]:
    rows = []
    for i in range(1, len(bounds)):
        up, down = relay.totals(bounds[i - 1], bounds[i])
        rows.append({"seconds": round(bounds[i] - bounds[i - 1], 3), "bytes_up": up, "bytes_down": down})
    return rows


def _figures(relay: CountingRelay, usage: dict[str, Usage], bounds: list[float],
             rounds: int) -> dict[str, Any]:
    """Per-round figures from the window [bounds[0], bounds[-1]] divided by `rounds`."""
    start, end = bounds[0], bounds[-1]
    up, down = relay.totals(start, end)
    before = relay.totals(0.0, start)
    server, devices = usage["server"], usage.get("devices", Usage())
    return {
        "bytes_per_round": {"up": round(up / rounds), "down": round(down / rounds),
                            "total": round((up + down) / rounds)},
        "seconds_per_round": round((end - start) / rounds, 3),
        "window_s": round(end - start, 3),
        "bytes_before_window": {"up": before[0], "down": before[1]},
        "server_cpu_s": round(server.cpu_s(), 2),
        "server_cpu_s_window": round(max(0.0, server.cpu_at(end + SAMPLE_S) - server.cpu_at(start)), 2),
        "server_peak_rss_mb": round(server.peak_rss_mb(), 1),
        "server_processes": server.by_process(),
        "devices_cpu_s": round(devices.cpu_s(), 2),
        "devices_peak_rss_mb": round(devices.rss_peak_kb / 1024, 1),
        "devices_processes": devices.by_process(),
        "device_connections": relay.connections,
    }


def _idle_rate(relay: CountingRelay, seconds: float) -> float | None:
    """Bytes per second between devices and server while no round runs (polls, heartbeats, pings)."""
    if seconds <= 0:
        return None
    start = time.time()
    time.sleep(seconds)
    up, down = relay.totals(start, time.time())
    return round((up + down) / seconds, 1)


def _finish(sampler: Sampler, procs: Processes) -> None:
    sampler.sample()  # the last CPU figures before anything is stopped
    procs.close()


# --------------------------------------------------------------------------- Flower


def _flower_env(home: Path) -> dict[str, str]:
    env = _child_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    })
    return env


def _flower_exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (pip install 'flwr>=1.41')")
    return found


def _flower_wait_registered(link_log: Path, count: int, superlink: subprocess.Popen, end: float) -> None:
    while link_log.read_text(errors="replace").count("Activated node_id") < count:
        if time.monotonic() > end:
            raise TimeoutError(f"the supernodes did not all register in time; see {link_log.parent}")
        if superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {superlink.returncode}; see {link_log}")
        time.sleep(0.2)


def _flower_wait_done(label: str, out_file: Path, superlink: subprocess.Popen, sampler: Sampler, rounds: int,
                      deadline: float) -> dict[str, Any]:
    """Wait for the ServerApp's results, showing its rounds as they end; fail fast if it died."""
    progress = Path(str(out_file) + ".progress")
    shown = 0
    while not out_file.exists():
        with contextlib.suppress(OSError, ValueError):
            marks = [json.loads(line) for line in progress.read_text().splitlines()]
            for m in marks[shown:]:
                r = m["round"]
                took = "starts" if r == 0 else f"{m['time'] - marks[r - 1]['time']:.1f} s"
                say(f"{label}: round {r}/{rounds} {took}")
            shown = len(marks)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Flower run did not finish in time; see {out_file.parent}/logs")
        if superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited ({superlink.returncode}); see {out_file.parent}")
        apps = [pid for pid, name in sampler.names("server").items() if name == "flwr-serverapp"]
        if apps and not any(alive(pid) for pid in apps):
            time.sleep(3)  # it writes its results just before it exits
            if not out_file.exists():
                raise RuntimeError(f"the ServerApp ended without results; see {out_file.parent}/logs")
        time.sleep(0.2)
    return json.loads(out_file.read_text())


def run_flower(devices: list[tuple[str, Path]], args: argparse.Namespace, workdir: Path, seed: int,
               isolation: str = "subprocess") -> dict[str, Any]:
    """One Flower run; `isolation` "process": the bench starts the SuperExecs that start the app processes."""
    import flwr

    label = "flower" if isolation == "subprocess" else "flower_process"
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    env = _flower_env(home)
    logs = workdir / "logs"
    link_log = logs / "superlink.log"
    out_file = workdir / "serverapp.json"
    port = free_port()
    write_toml(home / "config.toml", {"superlink": {"default": "bench",
                                                     "bench": {"address": f"127.0.0.1:{port}", "insecure": True}}})
    deadline = time.monotonic() + args.timeout_s
    superexec = [_flower_exe("flower-superexec"), "--insecure", "--runtime-api-address"]
    with contextlib.ExitStack() as stack:
        sampler = stack.enter_context(Sampler(SAMPLE_S, PROGRAMS))
        procs = Processes()
        stack.callback(_finish, sampler, procs)
        superlink = procs.start([_flower_exe("flower-superlink"), "--insecure", "--isolation", isolation,
                                 "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation"], link_log, env)
        sampler.watch("server", superlink.pid)
        _wait_port(port, 60, superlink, "flower-superlink", link_log)
        if isolation == "process":  # the ServerApp's SuperExec, beside the SuperLink, on its Runtime API
            sampler.watch("server", procs.start(superexec + [f"127.0.0.1:{port}"],
                                                logs / "superexec-serverapp.log", env).pid)
        relay = stack.enter_context(CountingRelay(("127.0.0.1", port)))
        stack.callback(_finish, sampler, procs)  # the processes stop before the relay closes
        say(f"{label} (flwr {flwr.__version__}, --isolation {isolation}): superlink on 127.0.0.1:{port}, "
            f"{len(devices)} supernodes through the counting relay :{relay.port}")
        for i, (name, data) in enumerate(devices):
            runtime_port = free_port()
            node = procs.start([_flower_exe("flower-supernode"), "--insecure", "--isolation", isolation,
                                "--superlink", f"127.0.0.1:{relay.port}", "--port", str(runtime_port),
                                "--node-config", f'data="{data}" seed={_device_seed(seed, name)} name="{name}"'],
                               logs / f"supernode-{name}.log", env)
            sampler.watch("devices", node.pid)
            if isolation == "process":  # the device's SuperExec: it starts a flwr-clientapp per message
                _wait_port(runtime_port, 60, node, f"flower-supernode {name}", logs / f"supernode-{name}.log")
                sampler.watch("devices", procs.start(superexec + [f"127.0.0.1:{runtime_port}"],
                                                     logs / f"superexec-{name}.log", env).pid)
        _flower_wait_registered(link_log, len(devices), superlink, min(deadline, time.monotonic() + 120))
        idle = _idle_rate(relay, args.idle_s)
        say(f"{label}: {len(devices)} supernodes registered (idle: {idle} B/s); flwr run bench/flower_app")
        run_config = (f"num-server-rounds={args.rounds} min-nodes={len(devices)} local-epochs={args.epochs} "
                      f"lr={args.lr} batch-size={args.batch_size} round-timeout-s={float(args.timeout_s)} "
                      f'out="{out_file}"')
        submitted = subprocess.run([_flower_exe("flwr"), "run", str(FLOWER_APP), "bench",
                                    "--run-config", run_config, "--format", "json"],
                                   env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
        if submitted.returncode != 0:
            raise RuntimeError(f"flwr run failed: {submitted.stdout[-2000:]} {submitted.stderr[-2000:]}")
        result = _flower_wait_done(label, out_file, superlink, sampler, args.rounds, deadline)
        sampler.sample()
        marks = [result["marks"][str(r)] for r in range(args.rounds + 1)]
        figures = _figures(relay, sampler.usage, marks, args.rounds)
        per_round = _per_round(relay, marks)
    accuracy = [result["accuracy"][str(r)] for r in range(1, args.rounds + 1)]
    for r, row in enumerate(per_round, start=1):
        row["round"] = r
        row["accuracy"] = round(accuracy[r - 1], 4)
    starts = ("the SuperLink and each SuperNode start their own flower-superexec" if isolation == "subprocess"
              else "the bench starts a flower-superexec for the SuperLink and one per SuperNode")
    return {
        "runtime": f"flwr {flwr.__version__}: flower-superlink --insecure --isolation {isolation} + "
                   f"{len(devices)} flower-supernode --insecure --isolation {isolation}, flwr run "
                   f"bench/flower_app; {starts}, which starts a flwr-clientapp process per message",
        "update": "float32 weights (Flower's ArrayRecord); the full model goes down twice a round "
                  "(train and evaluate messages)",
        "seed": seed,
        **figures,
        "idle_bytes_per_s": idle,
        "final_accuracy": round(accuracy[-1], 4),
        "rounds": per_round,
    }


def run_flower_process(devices: list[tuple[str, Path]], args: argparse.Namespace, workdir: Path,
                       seed: int) -> dict[str, Any]:
    return run_flower(devices, args, workdir, seed, isolation="process")


# --------------------------------------------------------------------------- Starling


class StatusWatch:
    """Follows the gateway's retained status topic; notes when each round is complete (its evaluation in)."""

    def __init__(self, port: int, gateway_id: str, rounds: int) -> None:
        from mqttlink import Connection, ConnectionOptions
        from protocol import topics

        self.rounds = rounds
        self.done_at: dict[int, float] = {}
        self.history: list[dict[str, Any]] = []
        self.state = "starting"
        options = ConnectionOptions(f"vs-flower-{os.getpid()}", "127.0.0.1", port, clean_session=True,
                                    subscriptions=((topics.status(gateway_id), 1),))
        self.conn = Connection(options, deliver=self._on_message).start()

    def _on_message(self, msg) -> None:
        now = msg.at
        try:
            status = json.loads(msg.payload)
        except ValueError:
            return
        self.state = status.get("state", self.state)
        self.history = status.get("history", self.history)
        finished = self.state in ("done", "stopped", "failed")
        for i, record in enumerate(self.history):
            r = record["round"]
            complete = record["accuracy"] is not None or i + 1 < len(self.history) or finished
            if r not in self.done_at and complete:
                self.done_at[r] = now
                acc = record["accuracy"]
                say(f"starling: round {r}/{self.rounds} accuracy {'-' if acc is None else f'{acc:.3f}'} "
                    f"participants {record['participants']} {record['seconds']:.1f} s")

    def close(self) -> None:
        self.conn.close()


ROUND_DONE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z? .*\bround\.done round=(\d+)\b")


def gateway_round_ends(log: Path) -> dict[int, float]:
    """When each round ended, from the gateway's own `round.done` log lines (UTC timestamps, ms).

    The log line is written as the round closes, before the status topic is
    published (which can lag behind by the ledger work), so it is the better clock.
    """
    ends: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            match = ROUND_DONE.match(line)
            if match:
                stamp = datetime.fromisoformat(match.group(1)).replace(tzinfo=timezone.utc)
                ends.setdefault(int(match.group(2)), stamp.timestamp())
    return ends


def _seeded_identity(seed: int, who: str):
    """An Ed25519 identity from the run's seed: agents seed their shuffles from their key (agent/cli.py)."""
    from protocol.keys import Identity

    return Identity.from_seed(hashlib.sha256(f"bench/vs_flower seed {seed} {who}".encode()).digest())


def _device_seed(seed: int, name: str) -> int:
    """A device's shuffle seed, the same on every side: the seed its Starling agent derives from its key
    (agent/learner.py). Both sides then draw each round's shuffles from (this seed, the round), so the kth
    runs of the sides are paired: what differs between them is the runtime, not the luck of the shuffles."""
    from agent.learner import device_seed

    return device_seed(_seeded_identity(seed, name).node_id)


def _starling_configs(workdir: Path, gateway, gateway_key: Path, broker: Broker, relay_port: int,
                      devices: list[tuple[str, Path]], args: argparse.Namespace,
                      seed: int) -> tuple[Path, list[Path]]:
    """The gateway's config (talking to the broker directly) and one per agent (through the relay)."""
    n = len(devices)
    conf = workdir / "gateway" / "gateway.toml"
    write_toml(conf, {
        "gateway": {"name": "gw-1", "key": str(gateway_key), "state_dir": str(workdir / "gateway")},
        "broker": {"host": broker.host, "port": broker.port},
        "strategy": {"name": "FedAvg",
                     "params": {"min_available_nodes": n, "min_train_nodes": n, "min_evaluate_nodes": n}},
        "rounds": {"num_rounds": args.rounds, "deadline_s": args.deadline_s, "epochs": args.epochs,
                   "batch_size": args.batch_size, "lr": args.lr, "min_devices": n, "wait_devices_s": 120.0},
        "enrollment": {"policy": "open"},  # as in the emulator: the devices are our own
    })
    agents = []
    for name, data in devices:
        home = workdir / "devices" / name
        home.mkdir(parents=True, exist_ok=True)
        _seeded_identity(seed, name).save(home / "device.key")
        write_toml(home / "agent.toml", {
            "device": {"name": name, "key": str(home / "device.key"), "state_dir": str(home / "state")},
            "gateway": {"id": gateway.id, "public_key": gateway.public_key.hex()},
            "broker": {"host": "127.0.0.1", "port": relay_port},
            "data": {"replay": str(data)},
        })
        agents.append(home / "agent.toml")
    return conf, agents


def run_starling(devices: list[tuple[str, Path]], args: argparse.Namespace, workdir: Path,
                 seed: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    env = _child_env()
    logs = workdir / "logs"
    gw_log = logs / "gateway.log"
    deadline = time.monotonic() + args.timeout_s
    gateway = _seeded_identity(seed, "gateway")
    gateway_key = workdir / "gateway" / "gateway.key"
    gateway_key.parent.mkdir(parents=True, exist_ok=True)
    gateway.save(gateway_key)
    with contextlib.ExitStack() as stack:
        sampler = stack.enter_context(Sampler(SAMPLE_S, PROGRAMS))
        broker = stack.enter_context(Broker(workdir / "broker", kind=args.broker))
        sampler.watch("broker", broker.process.pid)
        sampler.watch("server", broker.process.pid)  # Mosquitto counts as server, as the SuperLink does
        relay = stack.enter_context(CountingRelay((broker.host, broker.port)))
        procs = Processes()
        stack.callback(_finish, sampler, procs)  # the processes stop before the relay and the broker do
        say(f"starling: {broker.kind} broker on 127.0.0.1:{broker.port}, 1 gateway, {len(devices)} agents "
            f"through the counting relay :{relay.port}")
        conf, agents = _starling_configs(workdir, gateway, gateway_key, broker, relay.port, devices, args, seed)
        watch = StatusWatch(broker.port, gateway.id, args.rounds)
        stack.callback(watch.close)
        gw = procs.start([sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)], gw_log, env)
        sampler.watch("server", gw.pid)
        for agent in agents:
            node = procs.start([sys.executable, "-m", "agent.cli", "run", "--config", str(agent)],
                               logs / f"agent-{agent.parent.name}.log", env)
            sampler.watch("devices", node.pid)
        while not _exited(gw):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Starling run did not finish in {args.timeout_s:.0f} s; see {logs}")
            time.sleep(0.1)
        sampler.sample()  # the gateway's final CPU, read from its zombie before it is reaped
        gw.wait(10)
        idle = _idle_rate(relay, args.idle_s)  # agents still connected, no gateway: MQTT keep-alives only
        end = time.monotonic() + 5
        while args.rounds not in watch.done_at and time.monotonic() < end:
            time.sleep(0.05)
        result_file = workdir / "gateway" / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if result.get("state") != "done":
            raise RuntimeError(f"the gateway ended in state {result.get('state', 'unknown')!r} "
                               f"(exit {gw.returncode}); see {gw_log}")
        records = {r["round"]: r for r in result["rounds"]}
        ends, clock = gateway_round_ends(gw_log), "gateway log"
        if not all(r in ends for r in range(args.rounds + 1)):
            ends, clock = watch.done_at, "status topic"  # the log format changed: when the status arrived
        start0 = ends[0] - records[0]["seconds"]  # round 0 starts as its evaluation tasks go out
        bounds = [start0] + [ends[r] for r in range(0, args.rounds + 1)]
        sampler.sample()
        figures = _figures(relay, sampler.usage, [start0, ends[args.rounds]], args.rounds)
        # Without round 0 (the initial model's distribution and evaluation), for reference.
        up1, down1 = relay.totals(ends[0], ends[args.rounds])
        rounds_1_to_n = {
            "bytes_per_round": {"up": round(up1 / args.rounds), "down": round(down1 / args.rounds),
                                "total": round((up1 + down1) / args.rounds)},
            "seconds_per_round": round((ends[args.rounds] - ends[0]) / args.rounds, 3),
        }
        per_round = _per_round(relay, bounds)
        broker_usage = sampler.usage["broker"]
    for r, row in enumerate(per_round):
        row["round"] = r
        row["accuracy"] = None if records[r]["accuracy"] is None else round(records[r]["accuracy"], 4)
        row["gateway_payload_bytes"] = {"up": records[r]["bytes_up"], "down": records[r]["bytes_down"]}
    return {
        "runtime": f"{broker.kind} + 1 starling-gateway + {len(devices)} starling-agent "
                   "(signed CBOR over MQTT, ledger on)",
        "update": "int8 weight deltas up ([training] codec 'i8'); each new model down as a signed int8 delta "
                  "from the one before (download 'i8'; the full float32 model retained as the fallback)",
        "seed": seed,
        **figures,
        "idle_bytes_per_s": idle,
        "broker_cpu_s": round(broker_usage.cpu_s(), 2),
        "broker_peak_rss_mb": round(broker_usage.peak_rss_mb(), 1),
        "final_accuracy": round(records[args.rounds]["accuracy"], 4),
        "rounds_1_to_n": rounds_1_to_n,
        "round_clock": clock,
        "ledger_height": result.get("ledger", {}).get("height"),
        "rounds": per_round,
    }


RUNNERS = {"flower": run_flower, "flower_process": run_flower_process, "starling": run_starling}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10, help="watch subjects 1..N, one per device (<= 10)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="runs per side, seeds 1..N")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stride", type=int, default=64, help="window stride of the watch data")
    parser.add_argument("--deadline-s", type=float, default=60.0, help="Starling's round deadline")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="bound on each run")
    parser.add_argument("--idle-s", type=float, default=6.0,
                        help="measure the devices' idle traffic this long (Flower: registered, before "
                             "the run; Starling: after the gateway exits); 0: skip")
    parser.add_argument("--broker", default="mosquitto", choices=("mosquitto", "auto", "embedded"))
    parser.add_argument("--sides", default=",".join(SIDES),
                        help=f"comma-separated, of {', '.join(SIDES)} (ratios need starling and a baseline)")
    parser.add_argument("--only", choices=SIDES, help="run one side (the same as --sides SIDE)")
    parser.add_argument("--workdir", help="keep every log, key, config and data file here (default: temp)")
    args = parser.parse_args(argv)

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)  # unwinds like an error: every process started is stopped

    signal.signal(signal.SIGTERM, on_sigterm)
    sides = [args.only] if args.only else [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in SIDES for s in sides):
        parser.error(f"--sides takes some of {', '.join(SIDES)}")
    if not 1 <= args.devices <= 10:
        parser.error("--devices must be 1..10 (the watch data has 10 subjects)")
    if args.rounds < 1 or args.epochs < 1 or args.lr <= 0 or args.seeds < 1:
        parser.error("--rounds, --seeds, --epochs and --lr must be positive")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            if workdir.exists() and any(workdir.iterdir()):
                parser.error(f"--workdir {workdir} is not empty")
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vs-flower-")))
        workdir.mkdir(parents=True, exist_ok=True)
        subjects = tuple(range(1, args.devices + 1))
        scenario = Scenario(devices=args.devices, subjects=subjects, stride=args.stride)
        devices = prepare_devices(scenario, workdir)  # one .npz per device, read by every side
        config = {"devices": args.devices, "subjects": list(subjects), "rounds": args.rounds,
                  "seeds": args.seeds, "epochs": args.epochs,
                  "lr": args.lr, "batch_size": args.batch_size, "stride": args.stride, "strategy": "FedAvg",
                  "model": "imu_cnn (TFLite, TrainableModel)", "cpus": os.cpu_count(), "sides": sides}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        failed = False
        began = time.monotonic()
        for seed in range(1, args.seeds + 1):
            for side in sides:
                say(f"--- {side}, seed {seed}/{args.seeds}: {args.devices} devices, {args.rounds} rounds, "
                    f"{args.epochs} epochs, lr {args.lr} ({time.monotonic() - began:.0f} s so far)")
                started = time.monotonic()
                try:
                    got = RUNNERS[side](devices, args, workdir / side / f"seed-{seed}", seed)
                except (RuntimeError, TimeoutError, OSError, KeyError, ValueError) as exc:
                    say(f"{side} seed {seed} failed: {exc}")
                    runs[side].append({"seed": seed, "error": str(exc)})
                    failed = True
                    continue
                runs[side].append(got)
                say(f"{side} seed {seed}: done in {time.monotonic() - started:.0f} s: "
                    f"{got['bytes_per_round']['total']} B a round, "
                    f"{got['seconds_per_round']} s a round, final accuracy {got['final_accuracy']}")
        doc: dict[str, Any] = {"config": config}
        for side in sides:
            doc[side] = summarize(runs[side])
        judge(doc)
        doc["runs"] = runs
        if args.workdir:
            doc["workdir"] = str(workdir)
        say(f"all runs done in {time.monotonic() - began:.0f} s\n{table(doc)}")
        print(json.dumps(doc))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
