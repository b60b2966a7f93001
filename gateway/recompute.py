"""Recompute a round's aggregate bit for bit from what the ledger records, and compare digests.

    params = aggregate_params(strategy, shaped, inputs)   # the gateway: what its aggregate vertex records
    weights = recompute(name, params, base, inputs)      # anyone: the same Flower code on the same contents
    verdict = verify(name, params, base, inputs, output)  # ... and its digest against the recorded one
    verdict = verify_body(body, fetch)                    # from an `aggregate` vertex body and a blob source
    (gateway/auditor.py: what `starling-ledger audit --recompute` loads)

An aggregate's digest is the SHA-256 of its encoded model (`lineage.encode`:
float32, `schemas.encode_model`), the release digest. Recomputing it needs,
besides the base model and the update bytes (content-addressed blobs):

- the strategy and its constructor parameters (FedTrimmedAvg's beta, MultiKrum's
  num_malicious_nodes and num_nodes_to_select, ...): `params.strategy`;
- the order the strategy summed in (float32 sums depend on it; the gateway hands
  Flower its replies in no fixed order, and Krum-family rules sum their selection
  in score order) and the number Flower weighed each reply by (the weight rule's
  effective example count: the recorded share w/sum(w) is exactly Flower's factor,
  but Flower normalises again, and shares need not add up to exactly 1.0):
  `params.sequence`, every aggregated reply as [input index, weight], so
  byte-identical updates from several devices (one input) are replayed once each;
- the dequantization: the gateway's own (`ingest.dequantize`), base + delta in
  float32 (`grid.train_content`), the same contents the gateway's grid builds.
- how the release was rounded for its delta download (`params.download`, "i8"
  or "f16", absent for a full release): the released model is the base plus the
  dequantized delta of the aggregate (`tensors.delta_step`), and so is the recompute.

What cannot be recomputed is refused as unverifiable, with the reason, never
called a mismatch: a mismatch is evidence against the gateway that wrote it.

    verifiable     FedAvg, FedProx (its server side is FedAvg's), FedMedian, FedTrimmedAvg,
                   Krum, MultiKrum, Bulyan (the arithmetic over the recorded selection)
    unverifiable   FedAvgM, FedAdam, FedYogi, FedAdagrad (server optimizer state: the gateway
                   journals it, the ledger does not hold it); QFedAvg (not wired: it needs each
                   reply's train loss); any DP wrapper (Gaussian noise from an unseeded
                   generator); the `[defense]` update bound (not wired); a user's strategy class;
                   aggregates recorded without params (before them, or with an input the ledger
                   refused)

Krum, MultiKrum and Bulyan: the ledger names the inputs they selected (in
the order they were summed), so a recompute checks the arithmetic of the
aggregate over that selection; whether the selection itself is what Krum
would pick needs every update of the round (its `updates` vertices) and
uses a BLAS matrix product (`flat_w @ flat_w.T`) for the distances, whose
last bits can differ between BLAS builds: near-ties may then select otherwise.

Determinism (what was measured and what is reasoned: the README, "Verifiable aggregation"). FedAvg's
sum is elementwise float32 multiply and add in a fixed order (no BLAS, no reduction tree, no FMA).
FedMedian is order-free (the middle value, or the float32 mean of the two middle ones). FedTrimmedAvg
sums the kept values in the order `np.partition` leaves them. These three gave the same bits under
numpy 1.26.4, 2.2.6 and 2.4.6, with and without AVX2 dispatch. Bulyan sums its closest values in the
order `np.argpartition` leaves them, and that order follows numpy's SIMD target (x86-simd-sort with
AVX2 gave other bits than the scalar code): a Bulyan aggregate is recomputed only under the numpy
version and SIMD target that recorded it (`params.versions`), else it is unverifiable here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol import schemas
from protocol.digest import sha256
from protocol.errors import ProtocolError
from protocol.tensors import DELTA_CODECS, delta_step

from .grid import train_content
from .ingest import dequantize
from .lineage import encode

VERIFIABLE = ("FedAvg", "FedProx", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
_SELECTING = ("Krum", "MultiKrum")  # their sum is Flower's aggregate_arrayrecords over their selection
_STATEFUL = {
    "FedAvgM": "FedAvgM keeps server momentum between rounds, which the ledger does not hold",
    "FedAdam": "FedAdam keeps server optimizer state (m_t, v_t) between rounds, which the ledger does not hold",
    "FedYogi": "FedYogi keeps server optimizer state (m_t, v_t) between rounds, which the ledger does not hold",
    "FedAdagrad": "FedAdagrad keeps server optimizer state (v_t) between rounds, which the ledger does not hold",
    "QFedAvg": "QFedAvg recompute is not wired (it needs each reply's train loss)",
}
_SCALARS = (bool, int, float, str)
_SIMD_ORDERED = ("Bulyan",)  # its sum order follows np.argpartition's SIMD code: same numpy and target only


class Unverifiable(ValueError):
    """What was recorded does not allow a bit-for-bit recompute (the message says why)."""


@dataclass(frozen=True)
class Input:
    """One reply the strategy aggregated: the update attachment as the device sent it, and the number Flower
    weighed it by (its "num-examples": the weight rule's effective count; None under a coordinate rule)."""

    update: bytes
    weight: int | float | None


@dataclass(frozen=True)
class Verdict:
    """`ok`: the recomputed digest is the recorded one. `status`: "match", "mismatch" (evidence),
    "unverifiable" (nothing recorded allows a recompute) or "missing_inputs" (a blob is not at hand)."""

    ok: bool
    expected_digest: bytes
    got_digest: bytes | None
    reason: str
    status: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "status": self.status, "expected": self.expected_digest.hex(),
                "got": self.got_digest.hex() if self.got_digest is not None else None, "reason": self.reason}


