"""Inputs that hit a product bug this suite found (each has a strict-xfail test in test_known_bugs.py).

The floods leave these inputs out, so they keep proving everything else; when
a bug is fixed its xfail turns into an unexpected pass, and its filter here
goes too.
"""

from __future__ import annotations

import cbor2

from ledger.vertex import MAX_SEQ


def want_seq_beyond_sqlite(payload: bytes) -> bool:
    """BUG 1: a gossip `want` whose seq is an int above 2^63-1 raises OverflowError in
    `Ledger.encoded_from` (SQLite INTEGER); `Gossip.handle` counts it as `internal` with a traceback."""
    try:
        doc = cbor2.loads(payload)
    except Exception:  # noqa: BLE001 (hostile bytes: the decoder raises many types)
        return False
    seq = doc.get("seq") if isinstance(doc, dict) else None
    return isinstance(seq, int) and not isinstance(seq, bool) and seq > MAX_SEQ


def snapshot_same_but_bool_numbering(payload: bytes, genuine: bytes) -> bool:
    """BUG 2 (minor): `Gossip._on_snapshot` takes `chunk`/`chunks` of `false`/`true` as 0/1 (bool is an int
    to isinstance), so a re-encoding of a genuine snapshot with boolean numbering is accepted."""
    try:
        doc, real = cbor2.loads(payload), cbor2.loads(genuine)
    except Exception:  # noqa: BLE001 (hostile bytes: the decoder raises many types)
        return False
    return (isinstance(doc, dict) and set(doc) == set(real)
            and any(isinstance(doc[k], bool) for k in ("chunk", "chunks"))
            and all(doc[k] == real[k] for k in real))


def nul_in_gateway_signed_task_id(payload: bytes) -> bool:
    """BUG 4: the agent builds file names from `ctx.task` (`<round>-<task>.reply` in state/pending); a
    gateway-signed task or receipt whose task id holds a NUL makes `StateStore.read_pending` raise
    ValueError, which `Agent._worker` logs as `task.failed unexpected error` with a traceback, uncounted."""
    from protocol import envelope
    from protocol.errors import ProtocolError

    try:
        env = envelope.decode(payload)
        env.verify()
    except ProtocolError:
        return False
    return "\x00" in env.ctx.task


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
