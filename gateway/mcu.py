"""Microcontroller exports of each global model, published for inference-only devices.

    [model]
    mcu_python = "/opt/starling-build/bin/python"   # a Python with TensorFlow and Starling (the build extra)

With `mcu_python` set, every model release is also exported with
`starling-models export-mcu` (int8 TFLite Micro model, see
firmware_models/mcu.py) in that Python, in a subprocess: TensorFlow stays out
of the gateway's own process and environment. The int8 model goes out as a
signed `McuRelease` (its quantization parameters and arena estimate in the
body, the `.tflite` as the attachment), retained on `starling/<gw>/mcu/latest`.

Exports run one at a time on their own thread and never hold up a round:
when releases come faster than exports, only the newest waits. A failed or
timed-out export is logged (`mcu.export_failed reason=...`) and counted; the
previous export stays retained.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from protocol import envelope, schemas, topics
from protocol.digest import sha256
from protocol.keys import Identity
from protocol.logs import event

log = logging.getLogger("starling.gateway.mcu")

EXPORT_TIMEOUT_S = 600.0


class McuExporter:
    """`submit(digest, version, weights)` after each release; `close()` at the end (waits for a running export)."""

    def __init__(self, python: Path, model_dir: Path, identity: Identity, gateway_id: str,
                 publish: Callable[..., object], timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        self.python, self.model_dir, self.timeout_s = python, model_dir, timeout_s
        self.identity, self.gateway_id, self.publish = identity, gateway_id, publish
        self.exported = 0
        self.failed = 0
        self._next: tuple[bytes, int, dict[str, np.ndarray]] | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="gateway-mcu", daemon=True)
        self._thread.start()

    def submit(self, digest: bytes, version: int, weights: dict[str, np.ndarray]) -> None:
        with self._wake:
            self._next = (digest, version, weights)  # a newer release replaces one still waiting
            self._wake.notify()

    def close(self, timeout: float | None = None, abort: bool = False) -> None:
        """Stop taking releases; finish the running export (within `timeout`), or kill it when `abort`."""
        with self._wake:
            self._closing = True
            if abort:
                self._next = None
            self._wake.notify()
            proc = self._proc
        if abort and proc is not None:
            proc.kill()
        self._thread.join(timeout)
        with self._wake:
            proc = self._proc
        if proc is not None:  # still running after `timeout`: no export outlives its gateway
            proc.kill()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._next is None and not self._closing:
                    self._wake.wait()
                if self._next is None:
                    return
                job, self._next = self._next, None
            try:
                self._export(*job)
                self.exported += 1
            except Exception as exc:  # an export is a convenience: it must never stop the gateway
                self.failed += 1
                event(log, "mcu.export_failed", logging.ERROR, model=job[0].hex()[:16], reason=str(exc))

    def _export(self, digest: bytes, version: int, weights: dict[str, np.ndarray]) -> None:
        with tempfile.TemporaryDirectory(prefix="starling-mcu-") as tmp:
            work = Path(tmp)
            buffer = io.BytesIO()
            np.savez(buffer, **weights)
            (work / "weights.npz").write_bytes(buffer.getvalue())
            proc = subprocess.Popen(
                [str(self.python), "-m", "firmware_models.cli", "export-mcu", "--model", str(self.model_dir),
                 "--weights", str(work / "weights.npz"), "--out", str(work / "out"), "--name", "model"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            with self._wake:
                self._proc = proc
            try:
                _, stderr = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise RuntimeError(f"export-mcu took more than {self.timeout_s:.0f} s") from None
            finally:
                with self._wake:
                    self._proc = None
            if proc.returncode != 0:
                raise RuntimeError(f"export-mcu exited {proc.returncode}: {stderr.strip()[-500:]}")
            summary = json.loads((work / "out" / "model_mcu.json").read_text())
            int8 = (work / "out" / "model_int8.tflite").read_bytes()
        quant = summary["quantization"]
        first_in, first_out = quant["inputs"][0], quant["outputs"][0]
        release = schemas.McuRelease(
            model=digest, version=version, digest=sha256(int8), size=len(int8),
            input_scale=first_in["scale"], input_zero_point=first_in["zero_point"],
            output_scale=first_out["scale"], output_zero_point=first_out["zero_point"],
            arena_bytes=int(summary.get("arena_bytes", 0)),
        )
        ctx = envelope.Context(self.identity.public_key, self.gateway_id, 0, "mcu", digest)
        wire = envelope.seal(self.identity, "mcu", ctx, release.to_body(), int8)
        self.publish(topics.mcu(self.gateway_id), wire, retain=True)
        event(log, "mcu.released", model=digest.hex()[:16], version=version, bytes=len(int8),
              arena_bytes=release.arena_bytes)
