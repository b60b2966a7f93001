"""Bytes and accuracy per upload codec (i8, f16, f32, topk with error feedback at two densities) and per
model download (full float32 models, or i8 / f16 deltas from the release before).

    python bench/codecs.py [--rounds 20] [--devices 10] [--epochs 2] [--lr 0.4] [--densities 0.1,0.05]
                           [--codecs i8,f16,f32,topk] [--downloads i8,full,f16] [--seed 0]

The codec runs use the gateway's default download (i8 deltas); the download runs upload in i8 and change
only `[training] download` (the run named `i8` is both: i8 up, i8 deltas down).

Each codec is one run of the real emulator (Mosquitto, a gateway, one agent
process per watch subject, FedAvg) with the gateway's `[training] codec` (and
`density` for topk) set through the scenario; every run has the same seed,
data, initial model and learning rate. Per round the report's `bytes_up` /
`bytes_down` are what the gateway's MQTT connection received / sent in that
round (training and evaluation exchanges, receipts, releases); `update_bytes`
is the mean size of one training reply's update attachment, measured by
encoding a model-sized delta the way the devices do (the codec alone, without
the envelope). `device_bytes_down_per_round` is what the devices themselves
received of models in rounds 1..n (each agent logs every model it fetches,
`model.fetched how=delta|full bytes=`: the signed release or delta as it
arrived; round 0's first full model left out), `device_downloads` how many
fetches were deltas and how many full models. The accuracy of a round is the
gateway's example-weighted federated evaluation on the devices' test windows.

Prints {"rounds", "devices", "epochs", "lr", "seed", "codecs": {name: {"codec", "density"?,
"download", "bytes_up_per_round", "bytes_down_per_round" (means over rounds 1..n), "device_bytes_down_per_round",
"device_downloads", "update_bytes", "final_accuracy", "accuracy" (per round)}}, "topk_vs_f32": {name: final
accuracy minus f32's}, "downloads_vs_full": {name: final accuracy minus the full download's}, "seconds"};
progress goes to stderr. Goal (issue 17): topk at <= 10% density within 0.02 of f32's final accuracy.
"""

from __future__ import annotations

import argparse
import json
import re
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
from protocol.schemas import DEFAULT_DOWNLOAD, DOWNLOADS  # noqa: E402
from protocol.tensors import TOPK, UPLOAD_CODECS  # noqa: E402

FETCHED = re.compile(r"model\.fetched .*?version=(\d+) how=(\w+) bytes=(\d+)")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def update_bytes(codec: str, density: float | None) -> int:
    """One training reply's attachment for the shipped model, with a delta of realistic spread."""
    weights = np.load(ROOT / "firmware_models" / "imu_cnn" / "weights.npz")
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(weights[k].shape) * 0.01).astype(np.float32) for k in weights.files}
    metrics = {"train_loss": 1.0, "steps": 20.0}
    return len(schemas.encode_update(delta, metrics, codec, density if density is not None else 0.1))


def device_downloads(logs: Path) -> tuple[int, dict[str, int]]:
    """(bytes of the models the devices fetched after their first, how many were deltas / full), from the
    agents' logs (`model.fetched`)."""
    total, counts = 0, {}
    for path in sorted(logs.glob("*.log")):
        fetched = [m.groups() for m in FETCHED.finditer(path.read_text(errors="replace"))]
        for _, how, size in fetched[1:]:  # the first: the lineage's first model, whole for every device
            total += int(size)
            counts[how] = counts.get(how, 0) + 1
    return total, counts


def one(name: str, codec: str, density: float | None, download: str, args: argparse.Namespace,
        work: Path) -> dict:
    subjects = tuple(range(1, args.devices + 1))
    scenario = Scenario(name=f"codecs-{name}", rounds=args.rounds, seed=args.seed, timeout_s=90.0 * args.rounds,
                        devices=args.devices, subjects=subjects, strategy="FedAvg", epochs=args.epochs, lr=args.lr,
                        broker="mosquitto", codec=codec, density=density, download=download)
    say(f"{name}: {args.rounds} rounds, {args.devices} devices, codec {codec}"
        + (f" at density {density}" if density is not None else "") + f", download {download}")
    started = time.monotonic()
    report = run(scenario, work / f"{name}.json", work / name)
    if report["gateway"]["state"] != "done":
        raise RuntimeError(f"{name} run ended {report['gateway']['state']}; see {work / name}")
    rounds = [r for r in report["rounds"] if r["round"] > 0]
    accuracy = [round(r["accuracy"], 4) for r in rounds]
    fetched, counts = device_downloads(work / name / "logs")
    out = {
        "codec": codec,
        **({"density": density} if density is not None else {}),
        "download": download,
        "bytes_up_per_round": round(statistics.mean(r["bytes_up"] for r in rounds)),
        "bytes_down_per_round": round(statistics.mean(r["bytes_down"] for r in rounds)),
        "device_bytes_down_per_round": round(fetched / len(rounds)),
        "device_downloads": counts,
        "update_bytes": update_bytes(codec, density),
        "final_accuracy": accuracy[-1],
        "accuracy": accuracy,
    }
    say(f"{name}: final accuracy {out['final_accuracy']:.4f}, {out['bytes_up_per_round']} B up / "
        f"{out['bytes_down_per_round']} B down per round (devices received {out['device_bytes_down_per_round']} B "
        f"of models: {counts}), {time.monotonic() - started:.0f} s")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=10, help="devices (watch subjects 1..N), default all 10")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.4, help="the devices' learning rate (bench/accuracy.py's)")
    parser.add_argument("--densities", default="0.1,0.05", help="topk densities, comma-separated")
    parser.add_argument("--codecs", default=",".join(UPLOAD_CODECS), help="codecs to run, comma-separated")
    parser.add_argument("--downloads", default=f"{DEFAULT_DOWNLOAD},full,f16",
                        help="model downloads to run (with i8 uploads), comma-separated; '' for none")
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
    downloads = [d for d in args.downloads.split(",") if d]
    if unknown := set(downloads) - set(DOWNLOADS):
        parser.error(f"unknown download(s) {sorted(unknown)}; known: {', '.join(DOWNLOADS)}")
    runs = [(c, c, None, DEFAULT_DOWNLOAD) for c in codecs if c != TOPK]
    runs += [(f"topk_{d:g}", TOPK, d, DEFAULT_DOWNLOAD) for d in densities] if TOPK in codecs else []
    # Each download with i8 uploads; i8 down is the run named "i8" when that codec runs too.
    runs += [("i8" if d == DEFAULT_DOWNLOAD else f"i8_down_{d}", "i8", None, d) for d in downloads
             if not (d == DEFAULT_DOWNLOAD and "i8" in codecs)]
    started = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, codec, density, download in runs:
            results[name] = one(name, codec, density, download, args, Path(tmp))
    gaps = ({name: round(r["final_accuracy"] - results["f32"]["final_accuracy"], 4)
             for name, r in results.items() if r["codec"] == TOPK} if "f32" in results else {})
    full = next((r for r in results.values() if r["codec"] == "i8" and r["download"] == "full"), None)
    download_gaps = ({name: round(r["final_accuracy"] - full["final_accuracy"], 4) for name, r in results.items()
                      if r["codec"] == "i8" and r["download"] != "full"} if full is not None else {})
    print(json.dumps({"rounds": args.rounds, "devices": args.devices, "epochs": args.epochs, "lr": args.lr,
                      "seed": args.seed, "codecs": results, "topk_vs_f32": gaps, "downloads_vs_full": download_gaps,
                      "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
