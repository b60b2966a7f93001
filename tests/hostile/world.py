"""A small, deterministic Starling world the hostile tests and the replay corpus share.

Fixed keys (from seeds), a fixed model, and builders for every real message a
receiving surface takes: replies, enrollment requests, vouchers, tasks,
receipts, model releases. Nothing here is random, so `make_corpus.py` can write
the same bytes on every run and the corpus test can rebuild the state each file
was made against.
"""

from __future__ import annotations

import numpy as np

from protocol import envelope, schemas
from protocol.digest import sha256
from protocol.keys import Identity
from protocol.vouchers import Voucher

GATEWAY = Identity.from_seed(b"G" * 32)
PEER = Identity.from_seed(b"P" * 32)  # a second member gateway of the ledger
DEVICE = Identity.from_seed(b"D" * 32)  # an honest, enrolled device
HOSTILE = Identity.from_seed(b"H" * 32)  # an enrolled device that sends garbage with real signatures
STRANGER = Identity.from_seed(b"S" * 32)  # never enrolled
REVOKED = Identity.from_seed(b"R" * 32)  # enrolled, then revoked
OPERATOR = Identity.from_seed(b"O" * 32)  # the operator whose vouchers the gateway trusts
ROGUE = Identity.from_seed(b"X" * 32)  # signs vouchers and vertices nobody trusts

SHAPES = {"w": (4, 3), "b": (3,)}
BASE_WEIGHTS = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "b": np.zeros(3, np.float32)}
MODEL_BYTES = schemas.encode_model(BASE_WEIGHTS)
BASE = sha256(MODEL_BYTES)  # the model every task builds on
ROUND = 3
TASK = "train-3-hostile"
NOW = 1_900_000_000.0  # a fixed "now" for the corpus (2030)
FAR = 4_102_444_800.0  # 2100-01-01: deadlines and expiries that never pass
PAST = 1_000_000_000.0  # 2001: deadlines that always passed
TRAIN_METRICS = {"train_loss": 0.5, "steps": 4.0}
ARCHITECTURE = "ad" * 32  # the sha256 hex of the .tflite the agent runs (it checks releases against it)


def delta(value: float = 0.25) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def reply(identity: Identity = DEVICE, *, gateway: str | None = None, round_: int = ROUND, task: str = TASK,
          base: bytes = BASE, update: bytes | None = None, examples: int = 16, body: dict | None = None) -> bytes:
    """A device's sealed reply with its update attached."""
    ctx = envelope.Context(identity.public_key, gateway or GATEWAY.id, round_, task, base)
    update = schemas.encode_update(delta(), TRAIN_METRICS) if update is None else update
    return envelope.seal(identity, "reply", ctx, {"examples": examples} if body is None else body, update)


def skip_reply(identity: Identity = DEVICE, reason: str = "cpu_hot") -> bytes:
    ctx = envelope.Context(identity.public_key, GATEWAY.id, ROUND, TASK, BASE)
    return envelope.seal(identity, "reply", ctx, schemas.Reply(schemas.SKIP_DIGEST, 0, reason).to_body())


def voucher(device: Identity, *, operator: Identity = OPERATOR, gateway: str | None = None,
            expires: float = FAR) -> bytes:
    unsigned = Voucher(device.public_key, GATEWAY.id if gateway is None else gateway, expires, operator.public_key)
    return Voucher(unsigned.device, unsigned.gateway, expires, operator.public_key,
                   operator.sign(unsigned.signed_bytes())).encode()


def enroll(identity: Identity, *, voucher_bytes: bytes = b"", gateway: str | None = None, name: str = "dev",
           when: float = NOW) -> bytes:
    ctx = envelope.Context(identity.public_key, gateway or GATEWAY.id, 0, "enroll", b"")
    return envelope.seal(identity, "enroll", ctx, schemas.EnrollRequest(name, when, voucher_bytes).to_body())


def task(device: Identity = DEVICE, *, signer: Identity = GATEWAY, gateway: str | None = None, round_: int = ROUND,
         task_id: str = TASK, base: bytes = BASE, deadline: float = FAR, kind: str = "train",
         options: dict | None = None, msg_type: str = "task") -> bytes:
    config = schemas.TrainConfig(1, 8, 0.05, deadline, options or {})
    ctx = envelope.Context(signer.public_key, gateway or GATEWAY.id, round_, task_id, base)
    return envelope.seal(signer, msg_type, ctx, schemas.Task(kind, device.id, config, "i8").to_body())


def receipt(device: Identity = DEVICE, *, digest: bytes = b"", accepted: bool = True, reason: str = "",
            round_: int = ROUND, task_id: str = TASK, signer: Identity = GATEWAY) -> bytes:
    ctx = envelope.Context(signer.public_key, GATEWAY.id, round_, task_id, BASE)
    return envelope.seal(signer, "receipt", ctx, schemas.Receipt(device.id, digest, accepted, reason).to_body())


def release(*, model: bytes = MODEL_BYTES, digest: bytes | None = None, version: int = 5, expires: float = FAR,
            architecture: str = ARCHITECTURE, signer: Identity = GATEWAY, size: int | None = None) -> bytes:
    """A signed model release carrying the model as its attachment (one chunk)."""
    digest = sha256(model) if digest is None else digest
    body = schemas.ModelRelease(digest, version, architecture, expires, len(model) if size is None else size,
                                1).to_body()
    ctx = envelope.Context(signer.public_key, GATEWAY.id, ROUND, "model", b"")
    return envelope.seal(signer, "model", ctx, body, model)
