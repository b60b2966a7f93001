"""`starling-ledger enroll | revoke | voucher`, through `python -m ledger.cli` as an operator runs them.

The long tables of refusals call `ledger.cli.main` in this process (a fresh
interpreter per case would cost seconds); the end-to-end refusal test runs
one case of each command as a real subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import stat
import subprocess
import time
from pathlib import Path

import pytest
from ledger_helpers import run_cli, run_cli_many

from ledger.cli import main
from ledger.store import Ledger
from ledger.verify import verify_store
from protocol.keys import Identity
from protocol.vouchers import Voucher, VoucherRefused


@pytest.fixture
def key_file(tmp_path: Path, gateway: Identity) -> Path:
    path = tmp_path / "gateway.key"
    gateway.save(path)
    return path


@pytest.fixture
def closed(db_path: Path, ledger: Ledger, enrolled: list[Identity]) -> Path:
    """A ledger file with genesis and three enrolled devices, closed (no gateway running)."""
    ledger.close()
    return db_path


def state_of(path: Path) -> tuple:
    with Ledger.open(path, read_only=True) as ledger:
        return ledger.height, ledger.enrolled_devices(), ledger.revoked_devices()


def call(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Like `run_cli_many`, but in this process: `main(argv)` with its output captured."""
    results = []
    for argv in argvs:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results.append(subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue()))
    return results


