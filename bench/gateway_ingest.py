"""How fast one gateway takes in signed replies through Mosquitto, against the Ed25519 limit.

    python bench/gateway_ingest.py [--replies 5000] [--params 10000]

A real Mosquitto broker and a real `starling-gateway` process (FedAvg, one
round, a synthetic 10k-parameter model). A load generator (hw/loadgen.py)
plays every device on one connection: it enrolls N keys, marks them online,
waits for their N tasks, signs N int8 replies (before the clock starts) and
publishes them as fast as the broker takes them. The gateway's signed
receipts are the finish line: verified_per_s = N / (last receipt - first
reply sent). The same run measures one core's raw Ed25519 verify rate
(PyNaCl); ratio = the two.

Prints one JSON object: {"replies", "verified_per_s", "verify_limit_per_s", "ratio", ...}.
Goal (issue 3): ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hw.broker import Broker  # noqa: E402
from hw.loadgen import LoadGenerator, finished_gateway, start_gateway  # noqa: E402
from protocol.keys import Identity, verify  # noqa: E402


def verify_rate(seconds: float = 2.0) -> float:
    """Ed25519 verifications per second on this core (PyNaCl), for a 200-byte message."""
    key = Identity.generate()
    message = b"x" * 200
    sig = key.sign(message)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            verify(key.public_key, message, sig)
        count += 200
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=5000)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--workers", type=int, default=0, help="[ingest] workers: processes sharing the reply topic")
    args = parser.parse_args()
    n = args.replies
    shapes = {"w": (args.params // 10, 10)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Broker(tmp / "broker", kind="mosquitto") as broker:
            gateway, gw = start_gateway(tmp, broker, shapes, n, args.timeout, workers=args.workers)
            load = LoadGenerator(broker.host, broker.port, gw.id, n, shapes)
            try:
                time.sleep(1.0)
                print(f"enrolling {n} devices", file=sys.stderr, flush=True)
                load.enroll_all()
                wires = load.sign_replies(load.collect_tasks(n, args.timeout))
                print(f"sending {len(wires)} signed replies", file=sys.stderr, flush=True)
                load.send(wires)
                load.wait_receipts(len(wires), args.timeout)
                finished_gateway(gateway, tmp, args.timeout)
            finally:
                load.close()
                if gateway.poll() is None:
                    gateway.kill()
    t = load.timeline
    limit = verify_rate()
    rate = t.accepted / (t.last_receipt - t.first_reply) if t.last_receipt > t.first_reply else 0.0
    print(json.dumps({
        "replies": t.accepted,
        "rejected": t.rejected,
        "verified_per_s": round(rate, 1),
        "verify_limit_per_s": round(limit, 1),
        "ratio": round(rate / limit, 3),
        "publish_s": round(t.last_reply - t.first_reply, 3),
        "update_bytes": len(wires[0][1]) if wires else 0,
        "params": args.params,
        "workers": args.workers,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
