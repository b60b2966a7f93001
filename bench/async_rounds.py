"""Time to 0.80 accuracy, synchronous vs buffered asynchronous rounds, on a fleet of uneven speed.

    python bench/async_rounds.py [--devices 10] [--slow 0.3] [--slowdown 4] [--sync-rounds 10] [--steps 0]
                                 [--buffer 6] [--max-staleness 4] [--staleness-exponent 0.5] [--seed 0]

Runs the real emulator twice (broker, gateway and agent processes; watch data, one device per subject), same
seed, same fleet: a share `--slow` of the devices `--slowdown` times slower than the rest (hw/profiles.py
`cpu_slowdown`). Emulated devices share the host's cores, so every device is throttled (`base_slowdown`, the
fast devices' `cpu_slowdown`; the slow ones get `--slowdown` times that) until the whole fleet needs at most
`--cores-used` of the host: each device then runs at its own pace, as separate machines do. Once with
`[rounds] mode = "sync"` (each round waits for its slowest device), once with `mode = "buffered"` (a step every
`--buffer` arrived updates, gateway/buffered.py). Federated evaluation runs only at the end of each run (it would
wait for busy devices), so the accuracy timeline is each release's model, read from the gateway's blob store,
evaluated on every device's test windows (hw/city_report.Evaluator, as the devices evaluate) at the time the
ledger says it was released. Prints JSON: per mode the time to the target and the final accuracy; the ratio
(buffered / sync: the goal is <= 0.6), timed from each run's first model (the start-up before it is the same in
both modes), and the final accuracies' difference (goal: within 0.02), taken at equal training time: the sync
run's last model against the buffered model released by then (`accuracy_at_sync_end`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hw.city_report import Evaluator  # noqa: E402
from hw.emulate import run  # noqa: E402
from hw.model_report import round_model  # noqa: E402
from hw.scenario import parse_scenario  # noqa: E402
from protocol.config import tomllib  # noqa: E402

TARGET = 0.80
GOAL_RATIO = 0.6
GOAL_GAP = 0.02


def scenario(args: argparse.Namespace, mode: str) -> dict:
    rounds = args.sync_rounds if mode == "sync" else args.steps
    doc = {
        "run": {"name": f"async_rounds_{mode}", "rounds": rounds, "seed": args.seed, "timeout_s": args.timeout_s},
        "fleet": {"devices": args.devices, "subjects": list(range(1, args.devices + 1))},
        "dataset": {"source": "watch", "stride": args.stride},
        "strategy": {"name": "FedAvg", "params": {}},
        "training": {"epochs": args.epochs, "batch_size": 32, "lr": args.lr, "deadline_s": 600},
        "broker": {"kind": "auto"},
        "device_profile": fleet_profiles(args),
        "rounds": {"mode": mode, "evaluate_every": rounds,
                   **({"buffer": args.buffer, "max_staleness": args.max_staleness,
                       "staleness_exponent": args.staleness_exponent} if mode == "buffered" else {})},
    }
    return doc


def base_slowdown(args: argparse.Namespace) -> float:
    """The slowdown of the fleet's fast devices: enough that the whole fleet fits this machine's cores.

    Real devices are separate machines; emulated ones share the host's cores. Ten devices on two
    cores at full speed would each get a fifth of a core whatever their profile, so a slow device
    would be no slower than a fast one and no round would ever wait for it. With every device
    throttled so that all of them together need at most `--cores-used` of the host's cores, each
    runs at its own pace and the slow ones are exactly `--slowdown` times slower than the rest.
    """
    if args.base_slowdown:
        return args.base_slowdown
    fast, slow = args.devices * (1 - args.slow), args.devices * args.slow
    cores = max(1.0, (os.cpu_count() or 1) * args.cores_used)
    return max(1.0, round((fast + slow / args.slowdown) / cores, 1))


def fleet_profiles(args: argparse.Namespace) -> list[dict]:
    base = base_slowdown(args)
    slow = {"name": "slow", "fraction": args.slow, "cpu_slowdown": base * args.slowdown}
    if base == 1.0:
        return [slow]
    return [slow, {"name": "fast", "fraction": round(1 - args.slow, 6), "cpu_slowdown": base}]


def timeline(report: dict, workdir: Path, evaluator: Evaluator) -> list[dict]:
    """Each release of the run's lineage (oldest first): its time and its accuracy on every device."""
    releases = sorted(report["lineage"]["releases"], key=lambda r: r["t"])
    blobs = next(workdir.glob("*/blobs"))
    out = []
    for release in releases:
        weights = round_model(blobs, release["model"])
        if weights is None:
            continue
        out.append({"round": release["round"], "t": release["t"],
                    "accuracy": evaluator.evaluate(weights)["accuracy"]})
    return out


