"""The bodies of Starling's messages, with explicit limits.

Each message type has a frozen dataclass with `to_body()` (what goes in the
signed envelope body) and `from_body()` (which checks every field and raises
a `ProtocolError` subclass). Payloads too big to sign byte by byte (model
weights, update deltas) are envelope attachments, encoded by
`encode_update` / `encode_model` and decoded with limits by their
counterparts.

    task     gateway -> device  what to do in a round, on which model, with which config
    reply    device  -> gateway the signed result: digest of the update payload + example count
    receipt  gateway -> device  accepted or rejected (with the reason) for one reply
    model    gateway -> all     a global model, content-addressed by its digest
    delta    gateway -> all     the same model as a compact step from the release before it
    enroll   device  -> gateway a request to join, signed with the device key
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cbor
from .digest import DIGEST_BYTES
from .errors import LimitExceeded, SchemaError, _brief
from .fields import check_bytes, check_float, check_int, check_number, check_text
from .tensors import (
    DEFAULT_DENSITY,
    DEFAULT_LIMITS,
    DELTA_CODECS,
    TOPK,
    UPLOAD_CODECS,
    TensorLimits,
    check_density,
    decode_tensors,
    encode_tensors,
    index_dtype,
)

MAX_TEXT = 256
MAX_METRICS = 16
MAX_EXAMPLES = 10_000_000
MAX_UPDATE_BYTES = 2 * 1024 * 1024
MAX_MODEL_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 256 * 1024  # larger models travel in chunks of this size
MAX_CHUNKS = MAX_MODEL_BYTES // CHUNK_BYTES
TASK_KINDS = ("train", "evaluate")
# A task's upload codec and topk density: the keys of its body, and of the gateway's [training] config table
# that sets them (gateway/config.py; hw/fleet_configs.py writes them from a scenario's [training]).
CODEC, DENSITY = "codec", "density"
# How each new release travels to devices holding the one before it ([training] download): a delta in
# i8 or f16 (tensors.DELTA_CODECS), or only the full float32 model. A task names the base a delta exists
# for under DELTA_BASE.
DOWNLOAD, FULL = "download", "full"
DOWNLOADS = (*DELTA_CODECS, FULL)
DEFAULT_DOWNLOAD = "i8"
DELTA_BASE = "delta_base"
MAX_DELTA_BYTES = CHUNK_BYTES  # a delta travels in one message; a larger step goes out as the full model only


def _check_fields(doc: dict[str, Any], required: set[str], optional: frozenset[str] = frozenset()) -> None:
    if not isinstance(doc, dict):
        raise SchemaError(f"expected a map, got {type(doc).__name__}")
    missing = required - set(doc)
    unknown = set(doc) - required - optional
    if missing:
        raise SchemaError(f"missing field(s) {sorted(missing)}")
    if unknown:  # keys of any CBOR type: sort their short reprs, not the keys
        raise SchemaError(f"unknown field(s) {sorted(map(_brief, unknown))}")


SKIP_MAX = 32
SKIP_REASON = re.compile(r"[a-z_]{1,32}")
SKIP_DIGEST = bytes(32)


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise SchemaError("metrics must be a map")
    if len(value) > MAX_METRICS:
        raise LimitExceeded(f"more than {MAX_METRICS} metrics")
    out = {}
    for key in value:
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise SchemaError("metric names must be text of 1 to 64 characters")
        out[key] = check_number(value[key], key, -1e30, 1e30)
    return out


Option = int | float | str | bool
MAX_OPTIONS = 16


def _options(value: Any) -> dict[str, Option]:
    if not isinstance(value, dict):
        raise SchemaError("options must be a map")
    if len(value) > MAX_OPTIONS:
        raise LimitExceeded(f"more than {MAX_OPTIONS} options")
    out: dict[str, Option] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise SchemaError("option names must be text of 1 to 64 characters")
        if isinstance(item, str):
            out[key] = check_text(item, key, MAX_TEXT)
        elif isinstance(item, bool):
            out[key] = item
        elif isinstance(item, int):
            out[key] = check_int(item, key, -(2**53), 2**53)
        elif isinstance(item, float):
            out[key] = check_number(item, key, -1e30, 1e30)
        else:
            raise SchemaError(f"option {key!r} must be a number, text or boolean")
    return out


@dataclass(frozen=True)
class TrainConfig:
    """What the gateway asks of a device for one round.

    `options` carries whatever else the strategy put in its config record
    ("proximal-mu" for FedProx, "clipping_norm" for the client-side DP
    wrappers, ...): scalars only, at most 16.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    deadline: float = 0.0  # unix seconds; 0 means none
    options: dict[str, Option] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": float(self.lr),
            "deadline": float(self.deadline),
            "options": dict(self.options),
        }

    @classmethod
    def from_wire(cls, doc: Any) -> TrainConfig:
        if not isinstance(doc, dict):
            raise SchemaError("config must be a map")
        _check_fields(doc, {"epochs", "batch_size", "lr", "deadline", "options"})
        return cls(
            epochs=check_int(doc["epochs"], "epochs", 0, 100),
            batch_size=check_int(doc["batch_size"], "batch_size", 1, 4096),
            lr=check_number(doc["lr"], "lr", 0.0, 10.0),
            deadline=check_number(doc["deadline"], "deadline", 0.0, 1e11),
            options=_options(doc["options"]),
        )


