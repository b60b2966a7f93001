"""Audit queries over a ledger store: what `starling-ledger provenance | lineage | dot` print.

    provenance(ledger, model)  the aggregates behind a model: each one's rule, its inputs with their weights
                               and devices, and the round's accepted updates it left out
    lineage(ledger, model)     the releases of a model's lineage, newest first, back to where it started
    contribution_totals(ledger, since, device)
                               per-device sums of the contribution scores (`contributions` vertices)
    to_dot(ledger, round)      the DAG (or one round's part of it) as Graphviz DOT
    recompute_plugin()         the recompute the gateway package registers (entry point), or RecomputeMissing
    recompute_audit(ledger, check, round)
                               every aggregate (or one round's) recomputed by `check`: the tally and the
                               mismatches

Each is read-only and returns plain JSON values (bytes as hex). `ledger.cli`
is the command line around them.

A lineage is a chain of model digests: every `aggregate` vertex names the
model it started from (`base`) and the one it made (`output`); a `lineage`
vertex names the first model of a chain (the factory weights at first start,
an operator's `reset-model`, a change of model family). `lineage` walks from
a model to the aggregate that produced it, then to the one that produced its
base, and so on, until it reaches a lineage vertex (complete) or a digest
nothing on the ledger explains (a gap: the chain is broken there).

How the walk chooses, at each digest it reaches as the base of a release:

- A lineage vertex that names the digest and comes before that release in
  the canonical order ends the walk there, even if an aggregate also made
  that digest: an operator may restart a lineage at an older release (a
  rollback), and the releases after it belong to the new lineage. The latest
  such vertex wins, preferring ones by the release's own gateway: gateways
  that share factory weights each start a lineage at the same digest, and a
  reset to the factory weights starts another one at it.
- Else the first aggregate (canonical order) whose output is the digest is
  the next release: gateways that compute the same merge all record it.
- Else a lineage vertex written after the release based on it (recorded
  late) still ends the walk.
- Else the walk stops at a gap. A digest that comes back (a cycle, which
  only a forged or self-contradicting ledger holds) is a gap too.

What shaped a model (`provenance`): an aggregate of the current form names
its rule ("weighted", "selected", "coordinate") and each input's effective
weight; the first form named its inputs only (rule and weights null). The
round's accepted updates that did not shape it are the ones its gateway
recorded for that round and base (`updates` vertices by the aggregate's
creator) that are not among its inputs: what a selecting rule (Krum) left
out, or an update the ledger refused to name. An auditor sees there that a
robust rule kept an attacker's update out of the model.

A store that bootstrapped from a checkpoint holds no bytes for the vertices
before that checkpoint, so a walk that reaches back past it ends in a gap
there; a gateway that holds the whole history answers in full.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple

from protocol.keys import identity_id

from .kinds import AGGREGATE, CITY, CONTRIBUTIONS, LINEAGE, UPDATES, input_weights
from .store import Ledger
from .vertex import Vertex


class NoAnswer(Exception):
    """The query has nothing to answer with (no aggregate produced the model); the message is one line."""


# --- provenance -----------------------------------------------------------------------


def provenance(ledger: Ledger, model: bytes) -> dict[str, Any]:
    """The chain of aggregates that produced `model`: each with its rule, its inputs (their weights, and the
    devices whose records they are), the round's accepted updates it left out, and its contribution scores.

    Walks back from the aggregate whose output is `model` through the aggregate whose output
    was its base, until a base no aggregate produced (the initial model, published at genesis time).
    Each aggregate: {"aggregate", "round", "strategy", "rule", "gateway", "base", "output", "inputs",
    "left_out", "scores"}; an input is {"update", "weight", "records": [{"device", "updates_vertex",
    "round"}]}; a left-out update is {"update", "device", "updates_vertex"}; a score is {"device",
    "update", "score"} (none if the round was not scored on the ledger).
    """
    aggregates = {v.body["output"]: v for v in ledger.vertices_of(AGGREGATE)}
    if model not in aggregates:
        raise NoAnswer(f"no aggregate in {ledger.path} produced model {model.hex()}")
    chain_vertices, current = [], model
    while current in aggregates and len(chain_vertices) <= len(aggregates):
        chain_vertices.append(aggregates[current])
        current = aggregates[current].body["base"]
    wanted = {(v.creator_id, v.body["round"], v.body["base"]) for v in chain_vertices}
    records, batches = _update_records(ledger, wanted)
    scores = _scores(ledger, {(v.body["round"], v.body["output"]) for v in chain_vertices})
    chain, devices, left_devices = [], set(), set()
    for vertex in chain_vertices:
        body = vertex.body
        inputs, named = [], set()
        for digest, weight in input_weights(body):
            named.add(digest)
            found = records.get(digest, [])
            devices.update(identity_id(d) for d, _, _ in found)
            inputs.append({"update": digest.hex(), "weight": weight,
                           "records": [{"device": identity_id(d), "updates_vertex": u.hex(), "round": r}
                                       for d, u, r in found]})
        left_out = []
        for device, digest, updates_vertex in batches.get((vertex.creator_id, body["round"], body["base"]), []):
            if digest not in named:
                left_devices.add(identity_id(device))
                left_out.append({"update": digest.hex(), "device": identity_id(device),
                                 "updates_vertex": updates_vertex.hex()})
        chain.append({"aggregate": vertex.id_hex, "round": body["round"], "strategy": body["strategy"],
                      "rule": body.get("rule"), "gateway": vertex.creator_id, "base": body["base"].hex(),
                      "output": body["output"].hex(), "inputs": inputs, "left_out": left_out,
                      "scores": scores.get((body["round"], body["output"]), [])})
    genesis = next(ledger.vertices())
    return {"model": model.hex(), "aggregates": chain, "initial_model": current.hex(),
            "devices": sorted(devices), "updates": sum(len(a["inputs"]) for a in chain),
            "left_out_devices": sorted(left_devices), "left_out": sum(len(a["left_out"]) for a in chain),
            "genesis": genesis.id_hex}


def _update_records(
    ledger: Ledger, wanted: set[tuple[str, int, bytes]]
) -> tuple[dict[bytes, list[tuple[bytes, bytes, int]]], dict[tuple[str, int, bytes], list[tuple[bytes, bytes, bytes]]]]:
    """One pass over the updates vertices: update digest -> [(device key, updates vertex id, round)], and for
    each (gateway id, round, base) in `wanted` the records that gateway made: [(device key, digest, vertex id)]."""
    records: dict[bytes, list[tuple[bytes, bytes, int]]] = {}
    batches: dict[tuple[str, int, bytes], list[tuple[bytes, bytes, bytes]]] = {}
    for vertex in ledger.vertices_of(UPDATES):
        body = vertex.body
        key = (vertex.creator_id, body["round"], body["base"])
        batch = batches.setdefault(key, []) if key in wanted else None
        for device, digest, _, _ in body["records"]:
            records.setdefault(digest, []).append((device, vertex.id, body["round"]))
            if batch is not None:
                batch.append((device, digest, vertex.id))
    return records, batches


def _scores(ledger: Ledger, wanted: set[tuple[int, bytes]]) -> dict[tuple[int, bytes], list[dict[str, Any]]]:
    """(round, model) in `wanted` -> its contribution scores, each (device, update) once (the first)."""
    found: dict[tuple[int, bytes], list[dict[str, Any]]] = {}
    seen: set[tuple[int, bytes, bytes, bytes]] = set()
    for vertex in ledger.vertices_of(CONTRIBUTIONS):
        key = (vertex.body["round"], vertex.body["model"])
        if key not in wanted:
            continue
        for device, digest, score in vertex.body["scores"]:
            if (*key, device, digest) not in seen:
                seen.add((*key, device, digest))
                found.setdefault(key, []).append({"device": identity_id(device), "update": digest.hex(),
                                                  "score": score})
    return found


# --- contribution totals ----------------------------------------------------------------


def contribution_totals(ledger: Ledger, since: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Per-device totals of the contribution scores on the ledger: the basis of attribution and rewards.

    {"devices": [{"device", "public_key", "total", "rounds", "mean"}, ...] by total, highest first (ties
    by device id), "rounds": the round models scored, "vertices": the contributions vertices read, "since",
    "device"}. `rounds` of a device is the number of round models (round, model) it has a score for and
    `mean` its total over them. `since`: rounds from this one on; `device`: only this device (its id or
    public key, hex). A score written twice for the same round model, device and update counts once.
    """
    totals: dict[bytes, list[Any]] = {}  # device key -> [total, {(round, model)}]
    seen: set[tuple[int, bytes, bytes, bytes]] = set()
    round_models: set[tuple[int, bytes]] = set()
    read = 0
    for vertex in ledger.vertices_of(CONTRIBUTIONS):
        round_, model = vertex.body["round"], vertex.body["model"]
        if since is not None and round_ < since:
            continue
        read += 1
        for key, digest, score in vertex.body["scores"]:
            if device is not None and device not in (key.hex(), identity_id(key)):
                continue
            if (round_, model, key, digest) in seen:
                continue
            seen.add((round_, model, key, digest))
            round_models.add((round_, model))
            entry = totals.setdefault(key, [0.0, set()])
            entry[0] += score
            entry[1].add((round_, model))
    rows = [{"device": identity_id(key), "public_key": key.hex(), "total": total, "rounds": len(scored),
             "mean": total / len(scored)} for key, (total, scored) in totals.items()]
    rows.sort(key=lambda row: (-row["total"], row["device"]))
    return {"devices": rows, "rounds": len(round_models), "vertices": read, "since": since, "device": device}


