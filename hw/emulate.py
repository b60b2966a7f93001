"""`starling-emulate`: a whole fleet on one machine, every part real.

    starling-emulate --scenario hw/scenarios/quickstart.toml --report report.json

Starts a broker on a free loopback port (Mosquitto if installed), writes a
key and config for every gateway and one per device, starts the gateways and
the agents as separate processes (`python -m gateway.cli run`, `python -m
agent.cli run`, or `python -m hw.adversary` for the scenario's attackers),
follows the gateways' retained status topics to show progress, and when the
rounds are done stops everything, verifies the ledgers and writes the report.

A city (`[fleet] gateways = N > 1`): a fresh operator root key signs a
genesis naming every gateway (hw/city.py), each gateway runs with that
genesis and gossip on and has its own devices (device i belongs to gateway
i mod N). When the rounds are done the ledgers are gossiped level (each
gateway's store with its own key, the real LedgerSync) and compared: the
report's `ledger_check` says whether they are identical (vertex ids and
state digest) and whether every update any gateway accepted is in every
ledger.

Adversaries (`[[adversary]]`): a seeded choice of devices runs `python -m
hw.adversary --attack ...` instead of the agent; the report's `attacks`
lists each attack's devices, what the gateways did with their replies (from
each device's retained status: accepted, rejected by reason) and the outcome
hw.adversary.EXPECTED says it should get.

Variants (`[[variant]]`): the scenario runs once per variant, one after
another, each in `<workdir>/<variant>/` with its own report.json and
report.html there; the report at `--report` holds them all (`variants`) and
the `comparison` of their accuracy.

Faults (`[[fault]]`, hw/faults.py): a `FaultRunner` kills and restarts
gateways, stops them (SIGTERM) and starts them again, with new config values
if the fault says so (written here: `GatewayRun` owns the gateway's config
file), restarts brokers, cuts a gateway's broker off the hub (a scenario
with a partition gives every gateway its own broker, hw/fleet.py) and
powers devices off and on, each at a round or a time; the report's `faults`
says when each began and ended and which rounds ran meanwhile.

Profiles (hw/profiles.py): `[[device_profile]]` devices get a CPU share
(`CpuThrottle`), a memory cap and an agent `[budget]`; `[[link]]` devices
reach their broker through a `LinkRelay` (hw/links.py), whose outages join
the fault timeline. Device pools are made per profile.

Hardware in the loop (`--listen ADDR`, hw/hil.py): the broker gets a second
listener, the gateways admit devices by the run's operator vouchers, and a
join kit for a real device is written to `<workdir>/hil/kit`.

The report (see hw/report.py for how it is drawn): the first gateway's
`rounds` (each with `t`, seconds since the run started, when its evaluation
was in; the whole history of its model lineage, so round numbers go on
across restarts), `rejections`, `ledger`, `gateway`, `model`, `lineage`
(the final model's chain of releases on the ledger, back to the lineage's
first model, and the restarts it crossed: `_lineage_section`); `gateways`
{name: rounds, rejections, state, model, lineage, ledger (height, verified,
height_series and finality_lag_series sampled from the gateway's status and
ledger gossip while it ran)}; `ledger_check` (cities); `attacks`; `faults`;
`device_profiles` and `links`; `real_devices` (--listen); `comparison` (variants).

The run folder (`--workdir`, default next to the report) keeps every log,
key, config and ledger; `run.json` in it names the broker port and the
gateways as soon as they exist, for tools and tests that join a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocol import cbor, topics
from protocol.atomic import write_atomic
from protocol.keys import Identity

from .broker import _child_env
from .faults import FaultRunner, apply_overrides, fault_sections
from .fleet import Fleet, Network, Process, describe
from .links import LinkRelay
from .partition import prepare_devices
from .profiles import CpuThrottle, DeviceProfile, assign, memory_cap
from .scenario import Adversary, Scenario, ScenarioError, load_scenario
from .toml_files import write_toml

__all__ = ["main", "prepare_devices", "run"]

# A gateway in these states will report nothing more for its last round. Not "stopped": a stopped
# gateway that starts again re-opens the round its stop interrupted, and evaluates it then.
FINISHED = ("done", "failed")
SETTLE_S = 30.0  # at most this long for the ledgers to agree after the rounds
LEDGER_VV = "starling/ledger/vv/+"


@dataclass
class GatewayRun:
    """One gateway of the run: its identity, folder, devices and process."""

    index: int
    name: str
    identity: Identity
    home: Path
    log: Path
    devices: list[str] = field(default_factory=list)
    proc: Process | None = None  # set once its config is written; a fault may kill and restart it
    config: dict[str, Any] = field(default_factory=dict)  # its gateway.toml as last written (only here)
    _config_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def process(self) -> subprocess.Popen | None:
        return self.proc.popen if self.proc is not None else None

    @property
    def config_path(self) -> Path:
        return self.home / "gateway.toml"

    def write_config(self, doc: dict[str, Any]) -> Path:
        """Write the gateway's config file (the one writer of it); the gateway reads it when it starts."""
        with self._config_lock:
            write_toml(self.config_path, doc)
            self.config = doc
        return self.config_path

    def reconfigure(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """A gateway_stop's `overrides` into the config file, for its next start; the values they replaced."""
        with self._config_lock:
            doc, previous = apply_overrides(self.config, overrides)
            write_toml(self.config_path, doc)
            self.config = doc
        return previous

    @property
    def key(self) -> Path:
        return self.home / "gateway.key"

    @property
    def ledger(self) -> Path:
        return self.home / "ledger.db"


def choose_attackers(scenario: Scenario, names: list[str]) -> dict[str, tuple[int, Adversary]]:
    """Device name -> (index of its [[adversary]] table, the table): a seeded choice, disjoint per table."""
    chosen = assign(names, scenario.adversaries, scenario.seed, salt=7)
    index = {id(adversary): i for i, adversary in enumerate(scenario.adversaries)}  # equal tables stay apart
    return {name: (index[id(adversary)], adversary) for name, adversary in chosen.items()}


class Monitor:
    """Follows every gateway's retained status, the devices' statuses and the ledger gossip.

    Prints one line per finished round (prefixed by the gateway's name in a city), notes when
    each round ended (`t`, seconds since `started`) and samples every gateway's ledger height and
    finality lag over time.
    """

    def __init__(self, endpoints: list[tuple[str, int]], gateways: list[GatewayRun], rounds: int, started: float,
                 stream=sys.stderr) -> None:
        from mqttlink import Connection, ConnectionOptions

        self.rounds = rounds
        self.started = started
        self.stream = stream
        self.names = {g.identity.id: g.name for g in gateways}
        self.prefix = len(gateways) > 1
        self.lock = threading.RLock()  # one paho thread per broker feeds it
        self.seen = {g.identity.id: -1 for g in gateways}
        self.status: dict[str, dict[str, Any]] = {}
        self.round_t: dict[str, dict[int, float]] = {g.identity.id: {} for g in gateways}
        self.series: dict[str, list[tuple[float, int, int]]] = {g.identity.id: [] for g in gateways}
        self.devices: dict[str, dict[str, Any]] = {}  # device id -> its latest status at its gateway
        subscriptions = [(LEDGER_VV, 0)]
        for g in gateways:
            subscriptions += [(topics.status(g.identity.id), 1), (topics.device_status(g.identity.id, "+"), 1)]
        self.connections = []
        for i, (host, port) in enumerate(endpoints):  # one per broker when every gateway has its own
            options = ConnectionOptions(f"emu-{os.getpid()}-{i}", host, port, clean_session=True,
                                        subscriptions=tuple(subscriptions), log_name="starling.emulate.monitor",
                                        reconnect_min_s=0.2, reconnect_max_s=2.0)  # back quickly after a restart
            self.connections.append(Connection(options, deliver=self._on_message).start())

    def rounds_done(self, gateway_name: str) -> int:
        """The last round the named gateway finished (-1 before any)."""
        ids = [gid for gid, name in self.names.items() if name == gateway_name]
        return self.seen.get(ids[0], -1) if ids else -1

    def _t(self, when: Any) -> float:
        return round((when if isinstance(when, (int, float)) else time.time()) - self.started, 3)

    def _sample(self, gateway: str, when: Any, ledger: Any) -> None:
        if gateway not in self.series or not isinstance(ledger, dict):
            return
        height, lag = ledger.get("height"), ledger.get("lag")
        if isinstance(height, int) and isinstance(lag, int):
            with self.lock:
                self.series[gateway].append((self._t(when), height, lag))

    def _on_message(self, msg) -> None:
        try:
            if msg.topic.startswith("starling/ledger/vv/"):
                doc = cbor.loads(msg.payload)
                if isinstance(doc, dict):
                    self._sample(msg.topic.rsplit("/", 1)[-1], doc.get("time"), doc)
                return
            doc = json.loads(msg.payload)
        except Exception:  # noqa: BLE001 (whatever is on the wire must not stop the monitor)
            return
        if not isinstance(doc, dict):
            return
        if "/status/device/" in msg.topic:
            with self.lock:
                self.devices[msg.topic.rsplit("/", 1)[-1]] = doc
            return
        with self.lock:
            self._on_gateway_status(doc)

    def _on_gateway_status(self, doc: dict[str, Any]) -> None:
        gateway = doc.get("gateway")
        if gateway not in self.seen:
            return
        self.status[gateway] = doc
        self._sample(gateway, doc.get("time"), doc.get("ledger"))
        history = doc.get("history", [])
        finished = doc.get("state") in FINISHED
        for i, record in enumerate(history):
            # A round is shown once its evaluation is in (or nothing more will come for it).
            complete = record["accuracy"] is not None or i + 1 < len(history) or finished
            if record["round"] > self.seen[gateway] and complete:
                self.seen[gateway] = record["round"]
                self.round_t[gateway].setdefault(record["round"], self._t(doc.get("time")))
                acc = record["accuracy"]
                print(
                    f"  {self.names[gateway] + ' ' if self.prefix else ''}round {record['round']}/{self.rounds}"
                    f"  accuracy {'  -  ' if acc is None else f'{acc:.3f}'}  participants {record['participants']}"
                    f"  rejected {record['rejected']}  {record['seconds']:.1f} s",
                    file=self.stream, flush=True,
                )

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


def _stop(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _fresh_workdir(workdir: Path) -> None:
    if (workdir / "run.json").exists():
        shutil.rmtree(workdir)  # an earlier run of ours: its keys, ledger and device state must not leak in
    elif workdir.exists() and any(workdir.iterdir()):
        raise ScenarioError(f"run folder {workdir} is not empty and holds no earlier run: choose another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Hil:
    """Hardware in the loop: where real devices reach the broker, and (optionally) one device's public key."""

    listen: tuple[str, int]
    device: str | None = None  # 64 hex: its voucher goes into the join kit


def run(scenario: Scenario, report_path: Path, workdir: Path, stop: threading.Event | None = None,
        hil: Hil | None = None) -> dict[str, Any]:
    """Run `scenario` (each of its variants, if it has any) in `workdir`; write and return the report."""
    stop = stop or threading.Event()
    if hil is not None and scenario.model == "synthetic":
        raise ScenarioError('--listen: a real device cannot train training.model = "synthetic" (it exists only '
                            "in the emulator's device pools); use a scenario with the imu_cnn model")
    if scenario.variants:
        return _run_variants(scenario, report_path, workdir, stop, hil)
    return _run_one(scenario, report_path, workdir, stop, hil)


SYNTHETIC_SHAPES = {"dense": (128, 8), "bias": (8,)}  # hw/synthetic.py's model: ~1,000 parameters


def _gateway_config(scenario: Scenario, g: GatewayRun, broker: tuple[str, int], genesis: Path | None,
                    manifest: Path | None = None, enrollment: dict[str, Any] | None = None,
                    wait_real_device: bool = False, unenrollable: int = 0) -> Path:
    doc: dict[str, dict[str, Any]] = {
        "gateway": {"name": g.name, "key": str(g.key), "state_dir": str(g.home)},
        "broker": {"host": broker[0], "port": broker[1]},
        "strategy": {"name": scenario.strategy, "params": scenario.strategy_params,
                     **({"dp": scenario.strategy_dp} if scenario.strategy_dp else {})},
        "rounds": {"num_rounds": scenario.rounds, "deadline_s": scenario.deadline_s, "epochs": scenario.epochs,
                   "batch_size": scenario.batch_size, "lr": scenario.lr,
                   # A named real device (--hil-device) is waited for, as long as the run may last.
                   # (not for sybils a voucher policy keeps out)
                   "min_devices": len(g.devices) - unenrollable + (1 if wait_real_device else 0),
                   "wait_devices_s": scenario.timeout_s if wait_real_device else 120.0},
        # The emulator's devices are its own; with real devices joining, vouchers gate enrollment.
        "enrollment": enrollment or {"policy": "open"},
    }
    if manifest is not None:  # the synthetic model: its shapes and initial weights
        doc["model"] = {"manifest": str(manifest)}
    if genesis is not None:
        # Every gateway starts from the same genesis at the same time: nobody has a checkpoint to wait for.
        doc["ledger"] = {"genesis": str(genesis), "gossip": True, "bootstrap_s": 0.0}
    return g.write_config(doc)


def _run_one(scenario: Scenario, report_path: Path, workdir: Path, stop: threading.Event,
             hil: Hil | None = None) -> dict[str, Any]:
    from ledger.verify import verify_store

    started = time.time()
    _fresh_workdir(workdir)
    desk = None
    if hil is not None or scenario.enrollment == "voucher":  # vouchers gate enrollment
        from .hil import VoucherDesk

        desk = VoucherDesk(workdir / "hil" / "operator")
    devices = prepare_devices(scenario, workdir)
    names = [name for name, _ in devices]
    attackers = choose_attackers(scenario, names)
    city = scenario.gateways > 1
    gateways = []
    for i in range(scenario.gateways):
        home = workdir / ("gateways" if city else "") / (f"gw-{i + 1}" if city else "gateway")
        home.mkdir(parents=True, exist_ok=True)
        g = GatewayRun(i, f"gw-{i + 1}", Identity.generate(), home,
                       workdir / "logs" / (f"gw-{i + 1}.log" if city else "gateway.log"),
                       [names[d] for d in scenario.devices_of(i)])
        g.identity.save(g.key)
        gateways.append(g)
    gateway_of = {name: g for g in gateways for name in g.devices}
    genesis = None
    if city:
        from .city import write_genesis

        genesis = write_genesis(workdir / "city", scenario.name, [g.identity.public_key for g in gateways])
    device_ids = {}
    for name in names:  # keys made here, so the report can name each device's id (the agent loads it)
        home = workdir / "devices" / name
        home.mkdir(parents=True, exist_ok=True)
        identity = Identity.generate()
        identity.save(home / "device.key")
        device_ids[name] = identity.id
        if desk is not None:  # under the voucher policy the emulated devices need one too
            desk.write_voucher(home / "voucher.cbor", identity.public_key, gateway_of[name].identity.id)
    env = _child_env()
    (workdir / "logs").mkdir(exist_ok=True)
    settled: dict[str, Any] | None = None
    faults = scenario.faults
    partitioned = any(f.kind == "partition" for f in faults)
    with Network(workdir / "broker", scenario.broker, [g.name for g in gateways], per_gateway=partitioned,
                 persistent=bool(faults), listen=hil.listen if hil else None) as network, ExitStack() as stack:
        hub = network.hub
        attack_note = f", attackers: {scenario.attack_label()}" if attackers else ""
        fault_note = f", {len(faults)} fault{'s' if len(faults) > 1 else ''}" if faults else ""
        brokers_note = " (+1 per gateway, bridged through cuttable links)" if partitioned else ""
        _say(f"starling-emulate: {scenario.name}: {network.kind} broker on 127.0.0.1:{hub.port}{brokers_note}, "
             f"{len(gateways)} gateway{'s' if city else ''} "
             f"{', '.join(g.identity.id for g in gateways)}, {len(devices)} devices, "
             f"{scenario.rounds} rounds of {scenario.strategy}{attack_note}{fault_note}")
        first = gateways[0]
        write_atomic(workdir / "run.json", json.dumps({
            "broker": {"host": hub.host, "port": hub.port, "kind": network.kind},
            "brokers": describe(network),
            "gateway": {"id": first.identity.id, "public_key": first.identity.public_key.hex()},
            "gateways": [{"name": g.name, "id": g.identity.id, "public_key": g.identity.public_key.hex(),
                          "devices": g.devices, "broker": list(network.endpoint(g.name))} for g in gateways],
            "genesis": str(genesis) if genesis else None,
            "devices": names,
            "attackers": {name: adv.attack for name, (_, adv) in attackers.items()},
        }).encode())
        if hil is not None:
            from .hil import advertised_address, instructions, write_join_kit

            kit = write_join_kit(workdir / "hil" / "kit", advertised_address(hil.listen[0]), hil.listen[1],
                                 [{"name": g.name, "id": g.identity.id, "public_key": g.identity.public_key.hex()}
                                  for g in gateways], scenario.model, hil.device, desk)
            _say(instructions(kit))
            if hil.device:
                _say(f"starling-emulate: {first.name} waits for that device (up to {scenario.timeout_s:.0f} s) "
                     "before its first round")
        monitor = Monitor(network.endpoints(), gateways, scenario.rounds, started)
        manifest = None
        if scenario.model == "synthetic":
            from .synthetic import write_manifest

            manifest = write_manifest(workdir / "model", SYNTHETIC_SHAPES, seed=scenario.seed)
        for g in gateways:
            conf = _gateway_config(scenario, g, network.endpoint(g.name), genesis, manifest,
                                   desk.enrollment_table() if desk else None,
                                   wait_real_device=bool(hil and hil.device) and g is first,
                                   unenrollable=sum(1 for n in g.devices if desk and n in attackers
                                                    and attackers[n][1].attack == "sybil"))
            g.proc = Process([sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)], g.log, env)
            g.proc.start()
        devices_run = _device_processes(scenario, devices, gateway_of, network, attackers, desk, manifest, env,
                                        stack, workdir)
        device_procs = devices_run.processes
        agents = list({id(p): p for p in device_procs.values()}.values())  # a pool once, not per device
        attacking = {id(device_procs[name]) for name in attackers}
        agents.sort(key=lambda p: id(p) not in attacking)  # attackers first: the gateways wait for no attacker
        for proc in agents:
            proc.start()
        by_name = {g.name: g for g in gateways}
        fleet = Fleet(network, {g.name: g.proc for g in gateways}, device_procs, monitor.rounds_done, scenario.seed,
                      reconfigure=lambda name, overrides: by_name[name].reconfigure(overrides))
        runner = FaultRunner(faults, fleet, started, len(devices), _say)
        deadline = time.monotonic() + scenario.timeout_s
        timed_out = False
        try:
            with runner:
                while True:
                    # Alive first, then busy: a fault marks itself busy before it kills a gateway.
                    if not any(g.proc.alive() for g in gateways) and not runner.busy():
                        break
                    if stop.is_set() or time.monotonic() > deadline:
                        timed_out = not stop.is_set()
                        _say("starling-emulate: stopping early" + (" (timeout)" if timed_out else ""))
                        break
                    time.sleep(0.2)
        finally:
            _stop([g.process for g in gateways if g.process is not None])
            time.sleep(0.5)  # the gateways' last retained statuses reach the monitor
            _stop([p.popen for p in agents if p.popen is not None])
            if city and not stop.is_set():
                from .city import GatewayLedger, settle

                try:
                    settled = settle([GatewayLedger(g.name, g.ledger, g.key) for g in gateways if g.ledger.exists()],
                                     hub.host, hub.port, timeout_s=SETTLE_S)
                    _say(f"starling-emulate: ledgers {'agree' if settled['agreed'] else 'still differ'} "
                         f"after {settled['seconds']:.1f} s of gossip")
                except Exception as exc:  # noqa: BLE001 (the report says so; the run's record comes first)
                    settled = {"agreed": False, "error": f"{type(exc).__name__}: {exc}"}
            monitor.close()
    timeline = runner.timeline + _link_outages(scenario.links, devices_run.links_started - started)
    report = _report(scenario, workdir, started, network.kind, gateways, monitor, attackers, device_ids,
                     timed_out, settled, verify_store, timeline, vouchers=desk is not None)
    report.update(_profile_sections(scenario, devices_run.profile_of, devices_run.link_of, devices_run.relays,
                                    monitor, device_ids))
    _write_report(report, report_path)
    return report


@dataclass
class DevicesRun:
    """The run's device processes (a pool's process once per member) and what their profiles made."""

    processes: dict[str, Process]
    profile_of: dict[str, DeviceProfile]
    link_of: dict[str, Any]
    relays: dict[tuple[str, tuple[str, int]], LinkRelay]
    links_started: float


def _device_processes(scenario: Scenario, devices: list[tuple[str, Path]], gateway_of: dict[str, GatewayRun],
                   network: Network, attackers: dict[str, tuple[int, Adversary]], desk, manifest: Path | None,
                   env: dict[str, str], stack: ExitStack, workdir: Path) -> DevicesRun:
    """Write every device's agent.toml and make its process (an agent, an attacker or a device pool),
    with its profile's CPU share, memory cap and budget, through its link's relay (up already); no device runs yet."""
    names = [name for name, _ in devices]
    profile_of = assign(names, scenario.device_profiles, scenario.seed, salt=13)
    link_of = assign(names, scenario.links, scenario.seed, salt=17)
    throttle = stack.enter_context(CpuThrottle())
    relays: dict[tuple[str, tuple[str, int]], LinkRelay] = {}  # (link, broker) -> the relay its devices use
    for name in names:
        spec, endpoint = link_of.get(name), network.endpoint(gateway_of[name].name)
        if spec is not None and (spec.name, endpoint) not in relays:
            relays[spec.name, endpoint] = stack.enter_context(
                LinkRelay(endpoint, spec.profile(), seed=scenario.seed * 7919 + len(relays)))
    links_started = time.time()

    def process(cmd: list[str], log: Path, profile: DeviceProfile | None, members: int = 1) -> Process:
        """A device process (or a pool of `members` devices) with its profile's memory cap and CPU share."""
        if profile is None:
            return Process(cmd, log, env)
        return Process(cmd, log, env, preexec=memory_cap(profile.memory_mb * members) if profile.memory_mb else None,
                       on_start=(lambda p: throttle.add(p.pid, profile.cpu_slowdown))
                       if profile.cpu_slowdown > 1 else None)

    device_procs: dict[str, Process] = {}
    pooled: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # profile name -> its pooled devices
    for name, data in devices:
        g = gateway_of[name]
        home = workdir / "devices" / name
        conf = home / "agent.toml"
        host, port = network.endpoint(g.name)
        if name in link_of:  # through its emulated link
            host, port = "127.0.0.1", relays[link_of[name].name, (host, port)].port
        profile = profile_of.get(name)
        write_toml(conf, {
            "device": {"name": name, "key": str(home / "device.key"), "state_dir": str(home / "state"),
                       **({"voucher": str(home / "voucher.cbor")} if desk else {})},
            "gateway": {"id": g.identity.id, "public_key": g.identity.public_key.hex()},
            "broker": {"host": host, "port": port},
            "data": {"replay": str(data)},
            **({"budget": profile.budget_toml()} if profile and profile.budget_toml() else {}),
        })
        if name in attackers:
            cmd = attackers[name][1].command(conf)
        elif scenario.runner == "pool":  # pools are made per profile: a pool's process has one CPU share
            seed = scenario.seed * 100_003 + sum(map(len, pooled.values())) + 1
            pooled.setdefault(profile.name if profile else "", []).append((name, {"config": str(conf), "seed": seed}))
            continue
        else:
            cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(conf)]
        device_procs[name] = process(cmd, workdir / "logs" / f"{name}.log", profile)
    profiles_by_name = {p.name: p for p in scenario.device_profiles}
    chunks = [(key, group[i:i + scenario.pool_size]) for key, group in pooled.items()
              for i in range(0, len(group), scenario.pool_size)]
    for p, (key, members) in enumerate(chunks):
        pool = workdir / "pools" / f"pool-{p + 1}.json"
        pool.parent.mkdir(exist_ok=True)
        write_atomic(pool, json.dumps({"model": scenario.model, "manifest": str(manifest) if manifest else None,
                                       "devices": [entry for _, entry in members]}).encode())
        proc = process([sys.executable, "-m", "hw.device_pool", "--pool", str(pool)],
                       workdir / "logs" / f"pool-{p + 1}.log", profiles_by_name.get(key), len(members))
        device_procs.update({name: proc for name, _ in members})
    return DevicesRun(device_procs, profile_of, link_of, relays, links_started)


def _ledger_section(g: GatewayRun, result: dict[str, Any], monitor: Monitor, verify_store) -> dict[str, Any]:
    from ledger.store import Ledger

    verified = verify_store(g.ledger) if g.ledger.exists() else None
    series = sorted(monitor.series.get(g.identity.id, []))
    if g.ledger.exists():  # where the ledger ended (after a city's gossip settled)
        with Ledger.open(g.ledger, read_only=True) as ledger:
            end = ledger.finality()
        series.append((round(time.time() - monitor.started, 3), end["height"], end["lag"]))
    # Only the samples where something changed (the version vector comes every second), and the last.
    series = [p for i, p in enumerate(series) if i in (0, len(series) - 1) or p[1:] != series[i - 1][1:]]
    return {
        "path": str(g.ledger),
        "height": result.get("ledger", {}).get("height"),
        "verified": bool(verified and verified.ok),
        "problem": None if verified is None or verified.ok else f"{verified.bad_vertex}: {verified.reason}",
        "height_series": [[t, h] for t, h, _ in series],
        "finality_lag_series": [[t, lag] for t, _, lag in series],
    }


GATEWAY_FAULTS = ("gateway_restart", "gateway_stop")  # the faults a gateway's model lineage must outlive


def _lineage_section(g: GatewayRun, result: dict[str, Any], started: float,
                     timeline: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The chain of the gateway's final model on its ledger (ledger.audit.lineage), and each restart it crossed.

    {"model", "version", "complete", "length", "gap", "releases": [{"model", "round", "strategy",
    "inputs", "t"} newest first, the lineage's first model last with its "version" and "reason"],
    "restarts_crossed": [{"kind", "t", "before": {"model", "round"}, "after": {...}, "crossed"}]}:
    `t` in seconds since the run started (the vertex's time); per gateway_restart or gateway_stop of
    this gateway, the last release before it went down and the first after it came back, and whether
    the final model's chain holds both (then it runs through the restart: a new lineage would not).
    None when there is no final model or ledger.
    """
    from ledger.audit import lineage
    from ledger.store import Ledger

    model = (result.get("model") or {}).get("digest")
    if not model or not g.ledger.exists():
        return None
    try:
        with Ledger.open(g.ledger, read_only=True) as ledger:
            walk = lineage(ledger, bytes.fromhex(model))
    except Exception as exc:  # noqa: BLE001 (the report says so; the run's record comes first)
        return {"model": model, "complete": False, "error": f"{type(exc).__name__}: {exc}"}
    releases = []
    for r in walk["releases"]:
        entry = {"model": r["model"], "round": r["round"], "strategy": r["strategy"], "inputs": r["inputs"],
                 "t": round(r["time"] - started, 3)}
        if r["base"] is None:  # the lineage's first model: where it started, and why
            entry.update(version=r.get("version"), reason=r.get("reason"))
        releases.append(entry)
    crossed = []
    for fault in sorted(timeline, key=lambda f: f["t"]):
        if fault["kind"] not in GATEWAY_FAULTS or fault["target"] != g.name or fault["t_end"] is None \
                or fault["detail"].get("restarted") is False or "skipped" in fault["detail"]:
            continue
        before = next((i for i, r in enumerate(releases) if r["t"] <= fault["t"]), None)  # newest first
        after = next((i for i in reversed(range(len(releases))) if releases[i]["t"] >= fault["t_end"]), None)
        crossed.append({"kind": fault["kind"], "t": fault["t"],
                        "before": None if before is None else {k: releases[before][k] for k in ("model", "round")},
                        "after": None if after is None else {k: releases[after][k] for k in ("model", "round")},
                        # both in the chain: it runs from the one to the other (each release names its base)
                        "crossed": before is not None and after is not None})
    return {"model": model, "version": (result.get("model") or {}).get("version"), "complete": walk["complete"],
            "length": walk["length"], "gap": walk["gap"], "releases": releases, "restarts_crossed": crossed}


def _link_outages(links, offset: float) -> list[dict[str, Any]]:
    """A link's disconnect schedule as entries of the fault timeline (so the plots mark them too)."""
    return [{"t": round(offset + start, 3), "t_end": round(offset + end, 3), "kind": "link_outage",
             "target": spec.name, "detail": {"devices": spec.fraction if spec.fraction is not None else spec.count}}
            for spec in links for start, end in spec.outages]


def _device_totals(ids: list[str], monitor: Monitor) -> dict[str, Any]:
    accepted, duplicates, rejected, skipped = 0, 0, {}, {}
    with monitor.lock:
        docs = [monitor.devices.get(d, {}) for d in ids]
    for doc in docs:
        accepted += int(doc.get("accepted", 0))
        duplicates += int(doc.get("duplicates", 0))
        for target, key in ((rejected, "rejected"), (skipped, "skipped")):
            for reason, n in (doc.get(key) or {}).items():
                target[reason] = target.get(reason, 0) + int(n)
    return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected, "skipped": skipped}


def _profile_sections(scenario: Scenario, profile_of: dict, link_of: dict, relays: dict, monitor: Monitor,
                      device_ids: dict[str, str]) -> dict[str, Any]:
    """What each device profile and each link did: its devices' replies, and the link's traffic."""
    out: dict[str, Any] = {}
    if scenario.device_profiles:
        out["device_profiles"] = []
        for spec in scenario.device_profiles:
            names = sorted(n for n, p in profile_of.items() if p.name == spec.name)
            out["device_profiles"].append({**{k: v for k, v in asdict(spec).items() if v is not None},
                                           "devices": names, **_device_totals([device_ids[n] for n in names], monitor)})
    if scenario.links:
        out["links"] = []
        for spec in scenario.links:
            names = sorted(n for n, link in link_of.items() if link.name == spec.name)
            stats = [asdict(r.stats) for (link, _), r in relays.items() if link == spec.name]
            traffic = {key: sum(s[key] for s in stats) for key in
                       ("connections", "refused", "dropped", "bytes_up", "bytes_down", "delayed_chunks")}
            out["links"].append({**{k: v for k, v in asdict(spec).items() if v is not None}, "devices": names,
                                 **traffic, **_device_totals([device_ids[n] for n in names], monitor)})
    return out


def _attack_outcome(expected: tuple[str, ...], accepted: int, rejected: dict[str, int]) -> bool:
    if "accepted" in expected:
        return accepted > 0 and not rejected
    return sum(rejected.values()) > 0 and set(rejected) <= set(expected)


def _attacks(scenario: Scenario, attackers: dict[str, tuple[int, Adversary]], device_ids: dict[str, str],
             gateway_of: dict[str, str], monitor: Monitor, sections: dict[str, dict[str, Any]],
             vouchers: bool) -> list[dict[str, Any]]:
    from .adversary import EXPECTED

    out = []
    for i, adv in enumerate(scenario.adversaries):
        names = sorted(name for name, (j, _) in attackers.items() if j == i)
        totals = _device_totals([device_ids[name] for name in names], monitor)
        accepted, rejected, skipped = totals["accepted"], totals["rejected"], totals["skipped"]
        with monitor.lock:
            docs = {name: monitor.devices.get(device_ids[name], {}) for name in names}
        per_device = {name: {"id": device_ids[name], "gateway": gateway_of[name],
                             "accepted": int(doc.get("accepted", 0)), "rejected": dict(doc.get("rejected") or {})}
                      for name, doc in docs.items()}
        # Under "open" enrollment a sybil is enrolled and acts as its payload: accepted. Under vouchers it
        # never is, so it has no device status: its refusals are the gateways' (no other device causes them).
        expected = ("accepted",) if adv.attack == "sybil" and not vouchers else tuple(EXPECTED[adv.attack])
        if adv.attack == "sybil" and vouchers:
            expected = ("no_voucher", *expected)
            for section in sections.values():
                for reason, n in {**section["enroll_rejections"], **section["rejections"]}.items():
                    if reason in expected:
                        rejected[reason] = rejected.get(reason, 0) + int(n)
        entry = {"attack": adv.attack, "fraction": adv.fraction if adv.fraction is not None
                 else round(len(names) / max(1, scenario.devices), 4),
                 "devices": names, "accepted": accepted, "rejected": rejected, "skipped": skipped,
                 "expected": list(expected), "as_expected": _attack_outcome(expected, accepted, rejected),
                 "per_device": per_device}
        for key in ("scale", "sigma", "payload"):
            if getattr(adv, key) is not None:
                entry[key] = getattr(adv, key)
        out.append(entry)
    return out


def _report(scenario: Scenario, workdir: Path, started: float, broker_kind: str, gateways: list[GatewayRun],
            monitor: Monitor, attackers: dict[str, tuple[int, Adversary]], device_ids: dict[str, str],
            timed_out: bool, settled: dict[str, Any] | None, verify_store,
            faults: list[dict[str, Any]] | None = None, vouchers: bool = False) -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {}
    results = {}
    for g in gateways:
        result_file = g.home / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        results[g.name] = result
        round_t = monitor.round_t.get(g.identity.id, {})
        rounds = [{**r, "t": round_t[r["round"]]} if r.get("round") in round_t else r for r in result.get("rounds", [])]
        sections[g.name] = {
            "id": g.identity.id,
            "state": result.get("state", "no result"),
            "failure": result.get("failure"),
            "exit_code": g.process.returncode if g.process is not None else None,
            "devices": g.devices,
            "rounds": rounds,
            "rejections": result.get("rejections", {}),
            "duplicates": result.get("duplicates", 0),  # honest re-sends of accepted replies, acknowledged again
            "enroll_rejections": result.get("enroll_rejections", {}),
            "model": result.get("model", {}),
            "ledger": _ledger_section(g, result, monitor, verify_store),
            "lineage": _lineage_section(g, result, started, faults or []),
        }
    first = gateways[0]
    main_section = sections[first.name]
    main_result = results[first.name]
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "rounds": main_section["rounds"],
        "rejections": main_section["rejections"],
        "duplicates": main_section["duplicates"],  # re-sends of accepted replies in their round: not rejections
        "ledger": {k: main_section["ledger"][k] for k in ("path", "height", "verified", "problem")},
        "config": scenario.to_dict(),
        "gateway": {**main_result.get("gateway", {}), "state": main_section["state"],
                    "exit_code": main_section["exit_code"], "enroll_rejections": main_section["enroll_rejections"]},
        "model": main_section["model"],
        "lineage": main_section["lineage"],
        "gateways": sections,
        "broker": broker_kind,
        "workdir": str(workdir),
        "seconds": round(time.time() - started, 1),
        "timed_out": timed_out,
    }
    if len(gateways) > 1:
        from .city import GatewayLedger, compare_ledgers

        accepted = {g.name: sum(r.get("participants", 0) for r in sections[g.name]["rounds"] if r.get("round", 0) > 0)
                    for g in gateways}
        check = compare_ledgers([GatewayLedger(g.name, g.ledger, g.key) for g in gateways], accepted,
                                {g.name: g.identity.public_key for g in gateways})
        report["ledger_check"] = {**check, "settle": settled}
    if scenario.faults or faults:
        report["faults"] = fault_sections(faults or [], {name: s["rounds"] for name, s in sections.items()})
    if scenario.adversaries:
        gateway_of = {name: g.name for g in gateways for name in g.devices}
        report["attacks"] = _attacks(scenario, attackers, device_ids, gateway_of, monitor, sections,
                                     vouchers)
    ours = set(device_ids.values())
    with monitor.lock:
        others = {d: dict(doc) for d, doc in monitor.devices.items() if d not in ours}
    if others:  # real devices that joined through --listen
        report["real_devices"] = others
    report["devices"] = {name: {"id": device_ids[name], "gateway": g.name,
                                **({"attack": attackers[name][1].attack} if name in attackers else {})}
                         for g in gateways for name in g.devices}
    return report


def _write_report(report: dict[str, Any], report_path: Path) -> None:
    from hw.report import write_html_report

    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(report_path, (json.dumps(report, indent=2) + "\n").encode())
    html = report_path.with_suffix(".html")
    write_html_report(report, html)
    _say(f"starling-emulate: report {report_path}, {html}")


def _final_accuracy(report: dict[str, Any]) -> float | None:
    """The mean over the gateways of each one's last evaluated accuracy."""
    finals = []
    for section in report.get("gateways", {}).values():
        accs = [r.get("accuracy") for r in section.get("rounds", []) if r.get("accuracy") is not None]
        if accs:
            finals.append(accs[-1])
    return sum(finals) / len(finals) if finals else None


def _run_variants(scenario: Scenario, report_path: Path, workdir: Path, stop: threading.Event,
                  hil: Hil | None = None) -> dict[str, Any]:
    started = time.time()
    _fresh_workdir(workdir)
    write_atomic(workdir / "run.json", json.dumps({"variants": [v.name for v in scenario.variants]}).encode())
    reports = []
    for i, variant in enumerate(scenario.variants):
        if stop.is_set():
            break
        _say(f"starling-emulate: variant {i + 1}/{len(scenario.variants)}: {variant.name} "
             f"({variant.strategy}, attack {variant.attack_label() or 'none'})")
        reports.append(_run_one(variant, workdir / variant.name / "report.json", workdir / variant.name, stop, hil))
    comparison = []
    for variant, sub in zip(scenario.variants, reports):
        accuracy = [r.get("accuracy") for r in sub.get("rounds", [])]
        comparison.append({
            "name": variant.name, "strategy": variant.strategy, "attack": variant.attack_label(),
            "final_accuracy": _final_accuracy(sub),  # the last evaluated round's
            # False when the last rounds got no evaluation (e.g. the devices refused a diverged model)
            "last_round_evaluated": bool(accuracy) and accuracy[-1] is not None,
            "accuracy": accuracy,
            "state": sub["gateway"]["state"],
            "report": str(workdir / variant.name / "report.json"),
        })
    attacks = [{**a, "variant": sub["scenario"]} for sub in reports for a in sub.get("attacks", [])]
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "config": scenario.to_dict(),
        "comparison": comparison,
        "variants": reports,
        **({"attacks": attacks} if attacks else {}),
        "broker": reports[0]["broker"] if reports else None,
        "workdir": str(workdir),
        "seconds": round(time.time() - started, 1),
        "timed_out": any(r["timed_out"] for r in reports),
    }
    _write_report(report, report_path)
    return report


def _ok(report: dict[str, Any]) -> bool:
    if "variants" in report:
        return bool(report["variants"]) and len(report["variants"]) == len(report["comparison"]) and all(
            _ok(r) for r in report["variants"]) and len(report["variants"]) == len(report["config"]["variants"])
    gateways_ok = all(s["state"] == "done" and s["ledger"]["verified"] for s in report["gateways"].values())
    check = report.get("ledger_check")
    city_ok = check is None or (check["identical"] and check["every_accepted_update_in_every_ledger"])
    return gateways_ok and city_ok


def _summary(report: dict[str, Any], report_path: Path) -> str:
    if "variants" in report:
        lines = [f"starling-emulate: {len(report['variants'])} runs in {report['seconds']:.0f} s, report {report_path}"]
        for c in report["comparison"]:
            acc = c["final_accuracy"]
            lines.append(f"  {c['name']}: {c['strategy']}, attack {c['attack'] or 'none'}: final accuracy "
                         f"{'-' if acc is None else f'{acc:.3f}'} ({c['state']}"
                         f"{'' if c['last_round_evaluated'] else ', the last rounds were not evaluated'})")
        return "\n".join(lines)
    rounds = report["rounds"]
    final = rounds[-1]["accuracy"] if rounds else None
    text = (f"starling-emulate: {len(rounds) - 1 if rounds else 0} rounds in {report['seconds']:.0f} s, "
            f"final accuracy {final if final is None else round(final, 3)}, "
            f"ledger height {report['ledger']['height']} verified={report['ledger']['verified']}")
    check = report.get("ledger_check")
    if check is not None:
        text += (f", {len(report['gateways'])} ledgers identical={check['identical']} "
                 f"every accepted update in every ledger={check['every_accepted_update_in_every_ledger']}")
    for attack in report.get("attacks", []):
        n = len(attack["devices"])
        text += (f"\n  attack {attack['attack']} ({n} device{'' if n == 1 else 's'}): accepted {attack['accepted']}, "
                 f"rejected {attack['rejected'] or '-'}; expected {'/'.join(attack['expected'])}: "
                 f"{'yes' if attack['as_expected'] else 'NO'}")
    return text + f", report {report_path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="starling-emulate",
                                     description="Run a Starling fleet (broker, gateways, agents) on this machine.")
    parser.add_argument("--scenario", required=True, help="scenario TOML file (see hw/scenarios/)")
    parser.add_argument("--report", default="report.json", help="where to write the JSON report")
    parser.add_argument("--workdir", help="run folder for logs, keys and the ledger (default: <report>.run/)")
    parser.add_argument("--listen", metavar="ADDR[:PORT]",
                        help="hardware in the loop: open the broker to real devices here (e.g. 0.0.0.0:1883) and "
                             "print what they need to join (docs/hardware-in-the-loop.md)")
    parser.add_argument("--hil-device", metavar="PUBKEY_HEX",
                        help="with --listen: the real device's public key, to put its voucher in the join kit")
    args = parser.parse_args(argv)
    hil = None
    try:
        scenario = load_scenario(args.scenario)
        if args.hil_device and not args.listen:
            raise ScenarioError("--hil-device needs --listen")
        if args.listen:
            from .hil import parse_listen

            try:
                hil = Hil(parse_listen(args.listen), args.hil_device)
            except ValueError as exc:
                raise ScenarioError(f"--listen: {exc}") from exc
    except ScenarioError as exc:
        print(f"starling-emulate: {exc}", file=sys.stderr)
        return 2
    report_path = Path(args.report).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else report_path.with_suffix(".run")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        report = run(scenario, report_path, workdir, stop, hil)
    except (ScenarioError, ValueError, OSError) as exc:  # a bad scenario, --listen address or device key
        print(f"starling-emulate: {exc}", file=sys.stderr)
        return 2
    print(_summary(report, report_path), file=sys.stderr)
    return 0 if _ok(report) else 1


if __name__ == "__main__":
    raise SystemExit(main())
