"""The one-line log format, and a root handler that survives the stderr it was set up with being swapped."""

from __future__ import annotations

import io
import logging
import sys

from protocol import logs


def test_a_line_goes_to_the_stderr_of_the_moment_it_is_logged(monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        monkeypatch.setattr(sys, "stderr", first)
        logs.setup("tester")
        logs.event(logging.getLogger("starling.test"), "thing.happened", device="ab 12", round=3)
        first.close()  # as a test framework closes the stderr of a test that ended
        monkeypatch.setattr(sys, "stderr", second)
        logs.event(logging.getLogger("starling.test"), "thing.again", n=1)  # no "--- Logging error ---"
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = second.getvalue()
    assert line.endswith(" INFO tester thing.again n=1\n") and "Logging error" not in line


def test_values_with_spaces_are_quoted_and_newlines_escaped():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("tester", stream=stream)
        logs.event(logging.getLogger("starling.test"), "thing.happened", detail="two words\nand a line")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert stream.getvalue().endswith(' INFO tester thing.happened detail="two words\\nand a line"\n')
