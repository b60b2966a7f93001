"""`starling-ledger`: audit, summarize and export a gateway's ledger file.

    starling-ledger verify --db PATH   exit 0 if every vertex checks out, 1 if not
    starling-ledger show   --db PATH   height, tips, vertices per kind, enrolled devices
    starling-ledger export --db PATH   one JSON object per vertex, in canonical order

Every subcommand opens the file read-only, so it is safe next to a running
gateway and never creates a file that is not there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from protocol.keys import identity_id

from .errors import LedgerError
from .store import Ledger
from .verify import verify_store
from .vertex import Vertex


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="starling-ledger", description="Audit a Starling gateway's ledger file."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        (
            "verify",
            "re-check every vertex (digest, signatures, links, kind rules); exit 1 naming the first bad one",
        ),
        ("show", "summarize the ledger: height, tips, vertices per kind, enrolled devices"),
        ("export", "print every vertex as one JSON line, in canonical order (bytes as hex)"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--db", required=True, metavar="PATH", help="the ledger's SQLite file")
        if name == "show":
            command.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args.db)
    try:
        with Ledger.open(args.db, read_only=True) as ledger:
            if args.command == "show":
                _show(ledger, args.json)
            else:
                for vertex in ledger.vertices():
                    print(json.dumps(to_json(vertex), sort_keys=True))
    except LedgerError as exc:
        print(f"starling-ledger: {exc}", file=sys.stderr)
        return 1
    return 0


def _verify(path: str) -> int:
    report = verify_store(path)
    print(json.dumps(report.to_dict(), sort_keys=True))
    if report.ok:
        print(f"OK: {report.checked} vertices verified in {path}")
        return 0
    where = f"vertex {report.bad_vertex}" if report.bad_vertex else path
    count = f"{len(report.problems)} problem(s), {report.checked} vertices read"
    print(f"FAILED: {where}: {report.reason} ({count})")
    return 1


def _show(ledger: Ledger, as_json: bool) -> None:
    devices = ledger.enrolled_devices()
    summary = {
        "path": str(ledger.path),
        "height": ledger.height,
        "tips": [t.hex() for t in ledger.tips()],
        "kinds": ledger.kind_counts(),
        "gateways": [identity_id(k) for k in ledger.gateways()],
        "devices": {identity_id(k): name for k, name in devices.items()},
    }
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    print(f"ledger   {summary['path']}")
    print(f"height   {summary['height']}")
    print(f"tips     {' '.join(summary['tips']) or '-'}")
    print(f"kinds    {' '.join(f'{k}={n}' for k, n in summary['kinds'].items()) or '-'}")
    print(f"gateways {' '.join(summary['gateways']) or '-'}")
    print(f"devices  {len(devices)} enrolled")
    for device_id, name in summary["devices"].items():
        print(f"  {device_id}  {name}")


def to_json(vertex: Vertex) -> dict[str, Any]:
    """A vertex as plain JSON: bytes become hex strings."""
    return {
        "id": vertex.id_hex,
        "kind": vertex.kind,
        "creator": vertex.creator.hex(),
        "creator_id": vertex.creator_id,
        "seq": vertex.seq,
        "parents": [p.hex() for p in vertex.parents],
        "time": vertex.time,
        "body": _hex_bytes(vertex.body),
        "sig": vertex.sig.hex(),
    }


def _hex_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hex_bytes(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hex_bytes(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