@dataclass(frozen=True)
class Task:
    """A gateway's instruction to one device; ctx.base names the model by digest.

    `codec` is how the device must encode its update (`tensors.UPLOAD_CODECS`); with "topk" the body also
    carries `density`, the share of each tensor's entries to send, in (0, 1] (and only then: a dense
    codec's task has no density field, so its signed bytes are what they always were).
    """

    kind: str  # "train" or "evaluate"
    device: str  # the id of the device this task is for
    config: TrainConfig = field(default_factory=TrainConfig)
    codec: str = "i8"  # how the device must encode its update
    density: float = DEFAULT_DENSITY  # topk only: the share of entries sent
    delta_base: bytes = b""  # the model a delta to this task's model exists for (b"": none; only the full model)

    def to_body(self) -> dict[str, Any]:
        if self.codec not in UPLOAD_CODECS:
            raise ValueError(f"codec must be one of {UPLOAD_CODECS}, got {self.codec!r}")
        body = {"kind": self.kind, "device": self.device, "config": self.config.to_wire(), CODEC: self.codec}
        if self.codec == TOPK:
            body[DENSITY] = check_density(self.density)
        if self.delta_base:  # (absent, not empty, without one: a task's signed bytes stay what they were)
            body[DELTA_BASE] = self.delta_base
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Task:
        codec = body.get(CODEC) if isinstance(body, dict) else None
        _check_fields(body, {"kind", "device", "config", CODEC} | ({DENSITY} if codec == TOPK else set()),
                      frozenset({DELTA_BASE}))
        kind = check_text(body["kind"], "kind", MAX_TEXT)
        if kind not in TASK_KINDS:
            raise SchemaError(f"task kind {kind!r} is not one of {TASK_KINDS}")
        codec = check_text(body[CODEC], CODEC, MAX_TEXT)
        if codec not in UPLOAD_CODECS:
            raise SchemaError(f"unknown codec {codec!r}")
        density = DEFAULT_DENSITY
        if codec == TOPK:
            density = check_float(body[DENSITY], DENSITY, 0.0, 1.0)
            if not density > 0:
                raise SchemaError("density must be above 0")
        delta_base = check_bytes(body[DELTA_BASE], DELTA_BASE, DIGEST_BYTES) if DELTA_BASE in body else b""
        return cls(kind, check_text(body["device"], "device", 64), TrainConfig.from_wire(body["config"]), codec,
                   density, delta_base)


@dataclass(frozen=True)
class Reply:
    """A device's signed result. The update payload is the attachment; `digest` is its SHA-256.

    A device that sits a round out (too hot, on battery, out of budget) answers
    with `skip` = its reason, no attachment, zero examples and a zero digest, so
    the gateway knows at once instead of waiting for the deadline.
    """

    digest: bytes
    examples: int
    skip: str = ""

    def to_body(self) -> dict[str, Any]:
        body = {"digest": self.digest, "examples": self.examples}
        return {**body, "skip": self.skip} if self.skip else body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Reply:
        _check_fields(body, {"digest", "examples"}, frozenset({"skip"}))
        reply = cls(check_bytes(body["digest"], "digest", DIGEST_BYTES),
                    check_int(body["examples"], "examples", 0, MAX_EXAMPLES),
                    check_text(body["skip"], "skip", SKIP_MAX) if "skip" in body else "")
        if "skip" in body and not (SKIP_REASON.fullmatch(reply.skip) and reply.examples == 0
                                   and reply.digest == SKIP_DIGEST):
            raise SchemaError("a skip names its reason in [a-z_], with 0 examples and a zero digest")
        return reply


