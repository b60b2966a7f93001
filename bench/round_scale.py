"""Round close time and gateway memory with 1,000 devices and a 100k-parameter model.

    python bench/round_scale.py [--devices 1000] [--params 100000] [--strategies FedAvg,FedMedian,FedTrimmedAvg,Krum]

For each strategy: a real Mosquitto, a real `starling-gateway` process (one
round, no evaluation) and a load generator playing the devices with
synthetic int8 deltas (hw/loadgen.py). close_s is the gateway's time from
the last reply's receipt to the new model release arriving on the broker;
peak_rss_mb is the gateway process's peak resident memory (VmHWM), the
largest over the strategies.

Prints {"devices", "params", "close_s": {strategy: s}, "peak_rss_mb", "peak_rss_mb_by_strategy",
"score_s": {strategy: s}} (score_s: the gateway's own `round.scored` time for every update's contribution
score, computed after the release, so not in close_s).
Goal (issue 3): FedAvg <= 2 s, peak RSS <= 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proc_usage import peak_rss_mb  # noqa: E402
from hw.broker import Broker  # noqa: E402
from hw.loadgen import LoadGenerator, finished_gateway, start_gateway  # noqa: E402

PARAMS = {"FedTrimmedAvg": "beta = 0.1, ", "Krum": "num_malicious_nodes = 10, ", "MultiKrum": "num_malicious_nodes = 10, "}


SCORED = re.compile(r"round\.scored round=\d+ updates=\d+ inputs=\d+ rule=\w+ seconds=([0-9.]+)")


def one_round(strategy: str, devices: int, params: int, timeout: float) -> tuple[float, float, float | None]:
    shapes = {"w": (params // 100, 100)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Broker(tmp / "broker", kind="mosquitto") as broker:
            gateway, gw = start_gateway(tmp, broker, shapes, devices, timeout, strategy, PARAMS.get(strategy, ""))
            load = LoadGenerator(broker.host, broker.port, gw.id, devices, shapes)
            peak = 0.0
            try:
                time.sleep(1.0)
                load.enroll_all()
                tasks = load.collect_tasks(devices, timeout)
                wires = load.sign_replies(tasks)
                releases_before = len(load.timeline.releases)
                load.send(wires)
                load.wait_receipts(len(wires), timeout)
                end = time.monotonic() + timeout
                while len(load.timeline.releases) <= releases_before and time.monotonic() < end:
                    peak = max(peak, peak_rss_mb(gateway.pid))
                    load.drain(0.1)
                peak = max(peak, peak_rss_mb(gateway.pid))
                finished_gateway(gateway, tmp, timeout)
                scored = SCORED.search((tmp / "gateway.log").read_text())
            finally:
                load.close()
                if gateway.poll() is None:
                    gateway.kill()
            released = load.timeline.releases[-1][0] if len(load.timeline.releases) > releases_before else float("nan")
            return released - load.timeline.last_receipt, peak, float(scored.group(1)) if scored else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--strategies", default="FedAvg,FedMedian,FedTrimmedAvg,Krum")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    close_s, peaks, score_s = {}, {}, {}
    for strategy in args.strategies.split(","):
        print(f"{strategy}: {args.devices} devices, {args.params} parameters", file=sys.stderr, flush=True)
        seconds, peak, scoring = one_round(strategy, args.devices, args.params, args.timeout)
        close_s[strategy], peaks[strategy], score_s[strategy] = round(seconds, 3), round(peak, 1), scoring
        print(f"  close {seconds:.2f} s, contribution scores {scoring} s (after the release), peak RSS {peak:.0f} MB",
              file=sys.stderr, flush=True)
    print(json.dumps({"devices": args.devices, "params": args.params, "close_s": close_s,
                      "peak_rss_mb": max(peaks.values()), "peak_rss_mb_by_strategy": peaks, "score_s": score_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
