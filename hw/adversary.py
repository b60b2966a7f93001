"""Adversarial devices for the emulator: the real agent with one thing changed.

    python -m hw.adversary --attack sign_flip --config agent.toml
    python -m hw.adversary --attack scaling --scale 10 --config agent.toml
    python -m hw.adversary --attack gaussian_noise --sigma 1.0 --config agent.toml
    python -m hw.adversary --attack sybil --sybil-payload sign_flip --config agent.toml
    python -m hw.adversary --attack inflate_examples --scale 0.1 --config agent.toml
    python -m hw.adversary --attack crafted --collude /run/collusion/gw-1 --colluders 3 --fleet-size 10 --config agent.toml
    python -m hw.adversary --attack under_bound --bound-multiple 2.0 --config agent.toml

The config is the same agent TOML as `starling-agent run --config`, and the
start-up mirrors `agent.cli._run` (replay file or live sensors through
`agent.data_source.open_data`). From the emulator:

    cmd = adversary_command("sign_flip", conf)            # -> [python, "-m", "hw.adversary", ...]
    subprocess.Popen(cmd, env=hw.broker._child_env(), ...)

and in-process (tests): `AdversarialAgent(config, identity, model, data, make_attack("replay")).run(stop)`.

Each attack is a class of `hw.attacks` (its module docstring has the table: the hook
and what the gateway does with it); `make_attack` makes one by name, `AdversarialAgent` is
the agent that runs it, and `main` is the command line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from agent import learner as _learner
from agent import service as _service
from agent.config import AgentConfig
from agent.model_source import load_model
from agent.samples import LocalData
from agent.service import Agent
from protocol import envelope
from protocol.keys import Identity
from protocol.logs import event

from .attacks import (
    BOUND_MULTIPLE,
    INFLATE_SCALE,
    INFLATED_CLAIM,
    Attack,
    Crafted,
    ForgedSignature,
    FreeRider,
    GaussianNoise,
    InflateExamples,
    LabelFlip,
    Replay,
    Scaling,
    SignFlip,
    Sybil,
    UnderBound,
)

log = logging.getLogger("starling.adversary")

ATTACKS = ("sign_flip", "scaling", "gaussian_noise", "label_flip", "free_rider", "replay", "forged_signature", "sybil",
           "inflate_examples", "crafted", "under_bound")
# What a sybil does once a gateway with policy "open" has enrolled it.
SYBIL_PAYLOADS = ("none", "sign_flip", "scaling", "gaussian_noise", "label_flip", "free_rider")

# What the gateway should do with each attacker's replies, for the emulator's per-attack report:
# "accepted" (validly signed: only the strategy can defend), or the rejection reasons expected.
EXPECTED = {
    "sign_flip": ("accepted",),
    "scaling": ("accepted",),
    "gaussian_noise": ("accepted",),
    "label_flip": ("accepted",),
    "free_rider": ("accepted",),
    "replay": ("replay", "stale_round"),
    "forged_signature": ("bad_signature",),
    "sybil": ("unknown_device",),  # and its enrollment: no_voucher / not_allowed (accepted under "open")
    "inflate_examples": ("accepted",),  # validly signed: only the weights rule (and robust strategies) can help
    "crafted": ("accepted",),
    "under_bound": ("accepted",),
}



def make_attack(name: str, *, scale: float | None = None, sigma: float = 1.0, num_classes: int | None = None,
                payload: str = "sign_flip", seed: int | None = None, claim: int = INFLATED_CLAIM,
                collude: str | Path | None = None, colluders: int = 1, z: float | None = None,
                fleet: int | None = None, bound_multiple: float = BOUND_MULTIPLE, device: str = "") -> Attack:
    """The attack called `name` (one of ATTACKS). `num_classes` is needed by label_flip (also as a
    sybil payload); `payload` is what a sybil does once enrolled ("none": train honestly). `scale`:
    scaling's factor (default 10), inflate_examples' boost (default INFLATE_SCALE); `claim`:
    inflate_examples'; `collude`, `colluders`, `z`, `fleet`, `device`: crafted's (see `Crafted`);
    `bound_multiple`: under_bound's."""
    if name == "sign_flip":
        return SignFlip()
    if name == "scaling":
        return Scaling(10.0 if scale is None else scale)
    if name == "inflate_examples":
        return InflateExamples(INFLATE_SCALE if scale is None else scale, claim)
    if name == "crafted":
        return Crafted(collude, colluders, z, fleet, device=device)
    if name == "under_bound":
        return UnderBound(bound_multiple)
    if name == "gaussian_noise":
        return GaussianNoise(sigma, seed)
    if name == "free_rider":
        return FreeRider()
    if name == "label_flip":
        if num_classes is None:
            raise ValueError("label_flip needs the model's number of classes")
        return LabelFlip(num_classes)
    if name == "replay":
        return Replay()
    if name == "forged_signature":
        return ForgedSignature()
    if name == "sybil":
        if payload not in SYBIL_PAYLOADS:
            raise ValueError(f"a sybil's payload must be one of {SYBIL_PAYLOADS}, not {payload!r}")
        inner = None if payload == "none" else make_attack(payload, scale=scale, sigma=sigma,
                                                            num_classes=num_classes, seed=seed)
        return Sybil(inner)
    raise ValueError(f"unknown attack {name!r}: one of {', '.join(ATTACKS)}")


