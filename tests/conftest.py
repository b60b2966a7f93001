"""Suite-wide: the `needs_tool` mark of `required_tools.py` (skip without a tool; fail under STARLING_CI=1)."""

from __future__ import annotations

import pytest
from required_tools import MARK, in_ci, missing


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}(present, reason): a system tool the test needs (tests/required_tools.py)")


def _absent(item: pytest.Item) -> list[str]:
    return [mark.kwargs["reason"] for mark in item.iter_markers(MARK) if not mark.kwargs["present"]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not in_ci():  # a plain skip mark: reported at the test, with its reason
        for item in items:
            for reason in _absent(item):
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for reason in _absent(item):
        missing(reason)
