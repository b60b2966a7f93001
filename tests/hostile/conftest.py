"""Shared fixtures of the hostile-input suite: a Mosquitto broker, a log watch, the message tally.

Every test here fails if any logger recorded an exception or an ERROR line while
it ran: a gateway, agent or ledger must refuse garbage as a counted value, never
by way of a traceback. At the end of the session the number of hostile messages
sent per surface is printed, so a CI log shows it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tally

from hw.broker import Broker


class _Watch(logging.Handler):
    """Keeps every record that carries a traceback or is an ERROR (or worse)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.bad: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        return True

    def handle(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does the work
        pass


@pytest.fixture(autouse=True)
def no_tracebacks_in_logs():
    """Fail the test if anything logged an exception or an error; keep WARNING chatter off the hot path."""
    watch = _Watch()
    root = logging.getLogger()
    starling = logging.getLogger("starling")
    old_level = starling.level
    starling.setLevel(logging.ERROR)  # refusals log at WARNING: 100,000 of them would only cost time
    root.addHandler(watch)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
        starling.setLevel(old_level)
    lines = [f"{r.name} {r.levelname} {r.getMessage()}" + (" (with traceback)" if r.exc_info else "")
             for r in watch.bad]
    assert not lines, "errors or tracebacks were logged:\n" + "\n".join(lines[:20])


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    """A real Mosquitto on a free loopback port, with the queue limits of hw/broker.py raised."""
    with Broker(tmp_path_factory.mktemp("broker"), kind="mosquitto") as broker:
        yield broker


def pytest_terminal_summary(terminalreporter):
    if not tally.SENT:
        return
    terminalreporter.section("hostile messages sent")
    for surface in sorted(tally.SENT):
        terminalreporter.write_line(f"{surface:<40} {tally.SENT[surface]:>9,}")
    terminalreporter.write_line(f"{'total':<40} {tally.total():>9,}")


def pytest_collection_modifyitems(items):
    """A bound per test, well under the suite's: a hang is a failure, not a stalled CI job."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(90))