# --- the agent with an attack --------------------------------------------------------------

_current = threading.local()  # the attack of the agent whose worker thread is running


class _LearnerView:
    """What `agent.service` sees as `agent.learner`: the real module, except that `train`, called
    from an adversarial agent's worker thread, goes through that agent's attack."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def train(self, model, base, data, task, rng, max_seconds=0.0, max_samples=0, residual=None) -> _learner.Outcome:
        attack = getattr(_current, "attack", None)
        if attack is None:
            return self._real.train(model, base, data, task, rng, max_seconds, max_samples, residual)
        # An attacker keeps no error feedback (topk): what it sends is its attack's, not an honest delta's rest.
        return attack.train(self._real.train, model, base, data, task, rng, max_seconds, max_samples)


def _install_view() -> None:
    if not isinstance(_service.learner, _LearnerView):
        _service.learner = _LearnerView(_service.learner)


def _exchange_of(payload: bytes) -> str:
    """`<round>-<task id>` of a task, unverified ("" if it does not decode): the agent checks it anyway."""
    try:
        ctx = envelope.decode(payload).ctx
    except Exception:  # noqa: BLE001 (a bad task is the agent's to refuse)
        return ""
    return f"{ctx.round:06d}-{ctx.task}"


class AdversarialAgent(Agent):
    """`Agent` with an `Attack`: `AdversarialAgent(config, identity, model, data, attack).run(stop)`."""

    def __init__(self, config: AgentConfig, identity: Identity, model, data, attack: Attack,
                 architecture: str = "", seed: int = 0) -> None:
        _install_view()
        self.attack = attack
        super().__init__(attack.config(config), attack.identity(identity), model, data, architecture, seed)

    def _handle_task(self, payload: bytes, saved: str = "") -> None:
        _current.attack = self.attack
        try:
            self.attack.begin_task(_exchange_of(payload))
            if self.attack.intercept_task(self, payload):
                return
            super()._handle_task(payload, saved)
            self.attack.after_task(self, payload)
        finally:
            _current.attack = None

    def _local_data(self, kind: str) -> LocalData:
        data = super()._local_data(kind)
        return self.attack.train_data(data) if kind == "train" else data

    def _send_enroll(self) -> None:
        super()._send_enroll()
        self.attack.after_enroll(self)


# --- command line --------------------------------------------------------------------------


def adversary_command(attack: str, config_path: str | Path, *, scale: float | None = None,
                      sigma: float | None = None, payload: str | None = None, log_level: str = "INFO",
                      python: str = sys.executable, claim: int | None = None, collude: str | Path | None = None,
                      colluders: int | None = None, z: float | None = None, fleet: int | None = None,
                      bound_multiple: float | None = None) -> list[str]:
    """The command line that runs one adversarial device (an agent TOML, as for `starling-agent run`)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: one of {', '.join(ATTACKS)}")
    cmd = [python, "-m", "hw.adversary", "--attack", attack, "--config", str(config_path), "--log-level", log_level]
    if scale is not None:
        cmd += ["--scale", repr(float(scale))]
    if sigma is not None:
        cmd += ["--sigma", repr(float(sigma))]
    if payload is not None:
        cmd += ["--sybil-payload", payload]
    if claim is not None:
        cmd += ["--claim", str(int(claim))]
    if collude is not None:
        cmd += ["--collude", str(collude)]
    if colluders is not None:
        cmd += ["--colluders", str(int(colluders))]
    if z is not None:
        cmd += ["--z", repr(float(z))]
    if fleet is not None:
        cmd += ["--fleet-size", str(int(fleet))]
    if bound_multiple is not None:
        cmd += ["--bound-multiple", repr(float(bound_multiple))]
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hw.adversary",
                                     description="Run a Starling agent that attacks the federation (emulator only).")
    parser.add_argument("--attack", required=True, choices=ATTACKS)
    parser.add_argument("--config", required=True, help="agent TOML config file (as for starling-agent run)")
    parser.add_argument("--scale", type=float, default=None,
                        help="scaling: the factor (default 10); inflate_examples: sends -scale x its delta "
                             f"(default {INFLATE_SCALE:g})")
    parser.add_argument("--sigma", type=float, default=1.0, help="gaussian_noise: the standard deviation (default 1)")
    parser.add_argument("--sybil-payload", default="sign_flip", choices=SYBIL_PAYLOADS,
                        help="sybil: what it does if a gateway enrolls it (default sign_flip)")
    parser.add_argument("--claim", type=int, default=INFLATED_CLAIM,
                        help=f"inflate_examples: the example count it claims (default {INFLATED_CLAIM:,})")
    parser.add_argument("--collude", metavar="DIR", help="crafted: the colluders' rendezvous folder (none: alone)")
    parser.add_argument("--colluders", type=int, default=1,
                        help="crafted: how many attackers collude, this one included (default 1)")
    parser.add_argument("--z", type=float, default=None,
                        help="crafted: sends mu - z x sigma (default: the paper's z_max for --fleet-size "
                             "devices and --colluders attackers; without --fleet-size 1.0)")
    parser.add_argument("--fleet-size", type=int, default=None,
                        help="crafted: how many devices take part in a round (for the default z)")
    parser.add_argument("--bound-multiple", type=float, default=BOUND_MULTIPLE,
                        help="under_bound: the gateway's [defense] median_multiple it stays under "
                             f"(default {BOUND_MULTIPLE:g}, the gateway's default)")
    parser.add_argument("--model-dir", metavar="DIR",
                        help="a built model's folder to train instead of the config's [model] "
                             "(name or path)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Like `starling-agent run`, with `--attack`."""
    from agent.config import ConfigError, load_config
    from agent.data_source import DataError, needs_labels, num_classes, open_data
    from protocol import logs
    from protocol.errors import KeyFileError
    from protocol.keys import load_or_create

    args = build_parser().parse_args(argv)
    logs.setup("agent", args.log_level)
    prog = "hw.adversary"
    try:
        config = load_config(args.config)
        identity = load_or_create(config.key)
    except (ConfigError, KeyFileError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.attack != "sybil" and config.voucher is not None and not config.voucher.is_file():
        print(f"{prog}: device.voucher: {config.voucher} does not exist", file=sys.stderr)
        return 2
    try:
        manifest, model = load_model(args.model_dir or config)  # as `starling-agent run` loads it
    except (OSError, ValueError) as exc:
        print(f"{prog}: model {args.model_dir or config.model}: {exc}", file=sys.stderr)
        return 2
    flips = args.attack == "label_flip" or (args.attack == "sybil" and args.sybil_payload == "label_flip")
    if flips and not needs_labels(manifest):
        print(f"{prog}: label_flip needs a classifier; {config.model} learns without labels", file=sys.stderr)
        return 2
    try:
        attack = make_attack(args.attack, scale=args.scale, sigma=args.sigma, payload=args.sybil_payload,
                             num_classes=num_classes(manifest) if needs_labels(manifest) else None,
                             seed=identity.node_id % 2**32, claim=args.claim, collude=args.collude,
                             colluders=args.colluders, z=args.z, fleet=args.fleet_size,
                             bound_multiple=args.bound_multiple, device=identity.id)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    event(log, "attack.start", attack=args.attack, device=identity.id)
    try:
        with open_data(config, manifest) as data:
            AdversarialAgent(config, identity, model, data, attack, architecture=manifest["sha256"],
                             seed=identity.node_id % 2**32).run(stop)
    except DataError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
