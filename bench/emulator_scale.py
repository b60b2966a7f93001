"""A whole city on one machine: the emulator's city scenario, timed, with the memory of every process.

    python bench/emulator_scale.py [--devices-per-gateway 167] [--rounds 5] [--scenario hw/scenarios/city.toml]

Runs `starling-emulate` on the scenario (by default hw/scenarios/city.toml: 3
gateways, 167 devices each, real agent code in device pools with the
synthetic training profile, one Mosquitto) and samples, twice a second, the
resident memory of the emulator and all its descendants (broker, gateways,
device pools) from /proc (bench/proc_usage.py). seconds_per_round is the first gateway's rounds 1..N
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proc_usage import Sampler  # noqa: E402


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
        with Sampler(interval=0.5) as sampler:  # the emulator's whole tree: its summed VmRSS, process count
            emulator = subprocess.Popen([sys.executable, "-m", "hw.emulate", "--scenario", str(scenario),
                                         "--report", str(report_path)], cwd=ROOT, env=env,
                                        stderr=subprocess.PIPE, text=True)
            sampler.watch("emulator", emulator.pid)
            for line in emulator.stderr:  # the emulator's live progress, passed through
                print(line, end="", file=sys.stderr, flush=True)
            emulator.wait()
        usage = sampler.usage["emulator"]
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
        "peak_tree_rss_mb": round(usage.rss_peak_kb / 1024, 1),
        "processes": usage.processes_peak,
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