# --- lineage --------------------------------------------------------------------------


class _Seen(NamedTuple):
    """What the walk keeps of one aggregate or lineage vertex.

    Not the vertex itself: 100,000 aggregates of thousands of inputs each would not fit in
    memory, and the walk needs only the count of inputs.
    """

    position: int  # in the canonical order of the vertices read
    vertex: bytes
    creator: bytes
    time: float
    body: dict[str, Any]  # the lineage body, or the aggregate's without its inputs


def lineage(ledger: Ledger, model: bytes) -> dict[str, Any]:
    """The releases of `model`'s lineage, newest first, ending at the lineage's first model.

    {"model", "complete", "releases", "length", "gap"}: each release is {"model", "base",
    "round", "strategy", "inputs" (count), "time", "gateway", "vertex"}; the last one, when
    the walk is complete, is the lineage's first model, with "base" and "strategy" null,
    "round" and "inputs" 0, and the lineage vertex's "reason", "version" and "previous".
    `gap` is null, or {"model": the digest nothing explained, "after": the release whose base
    it is, null if it is `model` itself}. One pass over the aggregate and lineage vertices
    (the module docstring says how the walk chooses), then the walk.
    """
    produced: dict[bytes, _Seen] = {}  # output -> the canonically first aggregate that made it
    starts: dict[bytes, list[_Seen]] = {}  # model -> the lineage vertices that start at it, in order
    for position, vertex in enumerate(ledger.vertices_of(AGGREGATE, LINEAGE)):
        body = vertex.body
        if vertex.kind == LINEAGE:
            seen = _Seen(position, vertex.id, vertex.creator, vertex.time, body)
            starts.setdefault(body["model"], []).append(seen)
        elif body["output"] not in produced:
            kept = {"base": body["base"], "round": body["round"], "strategy": body["strategy"],
                    "inputs": len(body["inputs"])}
            produced[body["output"]] = _Seen(position, vertex.id, vertex.creator, vertex.time, kept)

    releases: list[dict[str, Any]] = []
    visited: set[bytes] = set()
    current, after = model, None  # after: the release whose base `current` is
    while True:
        if current in visited:  # a cycle: stop, naming the digest that came back
            break
        visited.add(current)
        candidates = starts.get(current, [])
        start = _start_before(candidates, after)
        if start is None and current not in produced and candidates:
            start = candidates[-1]  # recorded after the release based on it, but it says where it started
        if start is not None:
            releases.append(_root_json(start))
            return _lineage_json(model, releases, None)
        made = produced.get(current)
        if made is None:
            break
        releases.append(_release_json(current, made))
        current, after = made.body["base"], made
    gap = {"model": current.hex(), "after": None if after is None else releases[-1]["model"]}
    return _lineage_json(model, releases, gap)


