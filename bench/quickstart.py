"""Time the walking skeleton's demo and print its figures as JSON.

    python bench/quickstart.py [--scenario hw/scenarios/quickstart.toml] [--repeat 1]

Runs the real emulator (broker, gateway and agent processes) and prints
`{"seconds": [...], "seconds_median", "accuracy": [per round], "final_accuracy",
"bytes_up_per_round", "bytes_down_per_round", "ledger_height", "verified"}`.
Goal (issue 2): the quickstart in under 180 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hw.emulate import run  # noqa: E402
from hw.scenario import load_scenario  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(ROOT / "hw" / "scenarios" / "quickstart.toml"))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    reports = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"run {i + 1}/{args.repeat}", file=sys.stderr, flush=True)
            reports.append(run(scenario, Path(tmp) / "report.json", Path(tmp) / "run"))
    last = reports[-1]
    rounds = last["rounds"]
    print(json.dumps({
        "scenario": scenario.name,
        "seconds": [r["seconds"] for r in reports],
        "seconds_median": statistics.median(r["seconds"] for r in reports),
        "accuracy": [round(r["accuracy"], 4) for r in rounds],
        "final_accuracy": round(rounds[-1]["accuracy"], 4),
        "bytes_up_per_round": [r["bytes_up"] for r in rounds],
        "bytes_down_per_round": [r["bytes_down"] for r in rounds],
        "ledger_height": last["ledger"]["height"],
        "verified": all(r["ledger"]["verified"] for r in reports),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