# --- what the gateway records ----------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """The software an aggregate was computed with: Flower, numpy and numpy's SIMD target here."""
    import flwr

    return {"flwr": flwr.__version__, "numpy": np.__version__, "numpy_simd": _simd()}


def _simd() -> str:
    """numpy's baseline and the dispatch targets it uses on this CPU (as NPY_DISABLE_CPU_FEATURES leaves them)."""
    try:
        from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__
        except ImportError:
            return "unknown"
    return ",".join([*__cpu_baseline__, *(f for f in __cpu_dispatch__ if __cpu_features__.get(f))])[:256]


def strategy_params(strategy: Any) -> tuple[dict[str, Any], list[str]]:
    """(the innermost strategy's scalar constructor parameters as it runs, the wrappers around it, outermost
    first). Callables (a `train_metrics_aggr_fn`) and other non-scalars are not recorded."""
    wrappers = []
    while getattr(strategy, "strategy", None) is not None and strategy.strategy is not strategy:
        wrappers.append(type(strategy).__name__)
        strategy = strategy.strategy
    params = {}
    for name in inspect.signature(type(strategy).__init__).parameters:
        value = getattr(strategy, name, None) if name != "self" else None
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, _SCALARS) and not (isinstance(value, float) and not math.isfinite(value)):
            params[name] = value
    return params, wrappers


def aggregate_params(strategy: Any, shaped: Any, inputs: list[tuple[bytes, float | None]]) -> dict[str, Any]:
    """The `params` of a round's aggregate vertex: the strategy's parameters, its wrappers, the software, and
    the sequence of aggregated replies as [index into `inputs`, weight] (`shaped`: provenance.Provenance).
    Without a sequence when a reply the strategy aggregated is not among `inputs` (its update is not on
    record): that aggregate cannot be replayed, and says so by the absence."""
    ctor, wrappers = strategy_params(strategy)
    params: dict[str, Any] = {"strategy": ctor, "versions": versions()}
    if wrappers:
        params["wrappers"] = wrappers
    index = {digest: i for i, (digest, _) in enumerate(inputs)}
    if shaped.sequence and all(digest in index for digest, _ in shaped.sequence):
        params["sequence"] = [[index[digest], weight] for digest, weight in shaped.sequence]
    return params


# --- recomputing -----------------------------------------------------------------------------------------

