"""Inputs that hit a product bug this suite found (each has a strict-xfail test in test_known_bugs.py).

The floods leave these inputs out, so they keep proving everything else; when
a bug is fixed its xfail turns into an unexpected pass, and its filter here
goes too.
"""

from __future__ import annotations

# Config-file bugs, as (bug number, exception type, file the exception leaves from, message pattern).
CONFIG_BUGS: list[tuple[int, str, str, str]] = []  # all fixed


def config_bug(exc: BaseException) -> int | None:
    """The number of the known config bug `exc` is an instance of, or None."""
    import re
    import traceback

    frames = [f.filename.replace("\\", "/") for f in traceback.extract_tb(exc.__traceback__)]
    ours = [f for f in frames if not f.startswith("<") and "/site-packages/" not in f and "/lib/python" not in f]
    last = ours[-1] if ours else ""
    for number, kind, where, pattern in CONFIG_BUGS:
        if type(exc).__name__ == kind and last.endswith(where) and re.search(pattern, str(exc)):
            return number
    return None
