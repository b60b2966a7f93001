"""How fast a new ledger vertex reaches every gateway, and how fast gateways agree again after a partition.

    python bench/ledger_gossip.py [--sizes 3,5,9] [--vertices 60] [--partition-s 30]

Each gateway is its own process (hw/ledger_peer.py: a real Ledger and its
gossip over MQTT) on one Mosquitto broker on loopback. Vertices are written
one at a time at random gateways; a vertex's time to reach every gateway is
the last gateway's apply time minus its creator's write time.

Partition: 5 gateways on two Mosquitto brokers bridged through a TCP relay
(hw/netem.py); the relay is cut for `--partition-s` seconds while both sides
keep writing, then healed; heal_s is the time until every gateway holds the
same vertices and derives the same state.

Prints one JSON object: {"gateways": {"3": {"p50_s", "p95_s"}, ...}, "heal_s", ...}.
Goals (issue 4): p95 <= 0.5 s at 5 gateways; agreement <= 5 s after heal.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hw.broker import Broker  # noqa: E402
from hw.ledger_peer import PeerProcess, make_city  # noqa: E402
from hw.netem import TcpRelay  # noqa: E402


def agreed(peers: list[PeerProcess]) -> bool:
    status = [peer.ask("status") for peer in peers]
    return len({(tuple(s["ids"]), s["state"]) for s in status}) == 1 and not any(s["pending"] for s in status)


def wait_agreement(peers: list[PeerProcess], timeout: float) -> float:
    start = time.monotonic()
    while not agreed(peers):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"no agreement within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def spread(size: int, vertices: int, workdir: Path, rng: random.Random) -> dict[str, float]:
    _, genesis = make_city(workdir, size)
    with Broker(workdir / "broker", kind="mosquitto") as broker:
        peers = [PeerProcess(workdir, i, genesis, broker.host, broker.port, vv_interval=0.5) for i in range(size)]
        try:
            wait_agreement(peers, 60)
            written = []
            for _ in range(vertices):
                written += peers[rng.randrange(size)].ask("enroll 1")["ids"]
                time.sleep(0.05)
            wait_agreement(peers, 60)
            arrivals = [peer.ask("arrivals") for peer in peers]
        finally:
            for peer in peers:
                peer.close()
    delays = sorted(max(a[v] for a in arrivals) - min(a[v] for a in arrivals) for v in written)
    return {"p50_s": round(statistics.median(delays), 4),
            "p95_s": round(delays[min(len(delays) - 1, int(0.95 * len(delays)))], 4),
            "max_s": round(delays[-1], 4)}


def heal(workdir: Path, partition_s: float, rng: random.Random) -> tuple[float, int]:
    _, genesis = make_city(workdir, 5)
    with Broker(workdir / "a", kind="mosquitto") as a, TcpRelay((a.host, a.port)) as relay, \
            Broker(workdir / "b", kind="mosquitto", bridge_to=("127.0.0.1", relay.port)) as b:
        peers = [PeerProcess(workdir, i, genesis, (a if i < 3 else b).host, (a if i < 3 else b).port, 0.5)
                 for i in range(5)]
        try:
            wait_agreement(peers, 60)
            relay.cut()
            end = time.monotonic() + partition_s
            written = 0
            while time.monotonic() < end:  # both sides keep writing
                peers[rng.randrange(5)].ask("enroll 1")
                written += 1
                time.sleep(0.1)
            relay.heal()
            return wait_agreement(peers, 120), written
        finally:
            for peer in peers:
                peer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,5,9")
    parser.add_argument("--vertices", type=int, default=60)
    parser.add_argument("--partition-s", type=float, default=30.0)
    args = parser.parse_args()
    rng = random.Random(0)
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            print(f"{size} gateways: {args.vertices} vertices", file=sys.stderr, flush=True)
            figures[str(size)] = spread(size, args.vertices, Path(tmp) / f"spread-{size}", rng)
            print(f"  {figures[str(size)]}", file=sys.stderr, flush=True)
        print(f"partition of {args.partition_s:.0f} s between 3 and 2 gateways", file=sys.stderr, flush=True)
        heal_s, written = heal(Path(tmp) / "partition", args.partition_s, rng)
    print(json.dumps({"gateways": figures, "heal_s": round(heal_s, 3), "partition_s": args.partition_s,
                      "written_during_partition": written}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
