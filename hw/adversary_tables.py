"""The scenario's attackers: its `[[adversary]]` tables (hw/scenario.py documents them), checked at load, each as
the `Adversary` it describes. A ConfigError names the field; hw/scenario.py raises it as a ScenarioError.

    adversaries = parse_adversaries(doc.get("adversary", []), gateways)
    adversary.devices(total)        # how many devices run it (a gateway attack: none)
    adversary.command(config_path)  # one of those devices' `python -m hw.adversary ...` command line

A device attack takes a share of the fleet (`fraction` or `count`, hw/tables.py) and its devices run
hw/adversary.py instead of the agent; a gateway attack (GATEWAY_ATTACKS) takes a `target` gateway instead, which
runs hw/tampered_gateway.py. Each attack takes only its own parameters (PARAMS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config import ConfigError

from .tables import NUMBER, array_of_tables, check_share, check_table, share_size

ADVERSARY_KEYS: dict[str, type | tuple[type, ...]] = {
    "attack": str, "fraction": NUMBER, "count": int, "scale": NUMBER, "sigma": NUMBER, "payload": str, "claim": int,
    "z": NUMBER, "bound_multiple": NUMBER, "target": str}
PARAMS = {"sign_flip": ("scale",), "scaling": ("scale",), "gaussian_noise": ("sigma",),
          "sybil": ("payload", "scale", "sigma"), "inflate_examples": ("scale", "claim"), "crafted": ("z",),
          "under_bound": ("bound_multiple",), "tampered_aggregate": ("scale",)}
GATEWAY_ATTACKS = ("tampered_aggregate",)  # run by a gateway (hw/tampered_gateway.py), not by devices
ATTACK_PARAMS = ("scale", "sigma", "payload", "claim", "z", "bound_multiple")
MAX_CLAIM = 10_000_000  # protocol.schemas.MAX_EXAMPLES


@dataclass(frozen=True)
class Adversary:
    """A share of the fleet that runs `python -m hw.adversary --attack <attack>`; or, for a gateway attack
    (GATEWAY_ATTACKS), the `target` gateway, which runs `python -m hw.tampered_gateway`."""

    attack: str
    fraction: float | None = None  # of all devices; or
    count: int | None = None  # this many devices
    scale: float | None = None
    sigma: float | None = None
    payload: str | None = None
    claim: int | None = None
    z: float | None = None
    bound_multiple: float | None = None
    target: str | None = None  # a gateway attack's gateway ("gw-N")

    @property
    def on_gateway(self) -> bool:
        return self.attack in GATEWAY_ATTACKS

    def devices(self, total: int) -> int:
        """How many of `total` devices run this attack: `count`, or `fraction` rounded (at least 1); a gateway
        attack none."""
        return share_size(total, self.fraction, self.count)

    def label(self) -> str:
        if self.on_gateway:
            return f"{self.attack} at {self.target}" + (f" x{self.scale:g}" if self.scale is not None else "")
        share = f"{self.fraction:.0%}" if self.fraction is not None else \
            f"{self.count} device{'' if self.count == 1 else 's'}"
        boost = f" x{self.scale:g}" if self.attack in ("sign_flip", "inflate_examples") \
            and self.scale not in (None, 1.0) else ""
        return f"{self.attack}{boost} {share}"

    def command(self, config_path: str | Path, *, collude: str | Path | None = None, colluders: int | None = None,
                fleet: int | None = None) -> list[str]:
        """The `python -m hw.adversary ...` command line of one of these devices; crafted attackers also get
        their rendezvous folder `collude`, how many `colluders` meet there and their gateway's `fleet` size."""
        from .adversary import adversary_command  # noqa: PLC0415

        if self.attack == "sign_flip" and self.scale not in (None, 1.0):
            return adversary_command("scaling", config_path, scale=-self.scale)  # -scale x the honest delta
        scale = self.scale if self.attack != "sign_flip" else None
        crafted = {"collude": collude, "colluders": colluders, "fleet": fleet} if self.attack == "crafted" else {}
        return adversary_command(self.attack, config_path, scale=scale, sigma=self.sigma, payload=self.payload,
                                 claim=self.claim, z=self.z, bound_multiple=self.bound_multiple, **crafted)


