"""Fixtures for the ledger tests: a gateway, devices, and real device-signed replies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ledger_helpers import Record, signed_reply

from ledger.store import Ledger
from protocol.keys import Identity


@pytest.fixture
def gateway() -> Identity:
    return Identity.generate()


@pytest.fixture
def devices() -> list[Identity]:
    return [Identity.generate() for _ in range(3)]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(db_path: Path, gateway: Identity) -> Iterator[Ledger]:
    """An open ledger with genesis written, this gateway the only one."""
    with Ledger.open(db_path, gateway) as store:
        store.init_genesis("city-centre", [gateway.public_key])
        yield store


@pytest.fixture
def enrolled(ledger: Ledger, devices: list[Identity]) -> list[Identity]:
    for i, device in enumerate(devices):
        ledger.enroll_device(device.public_key, f"pi-{i}", "allow-list")
    return devices


@pytest.fixture
def reply(gateway: Identity) -> Callable[..., Record]:
    """reply(device, round=1, **kw) -> a record signed for this gateway."""

    def make(device: Identity, round: int = 1, **kw: object) -> Record:
        return signed_reply(device, gateway.id, round, **kw)  # type: ignore[arg-type]

    return make
