"""`starling-ledger`'s operator commands: each appends one signed vertex, or signs a voucher.

    enroll / revoke      a device, signed with a gateway's own key file
    voucher              an enrollment voucher, signed with an operator key (no ledger touched)
    init / join / leave  the city's genesis and its gateway set, signed with the root key
    rotate               a gateway's key replaced (root key): the vertex and the gateway's chain file
    clear-mismatch       the operator's answer to mismatch evidence against a gateway (root key): its
                         models count in the city merges again

Each returns the JSON summary `ledger.cli` prints, or raises `Refused` with
the one line it prints on stderr (exit 2). `ledger.cli` has the full usage.
"""


from __future__ import annotations

import argparse
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from protocol.atomic import write_atomic
from protocol.keys import Identity, identity_id, load_or_create
from protocol.rotation import chain_ending_at, save_chain
from protocol.rotation import issue as rotation_issue
from protocol.vouchers import issue

from .kinds import GENESIS, NAME_MAX, REASON_MAX, VOUCHER_POLICY
from .store import Ledger
from .vertex import sign

MAX_VOUCHER_DAYS = 3650.0
PUBLIC_KEY_HEX = re.compile(r"[0-9a-fA-F]{64}")
ID_HEX = re.compile(r"[0-9a-fA-F]{32}")  # a device or gateway id (protocol.keys.identity_id)


class Refused(Exception):
    """An operator command cannot be carried out; the message is the one line printed."""