def _start_before(candidates: list[_Seen], release: _Seen | None) -> _Seen | None:
    """The lineage vertex that started the chain `release` is based on: the latest one before it,
    by the release's own gateway if it wrote one."""
    if release is None:  # the model asked about: any lineage start at it
        return candidates[-1] if candidates else None
    before = [c for c in candidates if c.position < release.position]
    own = [c for c in before if c.creator == release.creator]
    return (own or before or [None])[-1]


def _release_json(output: bytes, made: _Seen) -> dict[str, Any]:
    body = made.body
    return {"model": output.hex(), "base": body["base"].hex(), "round": body["round"],
            "strategy": body["strategy"], "inputs": body["inputs"], "time": made.time,
            "gateway": identity_id(made.creator), "vertex": made.vertex.hex()}


def _root_json(start: _Seen) -> dict[str, Any]:
    body = start.body
    return {"model": body["model"].hex(), "base": None, "round": 0, "strategy": None, "inputs": 0,
            "time": start.time, "gateway": identity_id(start.creator), "vertex": start.vertex.hex(),
            "reason": body["reason"], "version": body["version"],
            "previous": body["previous"].hex() if body["previous"] else None}


def _lineage_json(
    model: bytes, releases: list[dict[str, Any]], gap: dict[str, Any] | None
) -> dict[str, Any]:
    return {"model": model.hex(), "complete": gap is None, "releases": releases, "length": len(releases),
            "gap": gap}


