"""Structured, greppable logs shared by every Starling service.

One line per event: `<UTC time> <LEVEL> <role> <event> key=value ...`, e.g.

    2026-11-23T22:44:01Z INFO gateway reply.rejected device=3fa1c0d2 reason=replay round=3

Values with spaces are quoted. `grep 'reply.rejected' | grep reason=replay`
finds every replayed reply; any log shipper can split on `key=value`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


class _Formatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {self.role} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged, not when logging was set up: a test
    framework that swaps stderr per test (and closes the old one) must not break later lines."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; stderr is looked up instead
        pass


def setup(role: str, level: str | int = "INFO", stream: Any = None) -> None:
    """Send all logging to `stream` (stderr by default) in the one-line format."""
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(_Formatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _value(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")  # one event, one line
    if not text or any(c in text for c in ' ="'):
        text = '"' + text.replace('"', "'") + '"'
    return text


def event(logger: logging.Logger, what: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event `what` with key=value fields."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s", what, " ".join(f"{k}={_value(v)}" for k, v in fields.items()))
