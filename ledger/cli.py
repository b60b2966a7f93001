"""`starling-ledger`: audit a gateway's ledger file, and the operator's commands.

Audit (read-only: safe next to a running gateway, never creates a file):

    starling-ledger verify     --db PATH                 exit 0 if every vertex checks out, 1 if not
    starling-ledger show       --db PATH                 height, finality, tips, kinds, lineages, gateways,
                                                         devices
    starling-ledger export     --db PATH                 one JSON object per vertex, in canonical order
    starling-ledger history    --db PATH --device ID     the vertices that name a device, as JSON lines
    starling-ledger provenance --db PATH --model DIGEST  the aggregates behind a model version, back to
                                                         genesis: each one's rule, its inputs with their
                                                         weights and devices, the round's accepted updates
                                                         it left out, its scores (one JSON object)
    starling-ledger lineage    --db PATH --model DIGEST  a model's releases, newest first, back to the
                                                         start of its lineage (one JSON object)
    starling-ledger contributions --db PATH [--since ROUND] [--device ID] [--format json|csv]
                                                         per-device totals of the contribution scores
                                                         (sum, rounds scored, mean), highest total first
    starling-ledger dot        --db PATH [--round N]     the DAG (or one round's part of it) as Graphviz DOT
    starling-ledger audit --recompute --db PATH [--blobs DIR ...] [--broker HOST:PORT] [--round N]
                                                         recompute every aggregate (or one round's) and
                                                         every city merge whose inputs are at hand, bit
                                                         for bit, and compare digests (one JSON object)

The queries behind `provenance`, `lineage`, `contributions`, `dot` and `audit` are in
`ledger.audit`. `contributions` prints one JSON object, or CSV with a header
line (device,public_key,total,rounds,mean); it exits 2 with one line on
stderr for a bad argument or no ledger at PATH.
`lineage` exits 0 when the walk reaches the `lineage` vertex that started
the chain, 1 when it is broken (a model no aggregate or lineage vertex
explains, named on stderr and in the JSON's "gap"), and 2 when it cannot
answer (a digest that is not 64 hex, no ledger at PATH). On a store that
bootstrapped from a checkpoint the vertices before it have no bytes here, so
a lineage older than the checkpoint ends in a gap there.
`audit --recompute` reads the blobs (updates and models by digest) from each
DIR, by default the `blobs` folder beside the ledger file (a gateway's state
dir: ledger.db and blobs/ side by side), read-only; with --broker, what no
folder holds is fetched from the member gateways over MQTT (the blob
exchange). It prints {"checked": N, "aggregates": N, "cities": N, "epochs":
[epochs whose merge matched], "mismatches": [{"vertex", "kind", "gateway",
"round" or "epoch", "expected", "got", ...}],
"missing_inputs": N, "unverifiable": N, "gateways": {...}, ...} and exits 1
on a mismatch (evidence against the gateway that signed that aggregate), 0
otherwise, even with inputs missing (pruned, kept elsewhere, or a blob file
whose bytes do not hash to its digest: a bad copy is nobody's signature), and
2 with one stderr line for a bad argument, no ledger or blob folder, or no
recompute installed: the recompute is Flower's aggregation, which this package
may not import; the gateway package registers it (entry point group
"starling.recompute", `ledger.audit.recompute_plugin`), so it needs the
`gateway` extra.

Membership (the operator's root key, kept offline, signs these):

    starling-ledger init  --root-key FILE [--create-root-key] --name CITY --gateway PUBKEY ... --out genesis.cbor
    starling-ledger join  --root-key FILE --db PATH --gateway PUBKEY --name NAME
    starling-ledger leave --root-key FILE --db PATH --gateway PUBKEY|ID --reason TEXT
    starling-ledger rotate --root-key FILE --db PATH --gateway PUBKEY|ID --new-key PUBKEY --chain FILE
    starling-ledger clear-mismatch --root-key FILE --db PATH --gateway PUBKEY|ID --reason TEXT

`init` writes the genesis vertex that every gateway's `[ledger] genesis`
names; `join`, `leave` and `rotate` append to any member gateway's ledger
file (it may be running) and gossip carries them to the others. `rotate`
replaces a gateway's key (`protocol.rotation`): it also writes the chain
file the gateway's `[identity] rotations` names, which the gateway, restarted
with its new key, publishes to its devices. `clear-mismatch` answers the
mismatch evidence against a gateway (`show` lists it under MISMATCH): the
evidence so far no longer keeps its models out of the city merges.

Operator (`ledger.operator_cli`; print one JSON line; exit 2 with one line on stderr if refused):

    starling-ledger enroll  --db PATH --key GATEWAY_KEY --device PUBKEY_HEX --name NAME [--policy P]
                            [--voucher FILE]
    starling-ledger revoke  --db PATH --key GATEWAY_KEY --device PUBKEY_HEX|DEVICE_ID --reason TEXT
    starling-ledger voucher --operator-key FILE --device PUBKEY_HEX [--gateway ID] [--days N] [--out FILE]

`enroll` and `revoke` append a vertex signed with the gateway's own key file
(never created here) to an existing ledger, and may run while that gateway
has the file open: the store serializes the two writers (see
`ledger.store`). `voucher` touches no ledger: it signs an enrollment voucher
(`protocol.vouchers`) with the operator's key. `enroll` admits the device at
the gateway whose key signs it (policy "operator" by default, no evidence):
that gateway admits it whatever its policy; other gateways apply their own
(`gateway.ledger_keeper`).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocol.errors import ProtocolError
from protocol.keys import identity_id

from .audit import (
    NoAnswer,
    RecomputeMissing,
    broken_because,
    contribution_totals,
    lineage,
    provenance,
    recompute_audit,
    recompute_plugin,
    to_dot,
)
from .errors import LedgerError
from .kinds import CONTRIBUTIONS, LINEAGE, MAX_ROUND
from .operator_cli import (
    ID_HEX,
    OPERATOR_COMMANDS,
    PUBLIC_KEY_HEX,
    Refused,
    add_operator_commands,
    device_key,
)
from .store import Ledger
from .verify import verify_store
from .vertex import Vertex

REFUSED = 2  # the exit code of a refused operator command, as of an argparse usage error
CONTRIBUTION_COLUMNS = ("device", "public_key", "total", "rounds", "mean")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="starling-ledger",
        description="Audit a Starling gateway's ledger file; enroll and revoke devices; issue vouchers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        (
            "verify",
            "re-check every vertex (digest, signatures, links, kind rules); exit 1 naming the first bad one",
        ),
        ("show", "summarize the ledger: height, tips, vertices per kind, model lineages started, contributions"
                 " vertices, active and revoked devices"),
        ("export", "print every vertex as one JSON line, in canonical order (bytes as hex)"),
        ("history", "print the vertices that name a device (enrollment, update records, revocation)"),
        ("provenance", "the aggregates behind a model version, back to genesis: each one's rule, its inputs"
                       " with their weights and devices, the round's updates it left out, its scores"),
        ("lineage", "a model's releases, newest first, back to the lineage vertex that started it;"
                    " exit 1 naming the gap if the chain is broken, 2 if there is nothing to walk"),
        ("contributions", "per-device totals of the contribution scores (sum, rounds scored, mean), highest"
                          " total first, as one JSON object or CSV"),
        ("dot", "the DAG, or one round's part of it, as Graphviz DOT (render with `dot -Tpng`)"),
        ("audit", ("--recompute: recompute every aggregate whose inputs are in the blob folder, bit for bit;"
                   " exit 1 on a mismatch, 2 if it cannot run")),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--db", required=True, metavar="PATH", help="the ledger's SQLite file")
        if name == "contributions":
            command.error = _one_line_error(name)  # type: ignore[method-assign]
            command.add_argument("--since", type=int, default=None, metavar="ROUND",
                                 help="only rounds from this one on")
            command.add_argument("--device", default=None, metavar="ID",
                                 help="only this device: its id (32 hex) or public key (64 hex)")
            command.add_argument("--format", choices=("json", "csv"), default="json",
                                 help="one JSON object (default) or CSV with a header line")
        if name == "show":
            command.add_argument("--json", action="store_true", help="print the summary as one JSON object")
        if name == "history":
            command.add_argument("--device", required=True, metavar="ID", help="device id (32 hex) or public key")
        if name in ("provenance", "lineage"):
            command.add_argument("--model", required=True, metavar="DIGEST", help="the model's SHA-256 (64 hex)")
        if name == "dot":
            command.add_argument("--round", type=int, default=None, help="only the vertices of this round")
        if name == "audit":
            command.error = _one_line_error(name)  # type: ignore[method-assign]
            command.add_argument("--recompute", action="store_true",
                                 help="recompute the aggregates from their recorded inputs (needs the gateway extra)")
            command.add_argument("--blobs", action="append", default=None, metavar="DIR",
                                 help="a blob folder, repeatable (default: `blobs` beside the ledger file)")
            command.add_argument("--broker", default=None, metavar="HOST:PORT",
                                 help="fetch the blobs no folder holds from the member gateways over MQTT")
            command.add_argument("--round", type=int, default=None, metavar="N", help="only this round's aggregates")
    add_operator_commands(commands)
    args, extra = parser.parse_known_args(argv)
    if extra:  # what parse_args does, in one line for the commands that promise one
        message = f"unrecognized arguments: {' '.join(extra)}"
        if args.command in ("contributions", "audit"):
            _one_line_error(args.command)(message)
        parser.error(message)
    if args.command in OPERATOR_COMMANDS:
        try:
            print(json.dumps(OPERATOR_COMMANDS[args.command](args), sort_keys=True))
        except (Refused, LedgerError, ProtocolError, OSError) as exc:
            message = " ".join(str(exc).split())  # one line, whatever the exception held
            print(f"starling-ledger {args.command}: {message}", file=sys.stderr)
            return REFUSED
        return 0
    if args.command == "verify":
        return _verify(args.db)
    if args.command == "lineage":
        return _lineage(args.db, args.model)
    if args.command == "contributions":
        return _contributions(args)
    if args.command == "audit":
        return _audit(args)
    try:
        with Ledger.open(args.db, read_only=True) as ledger:
            if args.command == "show":
                _show(ledger, args.json)
            elif args.command == "history":
                for vertex in ledger.history(device_key(ledger, args.device)):
                    print(json.dumps(to_json(vertex), sort_keys=True))
            elif args.command == "provenance":
                print(json.dumps(provenance(ledger, _digest(args.model)), sort_keys=True))
            elif args.command == "dot":
                print(to_dot(ledger, args.round))
            else:
                for vertex in ledger.vertices():
                    print(json.dumps(to_json(vertex), sort_keys=True))
    except (Refused, NoAnswer) as exc:
        print(f"starling-ledger {args.command}: {exc}", file=sys.stderr)
        return REFUSED
    except LedgerError as exc:
        print(f"starling-ledger: {exc}", file=sys.stderr)
        return 1
    return 0


def _lineage(path: str, model_text: str) -> int:
    """`lineage`: 0 complete, 1 broken (the JSON says where), 2 when there is nothing to walk."""
    try:
        model = _digest(model_text)
        if not Path(path).is_file():  # plainer than SQLite's "unable to open database file"
            raise Refused(f"no ledger at {path}")
        with Ledger.open(path, read_only=True) as ledger:
            result = lineage(ledger, model)
            bootstrapped = ledger.bootstrap_point() is not None
    except (Refused, LedgerError) as exc:
        message = " ".join(str(exc).split())
        print(f"starling-ledger lineage: {message}", file=sys.stderr)
        return REFUSED
    print(json.dumps(result, sort_keys=True))
    problem = broken_because(result)
    if problem is None:
        return 0
    if bootstrapped:
        problem += "; this store started from a checkpoint, vertices before it are not here"
    print(f"starling-ledger lineage: broken: {problem}", file=sys.stderr)
    return 1


def _one_line_error(command: str) -> Any:
    """An argparse `error` that says what is wrong in one stderr line (no usage) and exits 2."""

    def error(message: str) -> None:
        print(f"starling-ledger {command}: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(REFUSED)

    return error


def _contributions(args: argparse.Namespace) -> int:
    """`contributions`: 0 with the totals printed; 2 with one stderr line for a bad argument or no ledger."""
    try:
        if args.since is not None and not 0 <= args.since <= MAX_ROUND:
            raise Refused(f"--since must be a round from 0 to {MAX_ROUND}, not {args.since}")
        device = None
        if args.device is not None:
            device = args.device.strip().lower()
            if not (ID_HEX.fullmatch(device) or PUBLIC_KEY_HEX.fullmatch(device)):
                raise Refused(f"--device {args.device!r} is neither a device id (32 hex) nor a public key (64 hex)")
        if not Path(args.db).is_file():  # plainer than SQLite's "unable to open database file"
            raise Refused(f"no ledger at {args.db}")
        with Ledger.open(args.db, read_only=True) as ledger:
            result = contribution_totals(ledger, args.since, device)
    except (Refused, LedgerError) as exc:
        print(f"starling-ledger contributions: {' '.join(str(exc).split())}", file=sys.stderr)
        return REFUSED
    if args.format == "json":
        print(json.dumps(result, sort_keys=True))
        return 0
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(CONTRIBUTION_COLUMNS)
    for row in result["devices"]:
        out.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in CONTRIBUTION_COLUMNS])
    return 0


def _audit(args: argparse.Namespace) -> int:
    """`audit --recompute`: 0 no mismatch, 1 a mismatch (named on stderr too), 2 with one stderr line when it
    cannot run (a bad argument, no ledger or blob folder, no recompute installed)."""
    try:
        if not args.recompute:
            raise Refused("say what to audit: --recompute (the only audit so far)")
        if args.round is not None and not 0 <= args.round <= MAX_ROUND:
            raise Refused(f"--round must be a round from 0 to {MAX_ROUND}, not {args.round}")
        if not Path(args.db).is_file():
            raise Refused(f"no ledger at {args.db}")
        folders = [Path(b) for b in args.blobs] if args.blobs else [Path(args.db).parent / "blobs"]
        for folder in folders:
            if not folder.is_dir():
                raise Refused(f"no blob folder at {folder} (--blobs DIR: a gateway's <state_dir>/blobs)")
        broker = _host_port(args.broker) if args.broker is not None else None
        factory = recompute_plugin()
        with Ledger.open(args.db, read_only=True) as ledger:
            holders = sorted(set(ledger.member_ids().values()))
            result = recompute_audit(ledger, lambda: factory([str(f) for f in folders], broker, holders),
                                     args.round)
    except (Refused, RecomputeMissing, LedgerError, OSError) as exc:
        print(f"starling-ledger audit: {' '.join(str(exc).split())}", file=sys.stderr)
        return REFUSED
    blobs = [str(f) for f in folders]
    print(json.dumps({"db": str(args.db), "blobs": blobs[0] if len(blobs) == 1 else blobs, **result}, sort_keys=True))
    if not result["mismatches"]:
        return 0
    for item in result["mismatches"]:
        where = f"epoch {item['epoch']}" if item["kind"] == "city" else f"round {item['round']}"
        print(f"starling-ledger audit: MISMATCH: {item['kind']} {item['vertex']} by gateway {item['gateway']} {where}:"
              f" recorded {item['expected']}, recomputed {item['got']} ({item['reason']})", file=sys.stderr)
    return 1


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refused(f"--broker must be HOST:PORT, not {text!r}")
    return host, int(port)


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
    revoked = ledger.revoked_devices()
    summary = {
        "path": str(ledger.path),
        "height": ledger.height,
        "tips": [t.hex() for t in ledger.tips()],
        "kinds": ledger.kind_counts(),
        "gateways": [identity_id(k) for k in ledger.gateways()],
        "devices": {identity_id(k): name for k, name in devices.items()},
        "revoked": {identity_id(k): reason for k, reason in revoked.items()},
        "finality": ledger.finality(),
        "equivocators": ledger.equivocators(),
        # Gateways with mismatch evidence no operator has cleared (`starling-ledger clear-mismatch`): gateway id
        # -> [{vertex recomputed, its kind, accuser, reason}]; the city merges leave them out.
        "mismatches": {gateway: [{"vertex": e.vertex.hex(), "kind": e.kind, "accuser": e.accuser, "reason": e.reason}
                                 for e in items] for gateway, items in ledger.flagged().items()},
    }
    summary["lineages"] = summary["kinds"].get(LINEAGE, 0)  # model lineages started (`lineage` vertices)
    summary["contributions"] = summary["kinds"].get(CONTRIBUTIONS, 0)  # vertices of contribution scores
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    print(f"ledger   {summary['path']}")
    print(f"height   {summary['height']}")
    final = summary["finality"]
    print(f"final    {final['final']} (lag {final['lag']} vertices)")
    if summary["equivocators"]:
        print(f"EQUIVOCATED {' '.join(summary['equivocators'])}")
    for gateway, items in summary["mismatches"].items():
        accusers = sorted({item["accuser"] for item in items})
        print(f"MISMATCH {gateway}: {len(items)} recomputed vertex(es) differ, by {' '.join(accusers)}"
              f" (first: {items[0]['kind']} {items[0]['vertex'][:16]}: {items[0]['reason']})")
    print(f"tips     {' '.join(summary['tips']) or '-'}")
    print(f"kinds    {' '.join(f'{k}={n}' for k, n in summary['kinds'].items()) or '-'}")
    print(f"lineages {summary['lineages']} started")
    print(f"scores   {summary['contributions']} contributions vertices")
    print(f"gateways {' '.join(summary['gateways']) or '-'}")
    print(f"devices  {len(devices)} enrolled")
    for device_id, name in summary["devices"].items():
        print(f"  {device_id}  {name}")
    print(f"revoked  {len(revoked)}")
    for device_id, reason in summary["revoked"].items():
        print(f"  {device_id}  {reason}")




def _digest(text: str) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        raise Refused(f"--model {text!r} is not a SHA-256 digest (64 hex)")
    return bytes.fromhex(text.strip())


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