@dataclass(frozen=True)
class Receipt:
    """The gateway's answer to one reply: accepted, or rejected with a reason."""

    device: str
    reply: bytes  # digest of the reply's update payload (b"" when it could not be read)
    accepted: bool
    reason: str = ""

    def to_body(self) -> dict[str, Any]:
        return {"device": self.device, "reply": self.reply, "accepted": self.accepted, "reason": self.reason}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Receipt:
        _check_fields(body, {"device", "reply", "accepted", "reason"})
        if not isinstance(body["accepted"], bool):
            raise SchemaError("accepted must be a boolean")
        reply = body["reply"]
        if not isinstance(reply, bytes) or len(reply) not in (0, DIGEST_BYTES):
            raise SchemaError("reply must be empty or a digest")
        return cls(check_text(body["device"], "device", 64), reply, body["accepted"],
                   check_text(body["reason"], "reason", 64))


class NoExpiry(SchemaError):
    """A model release without an expiry (`expires` 0, which once meant "never"): refused, so that no signed
    release can be replayed for ever."""

    reason = "model_no_expiry"


@dataclass(frozen=True)
class ModelRelease:
    """A signed global model release, in the spirit of TUF targets metadata.

    `digest` is the SHA-256 of the model bytes (`encode_model`) and its
    content address. `version` only grows (devices refuse rollback), and one
    version names one digest (devices refuse a second digest under a version
    they trust). `expires` (unix seconds, always > 0: a release that never
    expires is refused as `NoExpiry`, and `to_body` will not make one) bounds
    how long a release may be acted on: devices refuse a stale one, so a
    replayed old release cannot freeze a fleet. A model of at most
    `CHUNK_BYTES` is the release's attachment (`chunks == 1`); a larger one
    travels as `chunks` retained pieces whose concatenation must hash to
    `digest`.
    """

    digest: bytes
    version: int
    architecture: str  # sha256 hex of the .tflite the weights belong to ("" for synthetic models)
    expires: float  # unix seconds, > 0: every release expires
    size: int = 0  # bytes of the model
    chunks: int = 1

    def to_body(self) -> dict[str, Any]:
        if not self.expires > 0:  # the sender's side of the rule: no gateway signs a release that never expires
            raise ValueError(f"a model release must expire (expires > 0), got {self.expires!r}")
        return {"digest": self.digest, "version": self.version, "architecture": self.architecture,
                "expires": float(self.expires), "size": self.size, "chunks": self.chunks}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ModelRelease:
        _check_fields(body, {"digest", "version", "architecture", "expires", "size", "chunks"})
        release = cls(
            check_bytes(body["digest"], "digest", DIGEST_BYTES),
            check_int(body["version"], "version", 0, 2**31 - 1),
            check_text(body["architecture"], "architecture", 64),
            check_number(body["expires"], "expires", 0.0, 1e11),
            check_int(body["size"], "size", 0, MAX_MODEL_BYTES),
            check_int(body["chunks"], "chunks", 1, MAX_CHUNKS),
        )
        if not release.expires > 0:
            raise NoExpiry("expires must be > 0: a release that never expires is refused")
        if release.chunks != max(1, -(-release.size // CHUNK_BYTES)):
            raise SchemaError(f"{release.size} bytes must travel in {max(1, -(-release.size // CHUNK_BYTES))} chunks")
        return release


@dataclass(frozen=True)
class ModelDelta:
    """A signed step from one release to the next: the compact download for a device holding `base`.

    The attachment (`encode_delta`, `size` bytes, at most `MAX_DELTA_BYTES`; `digest` is its SHA-256) is
    the dense difference `target - base` in `codec` (i8 or f16); a device rebuilds the model as
    `tensors.apply_delta(base, decode_delta(...))`, which must hash to `target`: the gateway releases
    exactly that model. `version`, `architecture` and `expires` are the target release's, and every check
    of a release applies to them (`release()`): a delta cannot carry a model its full release could not.
    """

    digest: bytes  # of the attachment (the envelope sets it)
    target: bytes  # the model it rebuilds: the release's digest
    base: bytes  # the model it applies to: the release before it
    version: int
    architecture: str
    expires: float
    size: int
    codec: str

    def to_body(self) -> dict[str, Any]:
        if not self.expires > 0:
            raise ValueError(f"a model delta must expire (expires > 0), got {self.expires!r}")
        if self.codec not in DELTA_CODECS:
            raise ValueError(f"a delta's codec must be one of {DELTA_CODECS}, got {self.codec!r}")
        return {"digest": self.digest, "target": self.target, "base": self.base, "version": self.version,
                "architecture": self.architecture, "expires": float(self.expires), "size": self.size,
                CODEC: self.codec}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ModelDelta:
        _check_fields(body, {"digest", "target", "base", "version", "architecture", "expires", "size", CODEC})
        delta = cls(
            check_bytes(body["digest"], "digest", DIGEST_BYTES),
            check_bytes(body["target"], "target", DIGEST_BYTES),
            check_bytes(body["base"], "base", DIGEST_BYTES),
            check_int(body["version"], "version", 0, 2**31 - 1),
            check_text(body["architecture"], "architecture", 64),
            check_number(body["expires"], "expires", 0.0, 1e11),
            check_int(body["size"], "size", 1, MAX_DELTA_BYTES),
            check_text(body[CODEC], CODEC, MAX_TEXT),
        )
        if not delta.expires > 0:
            raise NoExpiry("expires must be > 0: a delta that never expires is refused")
        if delta.codec not in DELTA_CODECS:
            raise SchemaError(f"a delta's codec must be one of {DELTA_CODECS}, got {delta.codec!r}")
        if delta.base == delta.target:
            raise SchemaError("a delta's base and target are the same model")
        return delta

    def release(self) -> ModelRelease:
        """The release this delta stands for, for the checks every release passes."""
        return ModelRelease(self.target, self.version, self.architecture, self.expires)


@dataclass(frozen=True)
class McuRelease:
    """A signed microcontroller export of a global model, for inference-only devices.

    The attachment is the int8 `.tflite` (TFLite Micro); `digest` is its
    SHA-256. `model` names the float release it was exported from and
    `version` is that release's version, so a device can refuse rollback as
    for models. The quantization parameters are what firmware needs to feed
    the model sensor units and read its output; `arena_bytes` is the export's
    estimate of the tensor arena.
    """

    model: bytes
    version: int
    digest: bytes
    size: int
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    arena_bytes: int

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "digest": self.digest, "size": self.size,
                "input_scale": float(self.input_scale), "input_zero_point": self.input_zero_point,
                "output_scale": float(self.output_scale), "output_zero_point": self.output_zero_point,
                "arena_bytes": self.arena_bytes}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> McuRelease:
        _check_fields(body, {"model", "version", "digest", "size", "input_scale", "input_zero_point",
                             "output_scale", "output_zero_point", "arena_bytes"})
        return cls(
            check_bytes(body["model"], "model", DIGEST_BYTES),
            check_int(body["version"], "version", 0, 2**31 - 1),
            check_bytes(body["digest"], "digest", DIGEST_BYTES),
            check_int(body["size"], "size", 1, CHUNK_BYTES),
            check_number(body["input_scale"], "input_scale", 0.0, 1e9),
            check_int(body["input_zero_point"], "input_zero_point", -128, 127),
            check_number(body["output_scale"], "output_scale", 0.0, 1e9),
            check_int(body["output_zero_point"], "output_zero_point", -128, 127),
            check_int(body["arena_bytes"], "arena_bytes", 0, 2**31 - 1),
        )


@dataclass(frozen=True)
class EnrollRequest:
    """A device asks to join a gateway; the signature proves it holds its key.

    `voucher` is an operator's signed voucher for the key (protocol.vouchers),
    needed where the gateway's policy is "voucher".
    """

    name: str
    time: float  # unix seconds when the request was made
    voucher: bytes = b""

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "time": float(self.time)}
        if self.voucher:
            body["voucher"] = self.voucher
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> EnrollRequest:
        _check_fields(body, {"name", "time"}, frozenset({"voucher"}))
        voucher = body.get("voucher", b"")
        if not isinstance(voucher, bytes) or len(voucher) > 512:
            raise SchemaError("voucher must be at most 512 bytes")
        return cls(check_text(body["name"], "name", 64), check_number(body["time"], "time", 0.0, 1e11), voucher)


