"""Error feedback for sparse (topk) uploads: what a round did not send is sent later.

A device asked for `topk` sends only the largest entries of each tensor of its
delta, in int8 (protocol/tensors.py). The rest (the entries left out and the
quantization error of the ones sent) is the residual: the device keeps it and
adds it to its next delta before selecting again, so nothing it learned is
dropped for good, only delayed (error feedback, as in EF-SGD / Deep Gradient
Compression). The residual is exactly `corrected delta - what the gateway
decodes`, computed from the very attachment that is sent.

    <state_dir>/residual.npz   the residual (float32, one array per weight tensor: at most one copy of
                               the model) and its lineage, written atomically (protocol/atomic.py) after
                               the reply it belongs to is on disk

When it is dropped (the next round starts from zero):
- the model's tensors changed (names or shapes): it no longer fits;
- the lineage changed: another gateway (the device re-homed or was pointed elsewhere: model versions
  count per gateway lineage) or another model architecture (a new .tflite);
- the model version went back (the residual was kept at a version above the one trusted now: a new
  lineage started from scratch, where the old residual means nothing);
- a task asks for a dense codec (i8, f16, f32): those send every entry, the residual is not used;
- the file is unreadable or holds non-finite values (it is ignored, never trusted).

A power cut between the reply's write and the residual's leaves the previous residual: the next round
adds it again (its largest entries were sent once already); no file is ever torn.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np

from protocol.atomic import write_atomic
from protocol.logs import event

log = logging.getLogger("starling.agent.error_feedback")

RESIDUAL_FILE = "residual.npz"
_META = "__meta__"


class ErrorFeedback:
    """The residual on disk: `load` it for a round, `keep` the new one (or None: drop it)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / RESIDUAL_FILE

    def load(self, shapes: dict[str, tuple[int, ...]], lineage: str, version: int) -> dict[str, np.ndarray] | None:
        """The residual kept for this model (`shapes`), `lineage` and trusted `version`; None when there is none
        or it no longer applies (then it is deleted, with the reason logged)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._drop("unreadable", str(exc))
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                meta = json.loads(bytes(npz[_META]).decode())
                arrays = {name: np.array(npz[name], dtype=np.float32) for name in npz.files if name != _META}
            kept_lineage, kept_version = str(meta["lineage"]), int(meta["version"])
        except Exception as exc:  # anything but a residual we wrote: ignore it, never trust it
            return self._drop("unreadable", f"{type(exc).__name__}: {exc}")
        if kept_lineage != lineage:
            return self._drop("lineage_changed", f"{kept_lineage} -> {lineage}")
        if version < kept_version:
            return self._drop("version_went_back", f"{kept_version} -> {version}")
        if {k: v.shape for k, v in arrays.items()} != {k: tuple(v) for k, v in shapes.items()}:
            return self._drop("shape_changed", "the model's tensors differ from the residual's")
        if not all(np.all(np.isfinite(v)) for v in arrays.values()):
            return self._drop("non_finite", "the residual holds NaN or infinite values")
        return {name: arrays[name] for name in shapes}

    def keep(self, residual: dict[str, np.ndarray] | None, lineage: str, version: int) -> None:
        """Write `residual` atomically (mode 0600) for the next round; None drops the one kept."""
        if residual is None:
            self.clear()
            return
        buffer = io.BytesIO()
        meta = np.frombuffer(json.dumps({"lineage": lineage, "version": int(version)}).encode(), dtype=np.uint8)
        np.savez(buffer, **{_META: meta}, **{name: np.asarray(v, dtype=np.float32) for name, v in residual.items()})
        write_atomic(self.path, buffer.getvalue(), mode=0o600)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _drop(self, reason: str, detail: str) -> None:
        event(log, "residual.reset", logging.INFO, reason=reason, detail=detail)
        self.clear()
        return None