def broken_because(result: dict[str, Any]) -> str | None:
    """Why a `lineage` result is incomplete, in one line (None if it is complete)."""
    gap = result["gap"]
    if gap is None:
        return None
    where = "the model asked about" if gap["after"] is None else f"the base of {gap['after']}"
    if any(release["model"] == gap["model"] for release in result["releases"]):
        return f"model {gap['model']} comes back in its own lineage (a cycle: {where})"
    return f"no aggregate or lineage vertex produced model {gap['model']} ({where})"


# --- the DAG as a picture ---------------------------------------------------------------


def to_dot(ledger: Ledger, round_: int | None) -> str:
    """Graphviz DOT of the DAG, or of one round's vertices (and the parents they name, dashed)."""
    vertices = list(ledger.vertices())
    if round_ is not None:
        chosen = {v.id for v in vertices if v.body.get("round") == round_}
        context = {p for v in vertices if v.id in chosen for p in v.parents} - chosen
    else:
        chosen, context = {v.id for v in vertices}, set()
    lines = ["digraph ledger {", "  rankdir=BT;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for v in vertices:
        if v.id in chosen or v.id in context:
            label = f"{v.kind}\\n{v.id_hex[:12]}\\n{v.creator_id[:8]} #{v.seq}"
            if "round" in v.body:
                label += f"\\nround {v.body['round']}"
            style = ', style="dashed"' if v.id in context else ""
            lines.append(f'  "{v.id_hex[:12]}" [label="{label}"{style}];')
    for v in vertices:
        if v.id in chosen:
            lines.extend(f'  "{v.id_hex[:12]}" -> "{p.hex()[:12]}";' for p in v.parents if p in chosen or p in context)
    lines.append("}")
    return "\n".join(lines)


# --- recomputing the aggregates -----------------------------------------------------------


RECOMPUTE_GROUP = "starling.recompute"  # the entry point group the gateway package registers in (pyproject.toml)
RECOMPUTE_NAME = "aggregate"
VERDICTS = ("match", "mismatch", "missing_inputs", "unverifiable")
Check = Callable[[dict[str, Any]], dict[str, Any]]


class RecomputeMissing(Exception):
    """No recompute is installed (a ledger-only install); the message is one line."""


def recompute_plugin() -> Callable[[str], Check]:
    """The recompute factory the gateway package registers (entry point "aggregate" in the group
    "starling.recompute": `gateway.auditor.Auditor`), loaded only when asked for. This package may import
    neither the gateway nor Flower (the layout table), so the recompute, which is Flower's own aggregation,
    plugs in from above: `factory(blob_folders, broker, holders)` returns `check(aggregate or city body) ->
    {"status", "expected", "got", "reason"}`, status one of VERDICTS, with a `close()`. RecomputeMissing when
    it is not installed or does not load."""
    found = [ep for ep in metadata.entry_points(group=RECOMPUTE_GROUP) if ep.name == RECOMPUTE_NAME]
    if not found:
        raise RecomputeMissing(f"{_HINT}: no {RECOMPUTE_GROUP!r} entry point named {RECOMPUTE_NAME!r} is installed")
    try:
        return found[0].load()
    except ImportError as exc:  # the entry point is there (same distribution) but what it imports is not
        raise RecomputeMissing(f"{_HINT}: {found[0].value} does not load: {exc}") from exc


_HINT = "--recompute needs the gateway extra (pip install 'starling[gateway]')"


def recompute_audit(ledger: Ledger, make_check: Callable[[], Check], round_: int | None = None) -> dict[str, Any]:
    """Recompute every `aggregate` vertex (or those of one round) and every `city` vertex (a city epoch's
    merge; none with a round given) with the check `make_check()` returns (made after the vertices are read: a
    blob store opened then holds at least what they name, unless pruned).

    "checked" counts the vertices recomputed (matched or not), "mismatches" lists the ones whose recomputed
    digest is not the recorded output (evidence against the gateway that signed it), "missing_inputs" the ones
    a blob is not at hand for (pruned, never kept here, or a copy whose bytes do not hash to its digest: a
    damaged or altered file is not the signer's doing), "unverifiable" the ones nothing recorded allows a
    recompute of (a stateful or wrapped strategy, no params: the reasons are counted). The same counts per
    creator gateway under "gateways"; "aggregates" and "cities" count the vertices of each kind, "epochs" the
    city epochs whose merge matched."""
    vertices = [v for v in ledger.vertices_of(AGGREGATE) if round_ is None or v.body.get("round") == round_]
    if round_ is None:
        vertices += list(ledger.vertices_of(CITY))
    try:
        check = make_check()
    except ImportError as exc:  # Flower is not installed: nothing can be recomputed here
        raise RecomputeMissing(f"{_HINT}: {exc}") from exc
    tally = {status: 0 for status in VERDICTS}
    mismatches: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    gateways: dict[str, dict[str, int]] = {}
    epochs: set[int] = set()
    try:
        for vertex in vertices:
            status, verdict = _recompute_one(check, vertex)
            tally[status] += 1
            counts = gateways.setdefault(vertex.creator_id, {"aggregates": 0, "cities": 0, "checked": 0,
                                                              "mismatches": 0, "missing_inputs": 0,
                                                              "unverifiable": 0})
            counts["cities" if vertex.kind == CITY else "aggregates"] += 1
            if status in ("match", "mismatch"):
                counts["checked"] += 1
            if status == "match" and vertex.kind == CITY:
                epochs.add(vertex.body["epoch"])
            if status == "mismatch":
                counts["mismatches"] += 1
                where = {"epoch": vertex.body["epoch"]} if vertex.kind == CITY else {
                    "round": vertex.body["round"], "strategy": vertex.body["strategy"]}
                mismatches.append({"vertex": vertex.id_hex, "kind": vertex.kind, "gateway": vertex.creator_id,
                                   **where, "expected": vertex.body["output"].hex(), "got": verdict.get("got"),
                                   "reason": verdict.get("reason")})
            elif status != "match":
                counts[status] += 1
            if status == "unverifiable":
                reason = str(verdict.get("reason"))
                reasons[reason] = reasons.get(reason, 0) + 1
    finally:
        close = getattr(check, "close", None)
        if close is not None:
            close()
    cities = sum(1 for v in vertices if v.kind == CITY)
    return {"round": round_, "aggregates": len(vertices) - cities, "cities": cities, "epochs": sorted(epochs),
            "checked": tally["match"] + tally["mismatch"], "matched": tally["match"], "mismatches": mismatches,
            "missing_inputs": tally["missing_inputs"], "unverifiable": tally["unverifiable"],
            "unverifiable_reasons": reasons, "gateways": gateways}


def _recompute_one(check: Check, vertex: Vertex) -> tuple[str, dict[str, Any]]:
    try:
        verdict = check(vertex.body)
    except ImportError as exc:  # a part of Flower the recompute needs is missing: not the gateway's doing
        raise RecomputeMissing(f"{_HINT}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a recompute that fails is no evidence: say so, go on
        verdict = {"status": "unverifiable", "reason": f"the recompute raised {type(exc).__name__}: {exc}"}
    status = verdict.get("status")
    if status not in VERDICTS:
        return "unverifiable", {"status": "unverifiable", "reason": f"the recompute answered {status!r}"}
    return status, verdict