# --- attachments ---------------------------------------------------------------------


def encode_update(delta: dict[str, np.ndarray], metrics: dict[str, float], codec: str = "i8",
                  density: float = DEFAULT_DENSITY) -> bytes:
    """The reply attachment: the weight delta in `codec` (topk: `density` of each tensor's entries) and the
    device's metrics."""
    return cbor.dumps({"tensors": encode_tensors(delta, codec, density),
                       "metrics": {k: float(v) for k, v in metrics.items()}})


def decode_update(
    data: bytes, limits: TensorLimits = DEFAULT_LIMITS
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Decode a reply attachment into (delta arrays, metrics), with limits."""
    doc = cbor.loads(data, max_bytes=MAX_UPDATE_BYTES)
    if not isinstance(doc, dict):
        raise SchemaError("an update must be a map")
    _check_fields(doc, {"tensors", "metrics"})
    return decode_tensors(doc["tensors"], limits), _metrics(doc["metrics"])


@dataclass(frozen=True)
class CheckedUpdate:
    """What `check_update` learned of an update: each tensor's shape, its metrics, and how each tensor was
    sent (name -> (codec, entries sent: every element but with topk))."""

    shapes: dict[str, tuple[int, ...]]
    metrics: dict[str, float]
    encodings: dict[str, tuple[str, int]]


def check_update(data: bytes, limits: TensorLimits = DEFAULT_LIMITS) -> CheckedUpdate:
    """Every check of `decode_update`, without building float arrays."""
    doc = cbor.loads(data, max_bytes=MAX_UPDATE_BYTES)
    if not isinstance(doc, dict):
        raise SchemaError("an update must be a map")
    _check_fields(doc, {"tensors", "metrics"})
    arrays = decode_tensors(doc["tensors"], limits, dequantize=False)
    encodings = {}
    for tensor in doc["tensors"]:  # (well formed: decode_tensors checked every one)
        size = math.prod(tensor["shape"])
        sent = len(tensor["index"]) // index_dtype(size).itemsize if tensor["codec"] == TOPK else size
        encodings[tensor["name"]] = (tensor["codec"], sent)
    return CheckedUpdate({k: v.shape for k, v in arrays.items()}, _metrics(doc["metrics"]), encodings)


def encode_model(weights: dict[str, np.ndarray]) -> bytes:
    """The model attachment: full float32 weights."""
    return cbor.dumps({"tensors": encode_tensors(weights, "f32")})


def decode_model(data: bytes, limits: TensorLimits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Decode a model attachment into name -> float32 arrays, with limits."""
    doc = cbor.loads(data, max_bytes=MAX_MODEL_BYTES)
    if not isinstance(doc, dict):
        raise SchemaError("a model must be a map")
    _check_fields(doc, {"tensors"})
    return decode_tensors(doc["tensors"], limits)


def encode_delta(tensors: list[dict[str, Any]]) -> bytes:
    """The delta attachment: wire tensors of one codec (tensors.delta_step)."""
    return cbor.dumps({"tensors": tensors})


def decode_delta(data: bytes, codec: str, limits: TensorLimits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Decode a delta attachment into name -> float32 step, with limits; every tensor must be in `codec`
    (the signed body's)."""
    doc = cbor.loads(data, max_bytes=MAX_DELTA_BYTES)
    if not isinstance(doc, dict):
        raise SchemaError("a delta must be a map")
    _check_fields(doc, {"tensors"})
    if isinstance(doc["tensors"], list) and any(not isinstance(t, dict) or t.get("codec") != codec
                                                for t in doc["tensors"]):
        raise SchemaError(f"every tensor of a delta must be in its codec {codec!r}")
    return decode_tensors(doc["tensors"], limits)
