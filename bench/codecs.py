"""Bytes and accuracy per upload codec: i8, f16, f32, and topk (with error feedback) at two densities.

    python bench/codecs.py [--rounds 20] [--devices 10] [--epochs 2] [--lr 0.4] [--densities 0.1,0.05]
                           [--codecs i8,f16,f32,topk] [--seed 0]

Each codec is one run of the real emulator (Mosquitto, a gateway, one agent
process per watch subject, FedAvg) with the gateway's `[training] codec` (and
`density` for topk) set through the scenario; every run has the same seed,
data, initial model and learning rate. Per round the report's `bytes_up` /
`bytes_down` are what the gateway's MQTT connection received / sent in that
round (training and evaluation exchanges, receipts, releases); `update_bytes`
is the mean size of one training reply's update attachment, measured by
encoding a model-sized delta the way the devices do (the codec alone, without
the envelope). The accuracy of a round is the gateway's example-weighted
federated evaluation on the devices' test windows.

Prints {"rounds", "devices", "epochs", "lr", "seed", "codecs": {name: {"codec", "density"?,
"bytes_up_per_round", "bytes_down_per_round" (means over rounds 1..n), "update_bytes", "final_accuracy",
"accuracy" (per round)}}, "topk_vs_f32": {name: final accuracy minus f32's}, "seconds"}; progress goes
to stderr. Goal (issue 17): topk at <= 10% density within 0.02 of f32's final accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from hw.emulate import run  # noqa: E402
from hw.scenario import Scenario  # noqa: E402
from protocol import schemas  # noqa: E402
from protocol.tensors import TOPK, UPLOAD_CODECS  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def update_bytes(codec: str, density: float | None) -> int:
    """One training reply's attachment for the shipped model, with a delta of realistic spread."""
    weights = np.load(ROOT / "firmware_models" / "imu_cnn" / "weights.npz")
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(weights[k].shape) * 0.01).astype(np.float32) for k in weights.files}
    metrics = {"train_loss": 1.0, "steps": 20.0}
    return len(schemas.encode_update(delta, metrics, codec, density if density is not None else 0.1))


def one(name: str, codec: str, density: float | None, args: argparse.Namespace, work: Path) -> dict:
    subjects = tuple(range(1, args.devices + 1))
    scenario = Scenario(name=f"codecs-{name}", rounds=args.rounds, seed=args.seed, timeout_s=90.0 * args.rounds,
                        devices=args.devices, subjects=subjects, strategy="FedAvg", epochs=args.epochs, lr=args.lr,
                        broker="mosquitto", codec=codec, density=density)
    say(f"{name}: {args.rounds} rounds, {args.devices} devices, codec {codec}"
        + (f" at density {density}" if density is not None else ""))
    started = time.monotonic()
    report = run(scenario, work / f"{name}.json", work / name)
    if report["gateway"]["state"] != "done":
        raise RuntimeError(f"{name} run ended {report['gateway']['state']}; see {work / name}")
    rounds = [r for r in report["rounds"] if r["round"] > 0]
    accuracy = [round(r["accuracy"], 4) for r in rounds]
    out = {
        "codec": codec,
        **({"density": density} if density is not None else {}),
        "bytes_up_per_round": round(statistics.mean(r["bytes_up"] for r in rounds)),
        "bytes_down_per_round": round(statistics.mean(r["bytes_down"] for r in rounds)),
        "update_bytes": update_bytes(codec, density),
        "final_accuracy": accuracy[-1],
        "accuracy": accuracy,
    }
    say(f"{name}: final accuracy {out['final_accuracy']:.4f}, {out['bytes_up_per_round']} B up / "
        f"{out['bytes_down_per_round']} B down per round, {time.monotonic() - started:.0f} s")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=10, help="devices (watch subjects 1..N), default all 10")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.4, help="the devices' learning rate (bench/accuracy.py's)")
    parser.add_argument("--densities", default="0.1,0.05", help="topk densities, comma-separated")
    parser.add_argument("--codecs", default=",".join(UPLOAD_CODECS), help="codecs to run, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.devices <= 10:
        parser.error("--devices must be 1 to 10")
    codecs = [c for c in args.codecs.split(",") if c]
    if unknown := set(codecs) - set(UPLOAD_CODECS):
        parser.error(f"unknown codec(s) {sorted(unknown)}; known: {', '.join(UPLOAD_CODECS)}")
    densities = [float(d) for d in args.densities.split(",") if d]
    if any(not 0 < d <= 1 for d in densities):
        parser.error("--densities must lie in (0, 1]")
    runs = [(c, c, None) for c in codecs if c != TOPK]
    runs += [(f"topk_{d:g}", TOPK, d) for d in densities] if TOPK in codecs else []
    started = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, codec, density in runs:
            results[name] = one(name, codec, density, args, Path(tmp))
    gaps = ({name: round(r["final_accuracy"] - results["f32"]["final_accuracy"], 4)
             for name, r in results.items() if r["codec"] == TOPK} if "f32" in results else {})
    print(json.dumps({"rounds": args.rounds, "devices": args.devices, "epochs": args.epochs, "lr": args.lr,
                      "seed": args.seed, "codecs": results, "topk_vs_f32": gaps,
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
