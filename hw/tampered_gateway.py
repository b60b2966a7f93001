"""A gateway that records aggregates not computed from its inputs: what the city tier's audits must catch.

    python -m hw.tampered_gateway [--scale 0.05] [--seed 0] run --config gateway.toml

It runs the real gateway (`gateway.cli.main`, with every argument after the
launcher's own) with one change, in this process only: each strategy that
the gateway's `GatewayConfig.make_strategy` builds has its `aggregate_train`
wrapped on the instance, so every round's aggregate is the honest one plus
Gaussian noise (per array, `scale` x the array's RMS, at least `scale` x
MIN_RMS). The gateway releases that model, records it (an `aggregate` vertex
naming the real inputs, the strategy's real parameters, no wrapper) and
offers it to the city as if it had computed it: a peer that recomputes the
aggregate from its recorded inputs gets another digest, which is evidence.

Nothing else changes. Flower's classes are untouched: the peers' spot
checks and the bit-exact recompute (`gateway/recompute.py`) build their own
strategy instances, and the city merge is its own rule. The strategy's
parameters, its server-side state and the provenance of each aggregate (the
replies it took, reported by the honest `aggregate_train` the wrapper calls
first) are the real ones; only the numbers it returns are not.

From the emulator: `[[adversary]] attack = "tampered_aggregate"`, `target =
"gw-N"`, optional `scale` (hw/scenario.py); a fault's restart of that gateway
starts it through this launcher again.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

import numpy as np

from protocol.logs import event

log = logging.getLogger("starling.gateway.tampered")

DEFAULT_SCALE = 0.05
MIN_RMS = 1e-3  # an all-zero array (a fresh bias) is tampered with too


def perturb(weights: dict[str, np.ndarray], scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each array plus N(0, (scale x max(its RMS, MIN_RMS))^2) noise, float32; the same names and shapes."""
    out = {}
    for name, array in weights.items():
        array = np.asarray(array, dtype=np.float32)
        rms = float(np.sqrt(np.mean(np.square(array, dtype=np.float64)))) if array.size else 0.0
        noise = rng.normal(0.0, scale * max(rms, MIN_RMS), size=array.shape)
        out[name] = (array + noise).astype(np.float32)
    return out


def tamper(strategy: Any, scale: float, rng: np.random.Generator) -> Any:
    """`strategy` (this instance only) with its round aggregates perturbed; returns it."""
    from flwr.app import Array, ArrayRecord

    honest = strategy.aggregate_train

    def aggregate_train(server_round: int, replies: Any) -> tuple[Any, Any]:
        arrays, metrics = honest(server_round, replies)
        if arrays is None:
            return arrays, metrics
        weights = perturb({name: value.numpy() for name, value in arrays.items()}, scale, rng)
        event(log, "tamper.aggregate", logging.WARNING, round=server_round, scale=scale)
        return ArrayRecord({name: Array(value) for name, value in weights.items()}), metrics

    strategy.aggregate_train = aggregate_train  # on the instance: its class and other instances are untouched
    return strategy


def install(scale: float, seed: int) -> None:
    """Make this process's gateway tamper: every strategy its config builds is `tamper`ed (seeded noise)."""
    from gateway.config import GatewayConfig

    honest = GatewayConfig.make_strategy
    rng = np.random.default_rng(seed)

    def make_strategy(self: GatewayConfig, selection_recorder: Any = None, population: Any = None) -> Any:
        return tamper(honest(self, selection_recorder, population), scale, rng)

    GatewayConfig.make_strategy = make_strategy


def command(config_path: Any, scale: float | None = None, seed: int = 0) -> list[str]:
    """The command line of a tampering gateway with the config at `config_path` (what the emulator starts)."""
    return [sys.executable, "-m", "hw.tampered_gateway", "--scale", repr(float(scale or DEFAULT_SCALE)),
            "--seed", str(seed), "run", "--config", str(config_path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw.tampered_gateway",
                                     description="Run starling-gateway with its round aggregates tampered with.")
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                        help=f"the noise's std relative to each array's RMS (default {DEFAULT_SCALE})")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise")
    parser.add_argument("gateway_args", nargs=argparse.REMAINDER,
                        help="starling-gateway's own arguments (run --config FILE)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.scale) and args.scale > 0):
        print(f"hw.tampered_gateway: --scale must be a positive number, got {args.scale}", file=sys.stderr)
        return 2
    if not args.gateway_args:
        print("hw.tampered_gateway: give the gateway's command after the launcher's options, e.g. run --config FILE",
              file=sys.stderr)
        return 2
    install(args.scale, args.seed)
    from gateway.cli import main as gateway_main

    return gateway_main(args.gateway_args)


if __name__ == "__main__":
    raise SystemExit(main())