def assert_refused(result, command: str, *words: str) -> None:
    """Exit 2 with one clear line on stderr, nothing on stdout, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"starling-ledger {command}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_each_operator_command_has_help() -> None:
    for command, result in zip(
        ("enroll", "revoke", "voucher"),
        run_cli_many(["enroll", "--help"], ["revoke", "--help"], ["voucher", "--help"]),
    ):
        assert result.returncode == 0 and f"usage: starling-ledger {command}" in result.stdout
        assert "--device" in result.stdout


def test_refusals_exit_2_with_one_line_on_stderr(tmp_path: Path, closed: Path, key_file: Path) -> None:
    stranger = Identity.generate().public_key.hex()
    enroll, revoke, voucher = run_cli_many(
        [
            "enroll",
            "--db",
            str(closed),
            "--key",
            str(tmp_path / "absent.key"),
            "--device",
            stranger,
            "--name",
            "x",
        ],
        ["revoke", "--db", str(closed), "--key", str(key_file), "--device", stranger, "--reason", "x"],
        ["voucher", "--operator-key", str(tmp_path / "absent.key"), "--device", stranger],
    )
    assert_refused(enroll, "enroll", "key_file", "absent.key")
    assert_refused(revoke, "revoke", "unknown_device")
    assert_refused(voucher, "voucher", "key_file", "absent.key")
    assert not (tmp_path / "absent.key").exists()


# --- enroll ----------------------------------------------------------------------------


def test_enroll_appends_a_device_enroll_vertex_signed_by_the_gateway(
    closed: Path, key_file: Path, gateway: Identity
) -> None:
    device = Identity.generate()
    first, policy = run_cli_many(
        [
            "enroll",
            "--db",
            str(closed),
            "--key",
            str(key_file),
            "--device",
            device.public_key.hex(),
            "--name",
            "pi-north",
        ],
        [
            "enroll",
            "--db",
            str(closed),
            "--key",
            str(key_file),
            "--device",
            Identity.generate().public_key.hex(),
            "--name",
            "pi-south",
            "--policy",
            "field-visit",
        ],
    )
    assert first.returncode == 0, first.stderr
    line = json.loads(first.stdout)
    assert line["device"] == device.id and line["created"] is True
    with Ledger.open(closed, read_only=True) as ledger:
        vertex = ledger.get(bytes.fromhex(line["vertex"]))
        assert ledger.is_enrolled(device.public_key)
    assert vertex is not None and vertex.creator == gateway.public_key
    # The operator's word is the evidence: the body carries empty evidence under policy "operator".
    assert vertex.body == {"device": device.public_key, "name": "pi-north", "policy": "operator", "evidence": b""}
    assert policy.returncode == 0 and json.loads(policy.stdout)["policy"] == "field-visit"
    assert verify_store(closed).ok


def test_enrolling_an_enrolled_device_again_reports_its_enrollment(
    closed: Path, key_file: Path, enrolled: list[Identity]
) -> None:
    before = state_of(closed)
    (result,) = call(
        [
            "enroll",
            "--db",
            str(closed),
            "--key",
            str(key_file),
            "--device",
            enrolled[0].public_key.hex(),
            "--name",
            "renamed",
        ]
    )
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["created"] is False and line["name"] == "pi-0"
    assert state_of(closed) == before


def test_enroll_refusals_write_nothing(
    tmp_path: Path, closed: Path, key_file: Path, enrolled: list[Identity]
) -> None:
    with Ledger.open(closed, Identity.load(key_file)) as ledger:
        ledger.revoke_device(enrolled[2].public_key, "stolen")
    before = state_of(closed)
    stranger_key = tmp_path / "stranger.key"
    Identity.generate().save(stranger_key)
    loose_key = tmp_path / "loose.key"
    loose_key.write_bytes(key_file.read_bytes())
    loose_key.chmod(0o644)
    new = Identity.generate().public_key.hex()
    base = ["enroll", "--db", str(closed), "--key", str(key_file), "--name", "pi"]
    cases = [
        (["--device", new[:-2]], ("64 hex",)),  # bad hex
        (["--device", "zz" * 32], ("64 hex",)),
        (["--device", enrolled[2].public_key.hex()], ("revoked", enrolled[2].id)),
        (["--device", new, "--name", "n" * 65], ("invalid_vertex",)),
        (["--device", new, "--key", str(tmp_path / "absent.key")], ("key_file", "absent.key")),
        (["--device", new, "--key", str(loose_key)], ("key_file", "600")),
        (["--device", new, "--key", str(stranger_key)], ("not one of this ledger's gateways",)),
        (["--device", new, "--db", str(tmp_path / "absent.db")], ("no ledger", "absent.db")),
    ]
    results = call(*[base + extra for extra, _ in cases])
    for (extra, words), result in zip(cases, results, strict=True):
        assert_refused(result, "enroll", *words)
    assert state_of(closed) == before
    assert not (tmp_path / "absent.db").exists() and not (tmp_path / "absent.key").exists()


# --- revoke ----------------------------------------------------------------------------


def test_revoke_by_public_key_and_by_device_id(
    closed: Path, key_file: Path, enrolled: list[Identity]
) -> None:
    by_key, by_id = run_cli_many(  # at once: the two writers take turns
        [
            "revoke",
            "--db",
            str(closed),
            "--key",
            str(key_file),
            "--device",
            enrolled[0].public_key.hex(),
            "--reason",
            "stolen",
        ],
        [
            "revoke",
            "--db",
            str(closed),
            "--key",
            str(key_file),
            "--device",
            enrolled[1].id.upper(),
            "--reason",
            "battery fire",
        ],
    )
    for result in (by_key, by_id):
        assert result.returncode == 0, result.stderr
    assert json.loads(by_key.stdout)["device"] == enrolled[0].id
    line = json.loads(by_id.stdout)
    assert line["device"] == enrolled[1].id and line["public_key"] == enrolled[1].public_key.hex()
    assert line["reason"] == "battery fire"
    height, active, revoked = state_of(closed)
    assert height == 6 and list(active) == [enrolled[2].public_key]
    assert revoked == {enrolled[0].public_key: "stolen", enrolled[1].public_key: "battery fire"}
    assert verify_store(closed).ok
    (show,) = call(["show", "--db", str(closed), "--json"])
    assert json.loads(show.stdout)["revoked"] == {enrolled[0].id: "stolen", enrolled[1].id: "battery fire"}


def test_revoke_refusals_write_nothing(
    tmp_path: Path, closed: Path, key_file: Path, enrolled: list[Identity]
) -> None:
    with Ledger.open(closed, Identity.load(key_file)) as ledger:
        ledger.revoke_device(enrolled[2].public_key, "stolen")
    before = state_of(closed)
    stranger = Identity.generate()
    base = ["revoke", "--db", str(closed), "--key", str(key_file), "--reason", "lost"]
    cases = [
        (["--device", enrolled[2].public_key.hex()], ("already_revoked", enrolled[2].id)),
        (["--device", enrolled[2].id], ("already_revoked", enrolled[2].id)),
        (["--device", stranger.public_key.hex()], ("unknown_device", stranger.id)),
        (["--device", stranger.id], ("no device with id", stranger.id)),
        (["--device", "not-hex"], ("neither a public key",)),
        (["--device", enrolled[0].id, "--reason", "x" * 257], ("invalid_vertex",)),
        (["--device", enrolled[0].id, "--key", str(tmp_path / "absent.key")], ("key_file",)),
        (["--device", enrolled[0].id, "--db", str(tmp_path / "absent.db")], ("no ledger",)),
    ]
    results = call(*[base + extra for extra, _ in cases])
    for (extra, words), result in zip(cases, results, strict=True):
        assert_refused(result, "revoke", *words)
    assert state_of(closed) == before
    assert not (tmp_path / "absent.db").exists() and not (tmp_path / "absent.key").exists()


def test_revoke_of_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path, key_file: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 300)
    (result,) = call(
        ["revoke", "--db", str(junk), "--key", str(key_file), "--device", "ab" * 32, "--reason", "x"]
    )
    assert_refused(result, "revoke", "store")
    assert junk.read_bytes() == b"not a database" * 300


# --- voucher ---------------------------------------------------------------------------


def test_voucher_written_to_a_file_passes_the_gateways_check(tmp_path: Path) -> None:
    operator_key, device, gateway = tmp_path / "operator.key", Identity.generate(), Identity.generate()
    Identity.generate().save(operator_key)
    operator = Identity.load(operator_key)
    out = tmp_path / "vouchers" / "pi-7.voucher"
    result = run_cli(
        "voucher",
        "--operator-key",
        str(operator_key),
        "--device",
        device.public_key.hex(),
        "--gateway",
        gateway.id,
        "--days",
        "7",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    voucher = Voucher.decode(out.read_bytes())
    voucher.check([operator.public_key], device.public_key, gateway.id)  # raises if refused
    assert summary["device"] == device.id and summary["gateway"] == gateway.id
    assert summary["operator"] == operator.public_key.hex() and summary["expires"] == voucher.expires
    assert summary["operator_key_created"] is False and "voucher" not in summary
    assert abs(voucher.expires - (time.time() + 7 * 86400)) < 60
    with pytest.raises(VoucherRefused):  # bound to the gateway it names
        voucher.check([operator.public_key], device.public_key, Identity.generate().id)


def test_voucher_printed_as_hex_for_any_gateway_with_a_created_operator_key(tmp_path: Path) -> None:
    operator_key, device = tmp_path / "keys" / "operator.key", Identity.generate()
    result = run_cli(
        "voucher",
        "--operator-key",
        str(operator_key),
        "--create-operator-key",
        "--device",
        device.public_key.hex(),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["operator_key_created"] is True
    assert stat.S_IMODE(operator_key.stat().st_mode) == 0o600
    operator = Identity.load(operator_key)
    voucher = Voucher.decode(bytes.fromhex(summary["voucher"]))
    voucher.check([operator.public_key], device.public_key, Identity.generate().id)
    assert summary["gateway"] == "" and abs(voucher.expires - (time.time() + 30 * 86400)) < 60
    (again,) = call(
        [
            "voucher",
            "--operator-key",
            str(operator_key),
            "--create-operator-key",
            "--device",
            device.public_key.hex(),
        ]
    )
    assert json.loads(again.stdout)["operator"] == operator.public_key.hex()  # the same key, reused


def test_voucher_refusals(tmp_path: Path) -> None:
    operator_key = tmp_path / "operator.key"
    Identity.generate().save(operator_key)
    device = Identity.generate().public_key.hex()
    base = ["voucher", "--operator-key", str(operator_key)]
    cases = [
        (["--device", device, "--operator-key", str(tmp_path / "absent.key")], ("key_file", "absent.key")),
        (["--device", device[:10]], ("64 hex",)),
        (["--device", device, "--gateway", "gw-1"], ("gateway id",)),
        (["--device", device, "--days", "0"], ("--days",)),
        (["--device", device, "--days", "nan"], ("--days",)),
        (["--device", device, "--out", str(tmp_path)], ("folder",)),
    ]
    results = call(*[base + extra for extra, _ in cases])
    for (extra, words), result in zip(cases, results, strict=True):
        assert_refused(result, "voucher", *words)
    assert not (tmp_path / "absent.key").exists()