def unverifiable(strategy: str, params: dict[str, Any] | None) -> str | None:
    """Why an aggregate of `strategy` with these recorded `params` cannot be recomputed (None: it can)."""
    if params is None:
        return "the aggregate records no params (written before recompute params, or as its first form)"
    if params.get("wrappers"):
        return f"the strategy ran wrapped ({', '.join(params['wrappers'])}): not recomputable" + (
            " (a DP wrapper's noise comes from an unseeded generator)"
            if any("DifferentialPrivacy" in w for w in params["wrappers"]) else "")
    if strategy in _STATEFUL:
        return _STATEFUL[strategy]
    if strategy not in VERIFIABLE:
        return f"{strategy!r} is not a strategy this recompute knows ({', '.join(VERIFIABLE)})"
    if "sequence" not in params:
        return "the aggregate records no sequence (an input it aggregated is not on record)"
    if params.get(schemas.DOWNLOAD, DELTA_CODECS[0]) not in DELTA_CODECS:
        return f"the release was rounded by a download codec this recompute does not know: {params[schemas.DOWNLOAD]!r}"
    if strategy in _SIMD_ORDERED:
        recorded, here = params.get("versions", {}), versions()
        differ = [k for k in ("numpy", "numpy_simd") if recorded.get(k) != here[k]]
        if differ:
            return (f"{strategy}'s sum order follows numpy's SIMD code: recorded with "
                    f"{', '.join(f'{k} {recorded.get(k)}' for k in differ)}, here {', '.join(here[k] for k in differ)}")
    return None


def recompute(strategy: str, params: dict[str, Any], base: dict[str, np.ndarray],
              inputs: list[Input], round_: int = 1) -> dict[str, np.ndarray]:
    """The aggregate of `inputs` (in the order given: the recorded sequence) on `base`, by the same Flower
    code the gateway ran, on the same contents. Raises Unverifiable, or ProtocolError for an update that
    does not decode (the gateway never aggregates one)."""
    reason = unverifiable(strategy, params)
    if reason is not None:
        raise Unverifiable(reason)
    if not inputs:
        raise Unverifiable("no inputs")
    instance = _build(strategy, params["strategy"])
    contents = []
    for item in inputs:
        delta, metrics = dequantize(item.update)
        if set(delta) != set(base) or any(delta[k].shape != np.shape(base[k]) for k in base):
            raise ProtocolError("an update does not fit the base model")
        contents.append(train_content(base, delta, 1 if item.weight is None else item.weight, metrics))
    arrays = _aggregate(strategy, instance, params["strategy"], contents, round_)
    if arrays is None:
        raise Unverifiable(f"{strategy} made no model from these inputs")
    weights = {k: v.numpy() for k, v in arrays.items()}
    if schemas.DOWNLOAD in params:  # released as base + the delta devices download: the same rounding
        try:
            return delta_step(base, weights, params[schemas.DOWNLOAD])[1]
        except ProtocolError as exc:  # the gateway rounded this release, so its step fitted the codec there
            raise Unverifiable(f"the aggregate does not round as its release did: {exc}") from exc
    return weights


def digest_of(weights: dict[str, np.ndarray]) -> bytes:
    """A model's content address, as the gateway gives its releases (float32, schemas.encode_model)."""
    return encode(weights)[2]


def verify(strategy: str, params: dict[str, Any] | None, base: dict[str, np.ndarray], inputs: list[Input],
           output: bytes, round_: int = 1) -> Verdict:
    """Recompute and compare with the recorded `output` digest."""
    try:
        got = digest_of(recompute(strategy, params, base, inputs, round_))
    except Unverifiable as exc:
        return Verdict(False, output, None, str(exc), "unverifiable")
    except ProtocolError as exc:  # the recorded inputs cannot have made any model
        return Verdict(False, output, None, f"an input does not decode: {exc}", "mismatch")
    if got == output:
        return Verdict(True, output, got, "recomputed bit for bit", "match")
    return Verdict(False, output, got, "the recomputed model differs from the recorded output", "mismatch")


