"""How fast a gateway fetches a model-sized blob by digest from another gateway (gateway/blob_exchange.py).

    python bench/blob_fetch.py [--fetches 40] [--size-kb 600] [--max-s 120]

Two BlobExchanges (each with its own store, connection and worker thread) in
this process, on one Mosquitto on loopback (hw/broker.py). The holder keeps
distinct random blobs; the requester fetches each by digest, one after
another (latency: fetch() to the checked blob stored on disk, fsync
included), then all of another set at once (throughput with `max_active`
transfers in flight). Sizes: the shipped IMU CNN's encoded model
(`schemas.encode_model` of firmware_models/imu_cnn/weights.npz) and
`--size-kb` (600 KB: three 256 KB chunks). Progress on stderr.

Prints one JSON object: {"sizes": {name: {"bytes", "fetches", "p50_ms", "p95_ms", "mb_per_s"}},
"concurrent": {"bytes", "fetches", "seconds", "mb_per_s"}, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.blob_exchange import BlobExchange  # noqa: E402
from gateway.blobs import BlobStore  # noqa: E402
from hw.broker import Broker  # noqa: E402
from protocol import schemas  # noqa: E402
from protocol.keys import Identity  # noqa: E402

WAIT_S = 60.0  # one fetch's upper bound


def imu_cnn_model() -> bytes:
    """The shipped IMU CNN's initial weights, encoded as a release carries them."""
    folder = ROOT / "firmware_models" / "imu_cnn"
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / "weights.npz") as npz:
        return schemas.encode_model({w["name"]: npz[w["name"]].astype(np.float32) for w in manifest["weights"]})


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sequential(holder: BlobExchange, requester: BlobExchange, blobs: list[bytes], until: float) -> dict:
    digests = [holder.store.put(b, tag=1) for b in blobs]
    latencies = []
    started = time.perf_counter()
    for i, digest in enumerate(digests):
        if time.monotonic() > until:
            say(f"  time is up after {i} fetches")
            break
        t0 = time.perf_counter()
        fetched = requester.fetch(digest, [holder.node_id], tag=1).result(WAIT_S)
        latencies.append(time.perf_counter() - t0)
        if not fetched.ok:
            raise RuntimeError(f"fetch failed: {fetched.reason} {fetched.tried}")
        if (i + 1) % 10 == 0:
            say(f"  {i + 1}/{len(digests)}: last {latencies[-1] * 1000:.1f} ms")
    total = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    return {"bytes": len(blobs[0]), "fetches": len(ms), "p50_ms": round(statistics.median(ms), 2),
            "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2),
            "mb_per_s": round(len(blobs[0]) * len(ms) / total / 1e6, 2)}


def concurrent(holder: BlobExchange, requester: BlobExchange, blobs: list[bytes]) -> dict:
    digests = [holder.store.put(b, tag=2) for b in blobs]
    started = time.perf_counter()
    results = [f.result(WAIT_S) for f in [requester.fetch(d, [holder.node_id], tag=2) for d in digests]]
    seconds = time.perf_counter() - started
    failed = [r.reason for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} fetches failed: {sorted(set(failed))}")
    return {"bytes": len(blobs[0]), "fetches": len(blobs), "seconds": round(seconds, 3),
            "mb_per_s": round(len(blobs[0]) * len(blobs) / seconds / 1e6, 2),
            "max_active": requester.settings.max_active}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetches", type=int, default=40, help="fetches per size (and in the concurrent run)")
    parser.add_argument("--size-kb", type=int, default=600)
    parser.add_argument("--max-s", type=float, default=120.0, help="stop fetching after this long")
    args = parser.parse_args()
    until = time.monotonic() + args.max_s
    rng = np.random.default_rng(0)
    model = imu_cnn_model()
    sizes = {"imu_cnn_model": len(model), f"{args.size_kb}k": args.size_kb * 1024}
    with tempfile.TemporaryDirectory() as tmp, Broker(Path(tmp) / "broker", kind="mosquitto") as broker:
        nodes = [Identity.from_seed(bytes([n]) * 32).id for n in (1, 2)]
        holder, requester = (BlobExchange(BlobStore(Path(tmp) / n), n, broker.host, broker.port).start()
                             for n in nodes)
        try:
            figures = {}
            for name, size in sizes.items():
                say(f"{name}: {args.fetches} fetches of {size} bytes, one after another")
                blobs = [rng.bytes(size) for _ in range(args.fetches)]  # distinct: each digest is fetched once
                if name == "imu_cnn_model":
                    blobs[0] = model  # the real model once, then random blobs of its size
                figures[name] = sequential(holder, requester, blobs, until)
                say(f"  {figures[name]}")
            say(f"concurrent: {args.fetches} fetches of {sizes[f'{args.size_kb}k']} bytes at once")
            together = concurrent(holder, requester, [rng.bytes(args.size_kb * 1024) for _ in range(args.fetches)])
            say(f"  {together}")
        finally:
            requester.close()
            holder.close()
    print(json.dumps({"sizes": figures, "concurrent": together, "chunk_bytes": schemas.CHUNK_BYTES,
                      "broker": "mosquitto (loopback)", "store": "fsync per blob"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
