"""How fast a gateway's ledger appends update records, and how many bytes each costs on disk.

    python bench/ledger_append.py [--records 50000] [--batch 1000] [--devices 1000]

A real SQLite ledger (WAL, synchronous=FULL) in a temporary folder; devices
are enrolled first (not timed). Update records go in as `updates` vertices of
`--batch` records each, as a gateway writes a round: once as the gateway does
it (device signatures already checked at ingest) and once with every device
signature checked again (what another gateway or an auditor does). Bytes per
record: growth of the database file (WAL checkpointed) over the records.

Prints {"records_per_s", "records_per_s_verified", "bytes_per_record", ...}.
Goals (issue 4): >= 20,000 records/s without signature checks, <= 200 bytes per record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ledger.kinds import reply_signed_bytes  # noqa: E402
from ledger.store import Ledger  # noqa: E402
from protocol.keys import Identity  # noqa: E402

BASE = b"\x01" * 32


def file_bytes(ledger: Ledger) -> int:
    ledger.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return ledger.path.stat().st_size


def run(workdir: Path, records: int, batch: int, devices: int, verified: bool) -> tuple[float, float]:
    gateway = Identity.from_seed(b"g" * 32)
    keys = [Identity.from_seed(i.to_bytes(32, "big")) for i in range(1, devices + 1)]
    with Ledger.open(workdir / f"ledger-{verified}.db", gateway) as ledger:
        ledger.init_genesis("bench", [gateway.public_key])
        for key in keys:
            ledger.enroll_device(key.public_key, "d", "open")
        batches = []
        for start in range(0, records, batch):
            round_ = start // batch + 1
            task = f"train-{round_}-bench.1"
            rows = []
            for i in range(start, min(records, start + batch)):
                device = keys[i % devices]
                digest = hashlib.sha256(i.to_bytes(8, "big")).digest()
                sig = device.sign(reply_signed_bytes(device.public_key, gateway.id, round_, task, BASE, digest, 32))
                rows.append((device.public_key, digest, 32, sig))
            batches.append((round_, task, rows))
        before = file_bytes(ledger)
        print(f"appending {records} records in batches of {batch} ({'checking' if verified else 'trusting'} "
              "device signatures)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        for round_, task, rows in batches:
            ledger.record_updates(gateway.id, round_, task, BASE, rows, signatures_checked=not verified)
        seconds = time.perf_counter() - start
        return records / seconds, (file_bytes(ledger) - before) / records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()
    if args.batch > args.devices:
        parser.error("--batch may not exceed --devices: a device has at most one record per round")
    with tempfile.TemporaryDirectory() as tmp:
        rate, per_record = run(Path(tmp), args.records, args.batch, args.devices, verified=False)
        rate_verified, _ = run(Path(tmp), args.records, args.batch, args.devices, verified=True)
    print(json.dumps({"records_per_s": round(rate), "records_per_s_verified": round(rate_verified),
                      "bytes_per_record": round(per_record, 1), "records": args.records, "batch": args.batch}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
