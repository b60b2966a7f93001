"""A whole city on one machine: the emulator's city scenario, timed, with the memory of every process.

    python bench/emulator_scale.py [--devices-per-gateway 167] [--rounds 5] [--scenario hw/scenarios/city.toml]

Runs `starling-emulate` on the scenario (by default hw/scenarios/city.toml: 3
gateways, 167 devices each, real agent code in device pools with the
synthetic training profile, one Mosquitto) and samples, twice a second, the
resident memory of the emulator and all its descendants (broker, gateways,
device pools) from /proc. seconds_per_round is the first gateway's rounds 1..N
end to end (their `t`, which includes waiting for the slowest device).

Prints {"devices", "gateways", "rounds", "seconds", "seconds_per_round",
"participants_per_round", "peak_tree_rss_mb", "processes", "ledgers_identical",
"every_accepted_update_in_every_ledger", "rejections", "duplicates"}.
Goal (issue 7): 500 devices across 3 gateways on a 2-core laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_rss_mb(root: int) -> tuple[float, int]:
    """Resident memory of `root` and every descendant (MB), and how many processes that is."""
    total, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    count += 1
                    break
        except OSError:
            continue
        todo += _children(pid)
    return total / 1024, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(ROOT / "hw" / "scenarios" / "city.toml"))
    parser.add_argument("--devices-per-gateway", type=int, help="override the scenario's [fleet] devices_per_gateway")
    parser.add_argument("--rounds", type=int, help="override the scenario's [run] rounds")
    args = parser.parse_args()
    text = Path(args.scenario).read_text()
    if args.devices_per_gateway is not None:
        text = re.sub(r"(?m)^devices_per_gateway\s*=.*$", f"devices_per_gateway = {args.devices_per_gateway}", text)
    if args.rounds is not None:
        text = re.sub(r"(?m)^rounds\s*=.*$", f"rounds = {args.rounds}", text)
    with tempfile.TemporaryDirectory(prefix="starling-scale-") as tmp:
        scenario = Path(tmp) / "scenario.toml"
        scenario.write_text(text)
        report_path = Path(tmp) / "report.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
        emulator = subprocess.Popen([sys.executable, "-m", "hw.emulate", "--scenario", str(scenario),
                                     "--report", str(report_path)], cwd=ROOT, env=env,
                                    stderr=subprocess.PIPE, text=True)
        peak = [0.0, 0]

        def sample() -> None:
            while emulator.poll() is None:
                rss, count = tree_rss_mb(emulator.pid)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], count)
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in emulator.stderr:  # the emulator's live progress, passed through
            print(line, end="", file=sys.stderr, flush=True)
        emulator.wait()
        sampler.join(5)
        if not report_path.exists():
            print(f"emulator_scale: the run wrote no report (exit {emulator.returncode})", file=sys.stderr)
            return 1
        report = json.loads(report_path.read_text())
    rounds = [r for r in report["rounds"] if r.get("round", 0) > 0]
    ends = [r["t"] for r in report["rounds"] if isinstance(r.get("t"), (int, float))]
    check = report.get("ledger_check", {})
    figures = {
        "devices": report["config"]["devices"],
        "gateways": len(report["gateways"]),
        "rounds": len(rounds),
        "seconds": report["seconds"],
        "seconds_per_round": round((ends[-1] - ends[0]) / max(1, len(ends) - 1), 2) if len(ends) > 1 else None,
        "participants_per_round": {name: [r["participants"] for r in s["rounds"] if r.get("round", 0) > 0]
                                   for name, s in report["gateways"].items()},
        "peak_tree_rss_mb": round(peak[0], 1),
        "processes": peak[1],
        "ledgers_identical": check.get("identical"),
        "every_accepted_update_in_every_ledger": check.get("every_accepted_update_in_every_ledger"),
        "rejections": {name: s["rejections"] for name, s in report["gateways"].items()},
        "duplicates": {name: s.get("duplicates", 0) for name, s in report["gateways"].items()},
        "exit_code": emulator.returncode,
    }
    print(json.dumps(figures))
    return 0 if emulator.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