def parse_adversaries(items: Any, gateways: int, where: str = "adversary") -> tuple[Adversary, ...]:
    """The `[[adversary]]` tables `items`, checked, for a fleet of `gateways` gateways."""
    from .adversary import ATTACKS, SYBIL_PAYLOADS  # noqa: PLC0415 (agent code: only when asked)

    known = ", ".join((*ATTACKS, *GATEWAY_ATTACKS))
    out = []
    targets: set[str] = set()
    for i, table in enumerate(array_of_tables(items, where)):
        at = f"{where}[{i}]"
        check_table(at, table, ADVERSARY_KEYS)
        attack = table.get("attack")
        if attack is None:
            raise ConfigError(f"{at}.attack is required: one of {known}")
        if attack not in ATTACKS and attack not in GATEWAY_ATTACKS:
            raise ConfigError(f"{at}.attack: unknown attack {attack!r}; one of {known}")
        if attack in GATEWAY_ATTACKS:
            targets.add(_gateway_target(at, table, attack, gateways, targets))
        elif "target" in table:
            raise ConfigError(f"{at}.target: only a gateway attack ({', '.join(GATEWAY_ATTACKS)}) has a target; "
                              f"{attack} runs on a share of the devices (fraction or count)")
        else:
            check_share(at, table)
        for key in ("scale", "sigma", "claim", "bound_multiple"):
            if key in table and not table[key] > 0:
                raise ConfigError(f"{at}.{key} must be positive, got {table[key]}")
        if "z" in table and not table["z"] >= 0:
            raise ConfigError(f"{at}.z must not be negative, got {table['z']}")
        if "claim" in table and table["claim"] > MAX_CLAIM:
            raise ConfigError(f"{at}.claim must be at most {MAX_CLAIM} (the most a reply may carry), "
                              f"got {table['claim']}")
        allowed = PARAMS.get(attack, ())
        for key in ATTACK_PARAMS:
            if key in table and key not in allowed:
                raise ConfigError(f"{at}.{key} is not a parameter of {attack}"
                                  + (f" (it takes {', '.join(allowed)})" if allowed else " (it takes none)"))
        if "payload" in table and table["payload"] not in SYBIL_PAYLOADS:
            raise ConfigError(f"{at}.payload must be one of {', '.join(SYBIL_PAYLOADS)}, not {table['payload']!r}")
        number = {key: float(table[key]) for key in ("fraction", "scale", "sigma", "z", "bound_multiple") if key in table}
        out.append(Adversary(attack, number.get("fraction"), table.get("count"), number.get("scale"), number.get("sigma"),
                             table.get("payload"), table.get("claim"), number.get("z"), number.get("bound_multiple"),
                             table.get("target")))
    return tuple(out)


def _gateway_target(at: str, table: dict[str, Any], attack: str, gateways: int, taken: set[str]) -> str:
    """A gateway attack's `target`: a gateway of the fleet ("gw-N", as [[fault]] names them), one attack each."""
    if "fraction" in table or "count" in table:
        raise ConfigError(f"{at}: {attack} is a gateway attack: it takes target (a gateway), not fraction or count")
    names = [f"gw-{n + 1}" for n in range(gateways)]
    target = table.get("target")
    if target is None:
        raise ConfigError(f"{at}.target is required for {attack}: the gateway that runs it, one of "
                          f"{', '.join(names)}")
    if target not in names:
        raise ConfigError(f"{at}.target must be one of {', '.join(names)} (fleet.gateways = {gateways}), "
                          f"not {target!r}")
    if target in taken:
        raise ConfigError(f"{at}.target: {target} already runs a gateway attack (one per gateway)")
    return target