def add_operator_commands(commands: Any) -> None:
    help_text = "append a device.enroll vertex signed with the gateway's key"
    enroll = commands.add_parser("enroll", help=help_text, description=help_text)
    _ledger_arguments(enroll)
    enroll.add_argument(
        "--device", required=True, metavar="PUBKEY_HEX", help="the device's public key (64 hex)"
    )
    enroll.add_argument("--name", required=True, help=f"the device's name (at most {NAME_MAX} characters)")
    enroll.add_argument(
        "--policy", default=None,
        help="the policy recorded as admitting it (default: operator; voucher with --voucher)",
    )
    enroll.add_argument(
        "--voucher", default=None, metavar="FILE",
        help="the device's voucher (`voucher --out`), kept on the ledger as the enrollment's evidence",
    )

    help_text = "append a device.revoke vertex: the device's key may not contribute or enroll again"
    revoke = commands.add_parser("revoke", help=help_text, description=help_text)
    _ledger_arguments(revoke)
    revoke.add_argument(
        "--device",
        required=True,
        metavar="PUBKEY_HEX_OR_DEVICE_ID",
        help="the device's public key (64 hex) or its device id (32 hex, as `show` lists it)",
    )
    revoke.add_argument(
        "--reason", required=True, help=f"why, for the auditors (at most {REASON_MAX} characters)"
    )

    help_text = "write the genesis vertex of a city's ledger, signed by the operator's root key"
    init = commands.add_parser("init", help=help_text, description=help_text)
    init.add_argument("--root-key", required=True, metavar="FILE", help="the operator's root key file")
    init.add_argument("--create-root-key", action="store_true", help="create the root key file (mode 600) if missing")
    init.add_argument("--name", required=True, help=f"the ledger's name (at most {NAME_MAX} characters)")
    init.add_argument("--gateway", required=True, action="append", metavar="PUBKEY_HEX",
                      help="a first gateway's public key (repeat for each)")
    init.add_argument("--out", required=True, metavar="FILE", help="where to write the genesis vertex")

    help_text = "admit a gateway: append a gateway.join vertex signed with the root key"
    join = commands.add_parser("join", help=help_text, description=help_text)
    join.add_argument("--root-key", required=True, metavar="FILE")
    join.add_argument("--db", required=True, metavar="PATH", help="any member gateway's ledger file")
    join.add_argument("--gateway", required=True, metavar="PUBKEY_HEX")
    join.add_argument("--name", required=True)

    help_text = "retire a gateway for good: append a gateway.leave vertex signed with the root key"
    leave = commands.add_parser("leave", help=help_text, description=help_text)
    leave.add_argument("--root-key", required=True, metavar="FILE")
    leave.add_argument("--db", required=True, metavar="PATH", help="any member gateway's ledger file")
    leave.add_argument("--gateway", required=True, metavar="PUBKEY_HEX_OR_ID")
    leave.add_argument("--reason", required=True)

    help_text = ("replace a gateway's key: append a gateway.rotate vertex signed with the root key and write the "
                 "gateway's rotation chain (the gateway publishes it; devices that know the root key follow it)")
    rotate = commands.add_parser("rotate", help=help_text, description=help_text)
    rotate.add_argument("--root-key", required=True, metavar="FILE")
    rotate.add_argument("--db", required=True, metavar="PATH", help="any member gateway's ledger file")
    rotate.add_argument("--gateway", required=True, metavar="PUBKEY_HEX_OR_ID", help="the key to retire")
    rotate.add_argument("--new-key", required=True, metavar="PUBKEY_HEX", help="the gateway's new public key")
    rotate.add_argument("--chain", required=True, metavar="FILE",
                        help="where to write the gateway's rotation chain ([identity] rotations in its config)")

    help_text = ("answer the mismatch evidence against a gateway: append a mismatch.clear vertex signed with the "
                 "root key; the evidence so far no longer keeps its models out of the city merges")
    clear = commands.add_parser("clear-mismatch", help=help_text, description=help_text)
    clear.add_argument("--root-key", required=True, metavar="FILE")
    clear.add_argument("--db", required=True, metavar="PATH", help="any member gateway's ledger file")
    clear.add_argument("--gateway", required=True, metavar="PUBKEY_HEX_OR_ID", help="the gateway flagged")
    clear.add_argument("--reason", required=True, help="what the operator found (kept on the ledger)")

    help_text = "sign an enrollment voucher for a device key with the operator's key"
    voucher = commands.add_parser(
        "voucher",
        help=help_text,
        description=help_text + ". Prints a JSON summary; without --out it holds the voucher as hex.",
    )
    voucher.add_argument("--operator-key", required=True, metavar="FILE", help="the operator's key file")
    voucher.add_argument(
        "--create-operator-key",
        action="store_true",
        help="create the operator key file (mode 600) if missing",
    )
    voucher.add_argument(
        "--device", required=True, metavar="PUBKEY_HEX", help="the device's public key (64 hex)"
    )
    voucher.add_argument(
        "--gateway", default="", metavar="ID", help="the only gateway id it admits at (default: any gateway)"
    )
    voucher.add_argument(
        "--days", type=float, default=30.0, metavar="N", help="days until it expires (default: 30)"
    )
    voucher.add_argument("--out", metavar="FILE", help="write the encoded voucher here (mode 644)")


def _ledger_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--db", required=True, metavar="PATH", help="the ledger's SQLite file (must exist)")
    command.add_argument(
        "--key", required=True, metavar="GATEWAY_KEY_FILE", help="the key file of a gateway of this ledger"
    )


def _enroll(args: argparse.Namespace) -> dict[str, Any]:
    device = _public_key(args.device)
    policy = args.policy or (VOUCHER_POLICY if args.voucher else "operator")
    evidence = b""  # the operator's word is the evidence: nothing to carry
    if args.voucher is not None:
        if policy != VOUCHER_POLICY:
            raise Refused(f"--voucher is the evidence of policy {VOUCHER_POLICY!r}, not {policy!r}")
        try:
            evidence = Path(args.voucher).read_bytes()
        except OSError as exc:
            raise Refused(f"cannot read --voucher {args.voucher}: {exc.strerror or exc}") from exc
    elif policy == VOUCHER_POLICY:
        raise Refused(f"--policy {VOUCHER_POLICY} needs --voucher FILE: the voucher is the enrollment's evidence")
    with _open_as_gateway(args.db, args.key) as ledger:
        gateway = ledger.identity.id
        created = not any(record.creator == gateway for record in ledger.enrollments(device))
        vertex = ledger.enroll_device(device, args.name, policy, evidence)
    return {
        "command": "enroll",
        "vertex": vertex.id_hex,
        "seq": vertex.seq,
        "device": identity_id(device),
        "public_key": device.hex(),
        "name": vertex.body["name"],
        "policy": vertex.body["policy"],
        "evidence": vertex.body.get("evidence", b"").hex(),
        "created": created,  # False: this gateway enrolled it before; this is that enrollment's vertex
    }


