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
Goal (issues 3, 17): ratio >= 0.5.

With the figures comes what the time went on (`--no-profile` leaves it out):

    cpu_us_per_reply   CPU of each process over the sending window (first reply sent to last receipt),
                       per reply: the gateway, its ingest workers (with --workers), the broker (Mosquitto)
                       and the load generator itself; `cpu_busy` is their sum over what the machine's cores
                       give in that window (1.0: every core busy with this run alone)
    profile            the gateway's own account (gateway/ingest_profile.py, STARLING_INGEST_PROFILE):
                       CPU microseconds per reply by stage of the reply path (`stages_us`, with `share`
                       of their sum), by thread (`threads_us`: paho's network thread reads the socket and
                       parses MQTT; gateway-worker runs the stages), the journal's wall time with its
                       fsync (`wall_us`), and the whole process (`process_us`)
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

from bench.proc_usage import children, cpu_seconds, own_cpu_seconds  # noqa: E402
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


def with_shares(profile: dict) -> dict:
    """The gateway's profile with each stage's share of the stages' sum."""
    stages = profile.get("stages_us", {})
    total = sum(stages.values()) or 1.0
    profile["share"] = {k: round(v / total, 3) for k, v in stages.items()}
    return profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=5000)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--workers", type=int, default=0, help="[ingest] workers: processes sharing the reply topic")
    parser.add_argument("--no-profile", action="store_true", help="no per-stage profile in the gateway")
    args = parser.parse_args()
    n = args.replies
    shapes = {"w": (args.params // 10, 10)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Broker(tmp / "broker", kind="mosquitto") as broker:
            profile_path = tmp / "ingest_profile.json"
            env = {} if args.no_profile else {"STARLING_INGEST_PROFILE": str(profile_path)}
            gateway, gw = start_gateway(tmp, broker, shapes, n, args.timeout, workers=args.workers, env=env)
            load = LoadGenerator(broker.host, broker.port, gw.id, n, shapes)
            try:
                time.sleep(1.0)
                print(f"enrolling {n} devices", file=sys.stderr, flush=True)
                load.enroll_all()
                wires = load.sign_replies(load.collect_tasks(n, args.timeout))
                print(f"sending {len(wires)} signed replies", file=sys.stderr, flush=True)
                pids = {"gateway": gateway.pid, "broker": broker.process.pid}
                pids |= {f"gateway_child_{i}": pid for i, pid in enumerate(children(gateway.pid))}  # ingest workers
                before = {k: cpu_seconds(pid) for k, pid in pids.items()} | {"loadgen": own_cpu_seconds()}
                wall = time.monotonic()
                load.send(wires)
                load.wait_receipts(len(wires), args.timeout)
                wall = time.monotonic() - wall
                after = {k: cpu_seconds(pid) for k, pid in pids.items()} | {"loadgen": own_cpu_seconds()}
                finished_gateway(gateway, tmp, args.timeout)
                profile = with_shares(json.loads(profile_path.read_text())) if profile_path.exists() else None
                if profile is not None:  # with --workers, stage 1 runs in the workers: their own accounts
                    for path in sorted(tmp.glob("ingest_profile-worker*.json")):
                        profile.setdefault("workers", {})[path.stem.rsplit("-", 1)[1]] = with_shares(
                            json.loads(path.read_text()))
            finally:
                load.close()
                if gateway.poll() is None:
                    gateway.kill()
    t = load.timeline
    limit = verify_rate()
    rate = t.accepted / (t.last_receipt - t.first_reply) if t.last_receipt > t.first_reply else 0.0
    spent = {k: after[k] - before[k] for k in after if not k.startswith("gateway_child_")}
    if args.workers:
        spent["ingest_workers"] = sum(after[k] - before[k] for k in after if k.startswith("gateway_child_"))
    per_reply = {k: round(v / max(1, n) * 1e6, 1) for k, v in spent.items()}
    per_reply["all"] = round(sum(per_reply.values()), 1)
    cores = os.cpu_count() or 1
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
        "cores": cores,
        "cpu_us_per_reply": per_reply,
        "cpu_busy": round(sum(spent.values()) / (wall * cores), 3) if wall > 0 else None,
        "profile": profile,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