def accuracy_at(line: list[list[float]], seconds: float | None) -> float | None:
    """The accuracy of the newest release at most `seconds` after the run's first model ([t, accuracy] pairs)."""
    if not line or seconds is None:
        return None
    start = line[0][0]
    return [accuracy for t, accuracy in line if t - start <= seconds + 1e-9][-1]


def devices_of(workdir: Path) -> list[tuple[str, str, Path]]:
    out = []
    for conf in sorted(workdir.glob("devices/*/agent.toml")):
        with open(conf, "rb") as f:
            doc = tomllib.load(f)
        out.append((conf.parent.name, "gw", Path(doc["data"]["replay"])))
    return out


def one(args: argparse.Namespace, mode: str, tmp: Path) -> dict:
    print(f"async_rounds: {mode} run ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    workdir = tmp / mode
    report = run(parse_scenario(scenario(args, mode)), tmp / f"{mode}.json", workdir)
    line = timeline(report, workdir, Evaluator("imu_cnn", devices_of(workdir)))
    reached = next((p["t"] for p in line if p["accuracy"] is not None and p["accuracy"] >= TARGET), None)
    # Timed from the lineage's first model: the start-up before it (broker, gateway, enrollment) is the same in
    # both modes and is not what the mode changes.
    first = line[0]["t"] if line else None
    training = None if reached is None or first is None else round(reached - first, 3)
    final = line[-1]["accuracy"] if line else None
    print(f"async_rounds: {mode}: {len(line)} releases in {time.monotonic() - started:.0f} s, "
          f"time to {TARGET}: {training} s of training ({reached} s from the start), final accuracy {final}",
          file=sys.stderr, flush=True)
    return {"time_to_target_s": training, "time_to_target_from_start_s": reached, "final_accuracy": final,
            "releases": len(line),
            "run_seconds": report.get("seconds") or round(time.monotonic() - started, 1),
            "timeline": [[p["t"], p["accuracy"]] for p in line]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--slow", type=float, default=0.3, help="share of the devices at --slowdown")
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--sync-rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=0,
                        help="buffered steps (0: twice the sync run's updates, 2 x sync rounds x devices / buffer, "
                             "so that the buffered run outlasts the sync run)")
    parser.add_argument("--buffer", type=int, default=6)
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--staleness-exponent", type=float, default=0.5, help="weight (1 + staleness)^-exponent")
    parser.add_argument("--stride", type=int, default=64, help="window stride of the watch data")
    parser.add_argument("--base-slowdown", type=float, default=0.0,
                        help="the fast devices' cpu_slowdown (0: so that the fleet fits --cores-used of the host)")
    parser.add_argument("--cores-used", type=float, default=0.75, help="share of the host's cores the fleet may use")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=900)
    args = parser.parse_args()
    if not args.steps:
        args.steps = max(1, round(2 * args.sync_rounds * args.devices / args.buffer))
    with tempfile.TemporaryDirectory() as tmp:
        sync = one(args, "sync", Path(tmp))
        buffered = one(args, "buffered", Path(tmp))
    ratio = None
    if sync["time_to_target_s"] and buffered["time_to_target_s"] is not None:
        ratio = round(buffered["time_to_target_s"] / sync["time_to_target_s"], 3)
    # The final accuracies are compared at equal training time: the buffered model released by the time the
    # sync run released its last one (a buffered run ends by its step count, not by the clock).
    sync_seconds = sync["timeline"][-1][0] - sync["timeline"][0][0] if sync["timeline"] else None
    buffered["accuracy_at_sync_end"] = accuracy_at(buffered["timeline"], sync_seconds)
    gap = None
    if sync["final_accuracy"] is not None and buffered["accuracy_at_sync_end"] is not None:
        gap = round(buffered["accuracy_at_sync_end"] - sync["final_accuracy"], 4)
    print(json.dumps({
        "target_accuracy": TARGET, "devices": args.devices, "slow_share": args.slow, "cpu_slowdown": args.slowdown,
        "base_slowdown": base_slowdown(args), "buffer": args.buffer, "max_staleness": args.max_staleness,
        "staleness_exponent": args.staleness_exponent, "steps": args.steps, "sync_rounds": args.sync_rounds,
        "sync": sync, "buffered": buffered,
        "ratio": ratio, "final_accuracy_difference": gap,
        "goal_met": ratio is not None and ratio <= GOAL_RATIO and gap is not None and abs(gap) <= GOAL_GAP,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