def _revoke(args: argparse.Namespace) -> dict[str, Any]:
    text = args.device.strip()
    if not (PUBLIC_KEY_HEX.fullmatch(text) or ID_HEX.fullmatch(text)):
        raise Refused(f"--device {args.device!r} is neither a public key (64 hex) nor a device id (32 hex)")
    with _open_as_gateway(args.db, args.key) as ledger:
        device = device_key(ledger, text)
        vertex = ledger.revoke_device(device, args.reason)
    return {
        "command": "revoke",
        "vertex": vertex.id_hex,
        "seq": vertex.seq,
        "device": identity_id(device),
        "public_key": device.hex(),
        "reason": vertex.body["reason"],
    }


def _voucher(args: argparse.Namespace) -> dict[str, Any]:
    device = _public_key(args.device)
    gateway = args.gateway.strip().lower()
    if gateway and not ID_HEX.fullmatch(gateway):
        raise Refused(f"--gateway {args.gateway!r} is not a gateway id (32 hex)")
    if not (math.isfinite(args.days) and 0 < args.days <= MAX_VOUCHER_DAYS):
        raise Refused(f"--days must be more than 0 and at most {MAX_VOUCHER_DAYS:g}, not {args.days:g}")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise Refused(f"--out {out} is a folder; name the file to write")
    key_path = Path(args.operator_key)
    created = args.create_operator_key and not key_path.exists()
    operator = load_or_create(key_path) if args.create_operator_key else Identity.load(key_path)
    voucher = issue(operator, device, gateway, args.days * 86400)
    encoded = voucher.encode()
    summary: dict[str, Any] = {
        "command": "voucher",
        "device": identity_id(device),
        "public_key": device.hex(),
        "gateway": gateway,  # "" admits the device at any gateway
        "expires": voucher.expires,
        "expires_utc": datetime.fromtimestamp(voucher.expires, timezone.utc).isoformat(timespec="seconds"),
        "operator": operator.public_key.hex(),  # what gateways list in enrollment.operator_keys
        "operator_key_created": created,
    }
    if out is not None:
        try:
            write_atomic(out, encoded, mode=0o644)
        except OSError as exc:
            raise Refused(f"cannot write --out {out}: {exc.strerror or exc}") from exc
        summary["out"] = str(out)
    else:
        summary["voucher"] = encoded.hex()
    return summary


def _public_key(text: str, option: str = "--device") -> bytes:
    if not PUBLIC_KEY_HEX.fullmatch(text.strip()):
        raise Refused(f"{option} {text!r} is not a public key (64 hex digits)")
    return bytes.fromhex(text.strip())


def _open_as_gateway(db: str, key_file: str) -> Ledger:
    """Open an existing ledger to write as the gateway whose key file this is."""
    identity = Identity.load(key_file)  # never created here: a new key would be nobody's gateway
    if not Path(db).is_file() or Path(db).stat().st_size == 0:  # SQLite would make a new one of nothing
        raise Refused(f"no ledger at {db}")
    ledger = Ledger.open(db, identity)
    try:
        gateways = ledger.gateways()
        if not gateways:
            raise Refused(f"{db} has no genesis vertex yet; the gateway writes it when it first starts")
        if identity.public_key not in gateways:
            raise Refused(f"key {identity.id} ({key_file}) is not one of this ledger's gateways")
    except BaseException:
        ledger.close()
        raise
    return ledger


