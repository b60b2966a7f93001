"""Fixtures of the dashboard tests (the material itself is in dashboard_helpers.py)."""

from __future__ import annotations

import pytest
from dashboard_helpers import replay

from dashboard.fleet import Fleet


@pytest.fixture
def replayed() -> Fleet:
    """A fleet model fed the whole real run (data/run_messages.json), one message per second from t=1000."""
    return replay()
