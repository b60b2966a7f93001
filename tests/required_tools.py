"""Tools the tests need from the system, and what a test does without one.

A test that lacks a tool (openssl, a C compiler, TensorFlow, Mosquitto, Chromium,
systemd-analyze) skips, and the skip names the tool and how to get it; `-ra` lists
it at the end of the run. It never passes without doing its work. In CI (`.ci/run`
sets STARLING_CI=1) a missing tool is a failure instead: CI passes with no test
skipped for want of a tool that `hw/install-system.sh` or the Makefile installs.

    pytestmark = needs(shutil.which("openssl") is not None, "needs openssl (hw/install-system.sh)")

    def test_it():
        require(shutil.which("gcc") is not None, "needs gcc (hw/install-system.sh)")

`tests/conftest.py` applies the mark.
"""

from __future__ import annotations

import os

import pytest

MARK = "needs_tool"


def in_ci() -> bool:
    """True where a missing tool fails a test rather than skipping it (STARLING_CI=1, set by .ci/run)."""
    return os.environ.get("STARLING_CI") == "1"


def needs(present: bool, reason: str) -> pytest.MarkDecorator:
    """A mark for a module's `pytestmark` or a test: without the tool the test skips (fails in CI)."""
    return getattr(pytest.mark, MARK)(present=bool(present), reason=reason)


def require(present: bool, reason: str) -> None:
    """In a test or fixture body: skip here without the tool (fail in CI)."""
    __tracebackhide__ = True  # reported where it was called
    if not present:
        missing(reason)


def missing(reason: str, module_level: bool = False) -> None:
    """Skip (the whole module with `module_level`), or fail under STARLING_CI=1, naming the missing tool."""
    __tracebackhide__ = True  # reported where it was called
    if in_ci():
        pytest.fail(f"{reason} [STARLING_CI=1: CI must have this tool, so this is a failure, not a skip]",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)