def _init(args: argparse.Namespace) -> dict[str, Any]:
    gateways = sorted({_public_key(g, "--gateway") for g in args.gateway})
    out = Path(args.out)
    if out.exists():
        raise Refused(f"--out {out} exists; a city has one genesis")
    key_path = Path(args.root_key)
    created = args.create_root_key and not key_path.exists()
    root = load_or_create(key_path) if args.create_root_key else Identity.load(key_path)
    genesis = sign(root, GENESIS, 0, [], {"name": args.name, "gateways": gateways})
    write_atomic(out, genesis.encode(), mode=0o644)
    return {"command": "init", "genesis": genesis.id_hex, "out": str(out), "root": root.public_key.hex(),
            "root_key_created": created, "gateways": [identity_id(g) for g in gateways]}


def _open_as_root(db: str, key_file: str) -> Ledger:
    identity = Identity.load(key_file)
    if not Path(db).is_file() or Path(db).stat().st_size == 0:
        raise Refused(f"no ledger at {db}")
    ledger = Ledger.open(db, identity)
    if ledger.root != identity.public_key:
        ledger.close()
        raise Refused(f"{key_file} is not the root key that signed this ledger's genesis")
    return ledger


def _join(args: argparse.Namespace) -> dict[str, Any]:
    gateway = _public_key(args.gateway, "--gateway")
    with _open_as_root(args.db, args.root_key) as ledger:
        vertex = ledger.join_gateway(gateway, args.name)
    return {"command": "join", "vertex": vertex.id_hex, "gateway": identity_id(gateway), "name": args.name}


def _member(ledger: Ledger, text: str) -> bytes:
    """The member gateway named by its public key or id (`--gateway`), or `Refused`."""
    wanted = text.strip().lower()
    for key in ledger.gateways():
        if wanted in (key.hex(), identity_id(key)):
            return key
    raise Refused(f"--gateway {text!r} is not a member of this ledger")


def _leave(args: argparse.Namespace) -> dict[str, Any]:
    with _open_as_root(args.db, args.root_key) as ledger:
        gateway = _member(ledger, args.gateway)
        vertex = ledger.leave_gateway(gateway, args.reason)
    return {"command": "leave", "vertex": vertex.id_hex, "gateway": identity_id(gateway), "reason": args.reason}


def _rotate(args: argparse.Namespace) -> dict[str, Any]:
    new = _public_key(args.new_key, "--new-key")
    with _open_as_root(args.db, args.root_key) as ledger:
        retired = _member(ledger, args.gateway)
        rotation = rotation_issue(Identity.load(args.root_key), retired, new)
        vertex = ledger.rotate_gateway(rotation)
        chain = chain_ending_at(ledger.rotations(), new)
    save_chain(Path(args.chain), chain)
    return {"command": "rotate", "vertex": vertex.id_hex, "gateway": chain.gateway_id(new),
            "retired": identity_id(retired), "key": new.hex(), "chain": args.chain,
            "rotations": len(chain.rotations)}


def _clear_mismatch(args: argparse.Namespace) -> dict[str, Any]:
    with _open_as_root(args.db, args.root_key) as ledger:
        gateway = _member(ledger, args.gateway)
        flagged = ledger.flagged().get(ledger.speaks_as(gateway), [])
        if not flagged:
            raise Refused(f"gateway {identity_id(gateway)} has no mismatch evidence against it to clear")
        vertex = ledger.clear_mismatch(gateway, args.reason)
    return {"command": "clear-mismatch", "vertex": vertex.id_hex, "gateway": identity_id(gateway),
            "cleared": len(flagged), "reason": args.reason}


OPERATOR_COMMANDS = {"enroll": _enroll, "revoke": _revoke, "voucher": _voucher, "init": _init, "join": _join,
                     "leave": _leave, "rotate": _rotate, "clear-mismatch": _clear_mismatch}


def device_key(ledger: Ledger, text: str) -> bytes:
    text = text.strip().lower()
    if PUBLIC_KEY_HEX.fullmatch(text):
        return bytes.fromhex(text)
    if ID_HEX.fullmatch(text):
        for key in [*ledger.enrolled_devices(), *ledger.revoked_devices()]:
            if identity_id(key) == text:
                return key
        raise Refused(f"no device with id {text} is enrolled in {ledger.path}")
    raise Refused(f"--device {text!r} is neither a device id (32 hex) nor a public key (64 hex)")