def verify_body(body: dict[str, Any], fetch: Callable[[bytes], bytes | None]) -> Verdict:
    """Verify one `aggregate` vertex body. `fetch(digest)`: the bytes of a blob (the base model, each update),
    or None when it is not at hand (a `BlobStore.get`). Blobs whose bytes do not hash to their digest count
    as missing: a bad copy is not the aggregating gateway's doing."""
    output = body["output"]
    reason = unverifiable(body["strategy"], body.get("params"))
    if reason is not None:
        return Verdict(False, output, None, reason, "unverifiable")
    params = body["params"]
    blobs: dict[bytes, bytes] = {}
    for digest in [body["base"], *(d for d, _ in body["inputs"])]:
        data = fetch(digest)
        if data is None or sha256(data) != digest:
            return Verdict(False, output, None, f"blob {digest.hex()[:16]} is not at hand", "missing_inputs")
        blobs[digest] = data
    try:
        base = schemas.decode_model(blobs[body["base"]])
    except ProtocolError as exc:
        return Verdict(False, output, None, f"the base model does not decode: {exc}", "unverifiable")
    inputs = [Input(blobs[body["inputs"][i][0]], w) for i, w in params["sequence"]]
    shares = _shares(body, params["sequence"])
    if shares is not None:
        return Verdict(False, output, None, shares, "mismatch")
    return verify(body["strategy"], params, base, inputs, output, body["round"])


def _shares(body: dict[str, Any], sequence: list[list[Any]]) -> str | None:
    """Why the recorded effective weights are not the shares the sequence gives (None: they are, exactly:
    w / sum(w), summed in the sequence's order, as gateway/provenance.py computes them)."""
    if body["rule"] == "coordinate":
        return None
    total = sum(float(w) for _, w in sequence) or 1.0
    shares: dict[int, float] = {}
    for index, weight in sequence:
        shares[index] = shares.get(index, 0.0) + float(weight) / total
    recorded = [w for _, w in body["inputs"]]
    if any(shares.get(i) != w for i, w in enumerate(recorded)):
        return "the recorded input weights are not the shares of the weights the strategy was given"
    return None


def _build(strategy: str, recorded: dict[str, Any]) -> Any:
    from flwr.serverapp import strategy as flower

    cls = getattr(flower, strategy)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(recorded) - accepted)
    if unknown:
        raise Unverifiable(f"this Flower's {strategy} takes no parameter(s) {unknown}: recorded by another version")
    try:
        return cls(**recorded)
    except (TypeError, ValueError) as exc:
        raise Unverifiable(f"{strategy} refuses the recorded parameters: {exc}") from exc


def _aggregate(strategy: str, instance: Any, recorded: dict[str, Any], contents: list[Any], round_: int):
    """Flower's own aggregation of `contents` in their order: the strategy's aggregate_train, or for the
    selecting rules the same code after their selection (the recorded one)."""
    from flwr.serverapp.strategy import Bulyan
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    if strategy in _SELECTING:  # MultiKrum.aggregate_train: select_multikrum, then exactly this
        return aggregate_arrayrecords(contents, instance.weighted_by_key)
    if strategy == "Bulyan":
        # Bulyan.aggregate_train with its selection rule answering the recorded selection: it derives theta
        # (what Krum selects) as len(replies) - 2f, so it is handed 2f stand-ins besides the selection, which
        # only that selection rule sees.
        f = instance.num_malicious_nodes
        instance = Bulyan(**{**recorded, "selection_rule": lambda _contents, _f, _theta: contents})
        stand_ins = [_stand_in(contents[0]) for _ in range(2 * f)]
        arrays, _ = instance.aggregate_train(round_, reply_messages(contents + stand_ins))
        return arrays
    arrays, _ = instance.aggregate_train(round_, reply_messages(contents))
    return arrays


def _stand_in(content: Any) -> Any:
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    arrays = next(iter(content.array_records.values()))
    return RecordDict({"arrays": ArrayRecord({k: v for k, v in arrays.items()}),
                       "metrics": MetricRecord(dict(next(iter(content.metric_records.values()))))})


def reply_messages(contents: list[Any]) -> list[Any]:
    """Flower reply messages around the contents, as the grid hands them to a strategy."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:  # a verifier outside a gateway: Flower's Message() reads this identity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    out = []
    for i, content in enumerate(contents):
        instruction = Message(RecordDict(), i + 1, "train")
        instruction.metadata.__dict__["_message_id"] = f"recompute-{i}"
        out.append(Message(content, reply_to=instruction))
    return out

