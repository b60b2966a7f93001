"""`starling-ledger show | export | --help`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ledger_helpers import run_cli

from ledger.cli import main
from ledger.store import Ledger
from ledger.vertex import Vertex
from protocol.keys import Identity


@pytest.fixture
def closed(db_path: Path, ledger: Ledger, enrolled: list[Identity]) -> Path:
    ledger.close()
    return db_path


def test_help_lists_the_subcommands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("verify", "show", "export"):
        assert command in result.stdout


def test_missing_subcommand_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_show_summarizes_height_tips_kinds_and_devices(
    closed: Path, enrolled: list[Identity], capsys
) -> None:
    assert main(["show", "--db", str(closed), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    with Ledger.open(closed, read_only=True) as ledger:
        assert summary["height"] == 4
        assert summary["tips"] == [t.hex() for t in ledger.tips()]
    assert summary["kinds"] == {"device.enroll": 3, "genesis": 1}
    assert summary["devices"] == {d.id: f"pi-{i}" for i, d in enumerate(enrolled)}
    assert main(["show", "--db", str(closed)]) == 0
    human = capsys.readouterr().out
    assert "height   4" in human and "3 enrolled" in human


def test_export_prints_one_json_line_per_vertex_in_order(closed: Path, capsys) -> None:
    assert main(["export", "--db", str(closed)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with Ledger.open(closed, read_only=True) as ledger:
        order = list(ledger.vertices())
    assert [line["id"] for line in lines] == [v.id_hex for v in order]
    first = lines[1]
    vertex: Vertex = order[1]
    assert first["kind"] == "device.enroll" and first["creator"] == vertex.creator.hex()
    assert first["body"]["device"] == vertex.body["device"].hex()
    assert first["sig"] == vertex.sig.hex() and first["parents"] == [p.hex() for p in vertex.parents]


def test_show_of_a_file_that_is_not_a_ledger_exits_1(tmp_path: Path, capsys) -> None:
    assert main(["show", "--db", str(tmp_path / "absent.db")]) == 1
    assert "starling-ledger:" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()
