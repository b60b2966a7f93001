"""The run's devices as processes: which of them attack, and for each its agent.toml (hw/fleet_configs.py) and
the process that runs it — the agent (`python -m agent.cli run`), an attacker (`python -m hw.adversary`) or a
device pool (`python -m hw.device_pool`, many devices in one process, made per profile) — with its profile's CPU
share and memory cap (hw/profiles.py), reaching its broker through its link's relay (hw/links.py).

    attackers = choose_attackers(scenario, names)        # seeded, disjoint per [[adversary]] table
    run = device_processes(scenario, devices, gateway_of, network, attackers, desk, manifest, env, stack, workdir)
    run.processes                                        # device name -> its Process (a pool's once per member)

Nothing runs yet: hw/emulate.py starts the processes (attackers first), after the gateways.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.atomic import write_atomic

from .adversary_tables import Adversary
from .fleet import GatewayRun, Network, Process
from .fleet_configs import agent_model_table, write_agent_config
from .links import LinkRelay
from .profiles import CpuThrottle, DeviceProfile, assign, memory_cap
from .scenario import Scenario


def choose_attackers(scenario: Scenario, names: list[str]) -> dict[str, tuple[int, Adversary]]:
    """Device name -> (index of its [[adversary]] table, the table): a seeded choice, disjoint per table."""
    chosen = assign(names, scenario.adversaries, scenario.seed, salt=7)
    index = {id(adversary): i for i, adversary in enumerate(scenario.adversaries)}  # equal tables stay apart
    return {name: (index[id(adversary)], adversary) for name, adversary in chosen.items()}


@dataclass
class DevicesRun:
    """The run's device processes (a pool's process once per member) and what their profiles made."""

    processes: dict[str, Process]
    profile_of: dict[str, DeviceProfile]
    link_of: dict[str, Any]
    relays: dict[tuple[str, tuple[str, int]], LinkRelay]
    links_started: float


def device_processes(scenario: Scenario, devices: list[tuple[str, Path]], gateway_of: dict[str, GatewayRun],
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

    model_table = agent_model_table(scenario)
    device_procs: dict[str, Process] = {}
    pooled: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # profile name -> its pooled devices
    for name, data in devices:
        g = gateway_of[name]
        host, port = network.endpoint(g.name)
        if name in link_of:  # through its emulated link
            host, port = "127.0.0.1", relays[link_of[name].name, (host, port)].port
        profile = profile_of.get(name)
        conf = write_agent_config(workdir / "devices" / name, name, g, (host, port), data, model_table, profile,
                                  voucher=bool(desk))
        if name in attackers:
            adversary = attackers[name][1]
            if adversary.attack == "crafted":  # the crafted attackers of one gateway collude
                colluders = sum(1 for n in g.devices if n in attackers and attackers[n][1].attack == "crafted")
                cmd = adversary.command(conf, collude=workdir / "collusion" / g.name, colluders=colluders,
                                        fleet=len(g.devices))
            else:
                cmd = adversary.command(conf)
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
