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
hw.adversary.EXPECTED says it should get. The crafted attackers of one
gateway collude through `<workdir>/collusion/<gateway>` (each is told the
folder, how many colluders meet there and its gateway's fleet size).

Trust (`[aggregation]`, `[defense]`): the scenario's tables go verbatim into
every gateway's config (checked at load by the gateway's own parser); a
variant overrides them key by key, or drops them with an empty table.

The city tier (`[city]`: every, rule, deadline_s, audit_share, momentum; checked at
load, every key written into every gateway's config, with `[blobs] keep`
raised so that every city model of the run is still in the gateways' blob
stores at the end): after the run each city epoch's model is read from the
gateways' blob stores and evaluated on the test windows of every device in
the city (hw/city_report.py); the report's `city` says, per epoch, each
gateway's digest, the inputs taken and left out and that accuracy, then
`final_digests` (one per gateway), `final_accuracy`, `flagged` and `audits`.
**The headline `final_accuracy` of a run with the tier is the city model's on
every device of the city** (`city.final_accuracy`); without it, it stays
the mean of the gateways' last evaluations on their own devices, and a
multi-gateway run without the tier gets `city.isolated_accuracy` (each
gateway's final model on every device) and `isolated_mean`. A gateway
attack (`[[adversary]] attack = "tampered_aggregate"`, `target = "gw-N"`)
starts its target through hw/tampered_gateway.py, also when a fault restarts it.

Variants (`[[variant]]`): the scenario runs once per variant, one after
another, each in `<workdir>/<variant>/` with its own report.json and
report.html there; the report at `--report` holds them all (`variants`) and
the `comparison` of their accuracy.

Faults (`[[fault]]`, hw/faults.py): a `FaultRunner` kills and restarts
gateways, stops them (SIGTERM) and starts them again, with new config values
if the fault says so (`GatewayRun`, hw/fleet.py, owns the gateway's config
file), restarts brokers, cuts a gateway's broker off the hub (a scenario
with a partition gives every gateway its own broker, hw/fleet.py) and
powers devices off and on, each at a round or a time; the report's `faults`
says when each began and ended and which rounds ran meanwhile.

Profiles (hw/profiles.py): `[[device_profile]]` devices get a CPU share
(`CpuThrottle`), a memory cap and an agent `[budget]`; `[[link]]` devices
reach their broker through a `LinkRelay` (hw/links.py), whose outages join
the fault timeline. Device pools are made per profile.

The model (`[training] model`, hw/model_tables.py): a family of the zoo by name
(the gateways start from its manifest and weights, the devices' agent.toml
names it: `[model] name`), or a built model's folder (the devices'
agent.toml has `[model] path`; a --listen join kit carries a copy of the
folder). A reconstruction model (imu_autoencoder) keeps
every round's model in the gateways' blob stores, and after the run each
round's is scored on its gateway's devices' test windows: `rounds[i]`
gets `reconstruction_loss` and, with `[dataset] anomalies`, `anomaly_auc`;
the report gets `anomalies` (hw/model_report.py).

Hardware in the loop (`--listen ADDR`, hw/hil.py): the broker gets a second
listener, the gateways admit devices by the run's operator vouchers, and a
join kit for a real device is written to `<workdir>/hil/kit`.

The report (built by hw/run_report.py from the gateways' result.json, the
monitor (hw/monitor.py) and the ledgers; hw/report.py draws it): the first gateway's
`rounds` (each with `t`, seconds since the run started, when its evaluation
was in; the whole history of its model lineage, so round numbers go on
across restarts), `rejections`, `ledger`, `gateway`, `model`, `lineage`
(the final model's chain of releases on the ledger, back to the lineage's
first model, and the restarts it crossed: `hw.run_report.lineage_section`); `gateways`
{name: rounds, rejections, state, model, lineage, ledger (height, verified,
height_series and finality_lag_series sampled from the gateway's status and
ledger gossip while it ran)}; `ledger_check` (cities); `attacks`; `faults`;
`device_profiles` and `links`; `real_devices` (--listen); `city` and the headline
`final_accuracy` (hw/city_report.py); `comparison` (variants: each run's `final_accuracy` and
`all_devices_accuracy`, the final accuracy on every device of the city).

The run folder (`--workdir`, default next to the report) keeps every log,
key, config and ledger; `run.json` in it names the broker port and the
gateways as soon as they exist, for tools and tests that join a run.

This module runs a scenario and supervises it (`run`, `main`); the parts it
puts together: hw/fleet_configs.py (every gateway's and device's config, the
gateways' command lines), hw/device_processes.py (which devices attack, and
each device's process), hw/fleet.py (the processes and brokers),
hw/run_report.py (the report, and a scenario's variants' `comparison`) and
hw/run_summary.py (what it prints at the end, and its exit status).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.atomic import write_atomic
from protocol.keys import Identity

from .broker import _child_env
from .city_report import city_of_run
from .device_processes import choose_attackers, device_processes
from .faults import FaultRunner
from .fleet import Fleet, GatewayRun, Network, Process, describe
from .fleet_configs import gateway_command, gateway_config, model_manifest
from .model_report import add_model_figures
from .monitor import Monitor
from .partition import prepare_devices
from .personal_report import add_personal_figures
from .run_report import (
    build_report,
    final_accuracy,
    link_outages,
    profile_sections,
    variants_report,
    write_report,
)
from .run_summary import ok, summary
from .scenario import Scenario, ScenarioError, load_scenario

__all__ = ["main", "prepare_devices", "run"]

SETTLE_S = 30.0  # at most this long for the ledgers to agree after the rounds


def stop_processes(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM to every process still running, then kill -9 what has not ended within `timeout` in all."""
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
        attack_note = f", attackers: {scenario.attack_label()}" if scenario.adversaries else ""
        city_note = (f", a city epoch every {scenario.city['every']} rounds ({scenario.city['rule']})"
                     if scenario.city else "")
        fault_note = f", {len(faults)} fault{'s' if len(faults) > 1 else ''}" if faults else ""
        brokers_note = " (+1 per gateway, bridged through cuttable links)" if partitioned else ""
        _say(f"starling-emulate: {scenario.name}: {network.kind} broker on 127.0.0.1:{hub.port}{brokers_note}, "
             f"{len(gateways)} gateway{'s' if city else ''} "
             f"{', '.join(g.identity.id for g in gateways)}, {len(devices)} devices, "
             f"{scenario.rounds} rounds of {scenario.strategy}"
             f"{f' ({scenario.defense_label()})' if scenario.defense_label() else ''}{city_note}{attack_note}"
             f"{fault_note}")
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
        manifest = model_manifest(scenario, workdir)
        for g in gateways:
            conf = gateway_config(scenario, g, network.endpoint(g.name), genesis, manifest,
                                   desk.enrollment_table() if desk else None,
                                   wait_real_device=bool(hil and hil.device) and g is first,
                                   unenrollable=sum(1 for n in g.devices if desk and n in attackers
                                                    and attackers[n][1].attack == "sybil"))
            g.proc = Process(gateway_command(scenario, g, conf), g.log, env)
            g.proc.start()
        devices_run = device_processes(scenario, devices, gateway_of, network, attackers, desk, manifest, env,
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
            stop_processes([g.process for g in gateways if g.process is not None])
            time.sleep(0.5)  # the gateways' last retained statuses reach the monitor
            stop_processes([p.popen for p in agents if p.popen is not None])
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
    timeline = runner.timeline + link_outages(scenario.links, devices_run.links_started - started)
    report = build_report(scenario, workdir, started, network.kind, gateways, monitor, attackers, device_ids,
                     timed_out, settled, verify_store, timeline, vouchers=desk is not None)
    report.update(profile_sections(scenario, devices_run.profile_of, devices_run.link_of, devices_run.relays,
                                    monitor, device_ids))
    if city and not stop.is_set():
        report["city"] = city_of_run(scenario, gateways, devices, {n: g.name for n, g in gateway_of.items()}, _say)
    if not stop.is_set():
        add_model_figures(report, scenario, gateways, devices, _say)  # a reconstruction model's loss and AUC
        add_personal_figures(report, scenario, gateways, devices, _say)  # [personalization]: global vs personal
    report["final_accuracy"] = final_accuracy(report)
    _say(f"starling-emulate: report {report_path}, {write_report(report, report_path)}")
    return report


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
    report = variants_report(scenario, reports, workdir, started)
    _say(f"starling-emulate: report {report_path}, {write_report(report, report_path)}")
    return report


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
    print(summary(report, report_path), file=sys.stderr)
    return 0 if ok(report) else 1


if __name__ == "__main__":
    raise SystemExit(main())
