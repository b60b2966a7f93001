"""The city tier in the emulator's report: every city model evaluated on every device of the city.

    report["city"] = city_of_run(scenario, gateways, devices, gateway_of, say)   # hw/emulate.py after a run
    # which is:
    evaluator = Evaluator(scenario.model, [(device, gateway, replay_file), ...])   # the devices' own evaluation
    report["city"] = city_section(scenario, members, results, evaluator, say)
    report["final_accuracy"] = final_accuracy(report)                              # hw/run_report.py
    attack = gateway_attack(adversary, members, results)                           # a gateway attack's entry

With `[city]` (the tier on) the section is made of each gateway's
result.json `city` and the city models in its blob store
(`<state_dir>/blobs`, read-only), each evaluated on the test windows of
every device in the city (all gateways' devices):

    tier, every, rule, deadline_s, audit_share      the tier as configured
    epochs [{epoch, round,
             digests {gw: hex}                     each gateway's city model of the epoch
             agreed                                 every gateway recorded the epoch, with one digest
             inputs [{gateway, model, weight}]      the offers merged (as the gateways holding the
             left_out [{gateway, reason}]           most common digest recorded them)
             seconds {gw: s}
             accuracy, loss, by_gateway {gw: acc}   that model on every device; on each gateway's devices
             models {hex: {gateways, accuracy}}}]   only when the gateways' digests differ
    final_digests {gw: hex}                         each gateway's last city model
    final_accuracy, final_by_gateway                ... on every device (the mean over the gateways'
                                                    final city models when they differ)
    flagged {gw: {accusers [gw], kind, reason, vertex, seen_by [gw]}}
                                                    mismatch evidence on the ledger: whose aggregates or
                                                    merges failed a peer's recompute, and who wrote it
    alone {gw: n}                                   epochs a gateway merged nothing (no other offer at hand:
                                                    a partition); such an epoch has no record at that gateway
    audits {checked, match, mismatch, unverifiable, missing_inputs, by_gateway {gw: {...}}}
    devices, windows                                what the accuracy is over

Without the tier but with several gateways (`isolated`): `isolated_accuracy`
{gw: accuracy of its final model (`<state_dir>/model.npz`) on every device
of the city}, `isolated_mean`, `isolated_by_gateway`. One gateway: no
section (its own evaluation already covers every device).

An accuracy is the devices' own figure: `agent.learner.evaluate` with the
model's TFLite graph (`TrainableModel`) on each device's replay file, weighted
by its test windows, i.e. the accuracy over the union of the test windows.
The synthetic training profile has no test windows: accuracies are None.
A model that no blob store holds any more is reported in `missing_models`.

A gateway attack (`tampered_aggregate`) gets its `attacks` entry here too:
`target`, `scale`, `flagged_by` (the accusers in the ledger's mismatch
evidence), `left_out` {peer: [{epoch, reason}]} and `as_expected` (every
other gateway's last city epoch left the target out as "flagged").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .adversary_tables import Adversary
from .scenario import Scenario

AUDIT_KEYS = ("checked", "match", "mismatch", "unverifiable", "missing_inputs")


@dataclass(frozen=True)
class Member:
    """A gateway of the run as the report knows it: its name, its id (as result.json names it), its state folder."""

    name: str
    id: str
    home: Path


# --- evaluation ----------------------------------------------------------------------------------------------

class Evaluator:
    """Any weights on every device's local test windows, as the devices evaluate (agent.learner.evaluate)."""

    def __init__(self, model: str, devices: list[tuple[str, str, Path]]) -> None:
        """`model`: a model of the zoo by name, or a built model's folder (agent/model_source.py); `devices`: (device,
        gateway, replay file)."""
        from agent.model_source import load_model
        from agent.samples import load_replay

        manifest, self.model = load_model(model)
        self.devices = [(name, gateway, load_replay(Path(path), tuple(manifest["input_shape"])))
                        for name, gateway, path in devices]
        self.windows = sum(len(data.y_test) for _, _, data in self.devices)

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, Any]:
        """{accuracy, loss, windows, by_gateway {gw: accuracy}}: windows-weighted over the devices. A model without
        accuracy (a reconstruction model) gets None for it and its loss (the reconstruction error)."""
        from agent.learner import evaluate

        totals: dict[str, list[float]] = {}  # gateway -> [correct, loss sum, windows]
        for _, gateway, data in self.devices:
            if not len(data.y_test):
                continue
            metrics = evaluate(self.model, weights, data).metrics
            n = len(data.y_test)
            t = totals.setdefault(gateway, [0.0, 0.0, 0.0])
            t[0] += metrics.get("accuracy", 0.0) * n
            t[1] += metrics["loss"] * n
            t[2] += n
        windows = sum(t[2] for t in totals.values())
        if not windows:
            return {"accuracy": None, "loss": None, "windows": 0, "by_gateway": {}}
        scored = self.model.task == "classification"
        return {"accuracy": round(sum(t[0] for t in totals.values()) / windows, 4) if scored else None,
                "loss": round(sum(t[1] for t in totals.values()) / windows, 4), "windows": int(windows),
                "by_gateway": {gw: round(t[0] / t[2], 4) for gw, t in totals.items()} if scored else {}}


class _Models:
    """City models by digest from the gateways' blob stores (read-only), each evaluated once."""

    def __init__(self, members: list[Member], evaluator: Evaluator | None) -> None:
        self.members, self.evaluator = members, evaluator
        self.results: dict[str, dict[str, Any] | None] = {}
        self.missing: list[str] = []

    def weights(self, digest: str, first: str | None = None) -> dict[str, np.ndarray] | None:
        """The model `digest` (hex) from `first`'s blob store, else from any other gateway's; None if none has it."""
        from gateway.blobs import BlobStore
        from protocol.schemas import decode_model

        try:
            key = bytes.fromhex(digest)
        except (TypeError, ValueError):
            return None
        for m in sorted(self.members, key=lambda m: m.name != first):
            try:
                data = BlobStore(m.home / "blobs", read_only=True).get(key)
            except FileNotFoundError:
                continue
            if data is not None:
                return decode_model(data)
        return None

    def evaluate(self, digest: str | None, first: str | None = None) -> dict[str, Any] | None:
        """The model's evaluation; None without an evaluator, or when no store holds the model."""
        if not digest or self.evaluator is None:
            return None
        if digest not in self.results:
            weights = self.weights(digest, first)
            if weights is None:
                self.missing.append(digest)
            self.results[digest] = None if weights is None else self.evaluator.evaluate(weights)
        return self.results[digest]


# --- the section -----------------------------------------------------------------------------------------------

def city_section(scenario: Scenario, members: list[Member], results: dict[str, dict[str, Any]],
                 evaluator: Evaluator | None, say: Callable[[str], None] = lambda _: None) -> dict[str, Any] | None:
    """The report's `city` (see the module doc); None for a one-gateway run."""
    if len(members) < 2:
        return None
    base: dict[str, Any] = {"tier": bool(scenario.city), "devices": len(evaluator.devices) if evaluator else None,
                            "windows": evaluator.windows if evaluator else None}
    if evaluator is None:
        base["note"] = f"training.model = {scenario.model!r}: no test windows to evaluate city models on"
    models = _Models(members, evaluator)
    section = {**base, **(_tier(scenario, members, results, models, say) if scenario.city
                          else _isolated(members, results, models, say))}
    if models.missing:
        section["missing_models"] = sorted(set(models.missing))
    return section


def _names(members: list[Member]) -> Callable[[Any], Any]:
    by_id = {m.id: m.name for m in members}
    return lambda gateway_id: by_id.get(gateway_id, gateway_id)


def _tier(scenario: Scenario, members: list[Member], results: dict[str, dict[str, Any]], models: _Models,
          say: Callable[[str], None]) -> dict[str, Any]:
    cities = {m.name: c for m in members if isinstance(c := (results.get(m.name) or {}).get("city"), dict)}
    out: dict[str, Any] = {**scenario.city, "epochs": [], "final_digests": {}, "final_accuracy": None,
                           "final_by_gateway": {}, "flagged": _flagged(members, cities), "audits": _audits(cities),
                           "alone": {gw: c["alone"] for gw, c in cities.items() if isinstance(c.get("alone"), int)}}
    if not cities:
        out["problem"] = "no gateway's result.json has a city section (does the gateway know the [city] table?)"
        return out
    name = _names(members)
    views: dict[int, dict[str, dict[str, Any]]] = {}  # epoch -> gateway -> its record
    for m in members:
        for record in cities.get(m.name, {}).get("epochs") or []:
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                views.setdefault(record["epoch"], {})[m.name] = record
    for number in sorted(views):
        entry = _epoch(number, views[number], len(members), name, models)
        out["epochs"].append(entry)
        distinct, held = len(set(entry["digests"].values())), len(entry["digests"])
        say(f"starling-emulate: city epoch {number} (round {entry['round']}): "
            + ("one model" if distinct == 1 else f"{distinct} models")
            + (" at every gateway" if held == len(members) else f" at {held} of {len(members)} gateways")
            + f", {len(entry['inputs'])} inputs"
            + (f", left out {', '.join(str(x['gateway']) for x in entry['left_out'])}" if entry["left_out"] else "")
            + f", accuracy on all devices {_fmt(entry['accuracy'])}")
    finals = {}
    for m in members:
        records = [r for r in cities.get(m.name, {}).get("epochs") or [] if isinstance(r, dict) and r.get("model")]
        if records:
            finals[m.name] = max(records, key=lambda r: r.get("epoch", 0))["model"]
    out["final_digests"] = finals
    evaluated = [e for d in finals.values() if (e := models.evaluate(d)) is not None and e["accuracy"] is not None]
    if evaluated and len(evaluated) == len(finals):
        out["final_accuracy"] = round(sum(e["accuracy"] for e in evaluated) / len(evaluated), 4)
        gateways = sorted({gw for e in evaluated for gw in e["by_gateway"]})
        out["final_by_gateway"] = {gw: round(sum(e["by_gateway"].get(gw, 0.0) for e in evaluated) / len(evaluated), 4)
                                   for gw in gateways}
    return out


def _epoch(number: int, views: dict[str, dict[str, Any]], members: int, name: Callable[[Any], Any],
           models: _Models) -> dict[str, Any]:
    digests = {gw: v.get("model") for gw, v in views.items()}
    common = Counter(d for d in digests.values() if d).most_common(1)
    digest = common[0][0] if common else None
    first = next((gw for gw, d in digests.items() if d == digest), next(iter(views)))
    view = views[first]
    evaluation = models.evaluate(digest, first) or {}
    entry: dict[str, Any] = {
        "epoch": number,
        "round": view.get("round"),
        "digests": digests,
        "agreed": len(views) == members and len(set(digests.values())) == 1 and digest is not None,
        "inputs": [{**i, "gateway": name(i.get("gateway"))} for i in view.get("inputs") or [] if isinstance(i, dict)],
        "left_out": [{**x, "gateway": name(x.get("gateway"))} for x in view.get("left_out") or []
                     if isinstance(x, dict)],
        "seconds": {gw: v.get("seconds") for gw, v in views.items()},
        "accuracy": evaluation.get("accuracy"),
        "loss": evaluation.get("loss"),
        "by_gateway": evaluation.get("by_gateway", {}),
    }
    if len({d for d in digests.values()}) > 1:
        entry["models"] = {d: {"gateways": sorted(gw for gw, x in digests.items() if x == d),
                               "accuracy": (models.evaluate(d) or {}).get("accuracy")}
                           for d in sorted({d for d in digests.values() if d})}
    return entry


def _flagged(members: list[Member], cities: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Gateway -> the mismatch evidence against it (the ledger's, so every gateway sees it): who wrote it
    (`accusers`), its kind, reason and vertex (the newest a gateway knows), and which gateways' results list it."""
    name = _names(members)
    out: dict[str, dict[str, Any]] = {}
    for m in members:
        for target, evidence in (cities.get(m.name, {}).get("flagged") or {}).items():
            evidence = evidence if isinstance(evidence, dict) else {}
            entry = out.setdefault(name(target), {"accusers": [], "seen_by": []})
            entry.update({k: evidence[k] for k in ("kind", "reason", "vertex") if evidence.get(k) is not None})
            accusers = [name(a) for a in evidence.get("accusers") or []]
            entry["accusers"] = sorted(set(entry["accusers"]) | set(map(str, accusers)))
            entry["seen_by"].append(m.name)
    return out


def _audits(cities: dict[str, dict[str, Any]]) -> dict[str, Any]:
    by_gateway = {gw: {k: int(v) for k, v in (c.get("audits") or {}).items() if k in AUDIT_KEYS and isinstance(v, int)}
                  for gw, c in cities.items()}
    return {**{k: sum(a.get(k, 0) for a in by_gateway.values()) for k in AUDIT_KEYS}, "by_gateway": by_gateway}


def _isolated(members: list[Member], results: dict[str, dict[str, Any]], models: _Models,
              say: Callable[[str], None]) -> dict[str, Any]:
    """Each gateway's final model (model.npz) on every device of the city."""
    accuracy, by_gateway, digests = {}, {}, {}
    for m in members:
        digests[m.name] = ((results.get(m.name) or {}).get("model") or {}).get("digest")
        path = m.home / "model.npz"
        evaluation = None
        if models.evaluator is not None and path.is_file():
            with np.load(path, allow_pickle=False) as npz:
                evaluation = models.evaluator.evaluate({k: npz[k] for k in npz.files})
        accuracy[m.name] = evaluation["accuracy"] if evaluation else None
        by_gateway[m.name] = evaluation["by_gateway"] if evaluation else {}
        if models.evaluator is not None:
            say(f"starling-emulate: {m.name}'s final model on all devices: accuracy {_fmt(accuracy[m.name])}")
    known = [a for a in accuracy.values() if a is not None]
    mean = round(sum(known) / len(known), 4) if known and len(known) == len(accuracy) else None
    return {"isolated_accuracy": accuracy, "isolated_mean": mean, "isolated_by_gateway": by_gateway,
            "models": digests}


# --- helpers for the emulator and the rest of the report ------------------------------------------------------

def city_of_run(scenario: Scenario, gateways: list[Any], devices: list[tuple[str, Path]], gateway_of: dict[str, str],
                say: Callable[[str], None]) -> dict[str, Any] | None:
    """The emulator's `city` after a run: `gateways` (its GatewayRun handles), `devices` (name, replay file) and
    each device's gateway name. Never raises: a failure is the section's `error`."""
    members = members_of(gateways)
    try:
        evaluator = None
        if scenario.model != "synthetic":
            say(f"starling-emulate: evaluating the {'city models' if scenario.city else 'final models'} "
                f"on all {len(devices)} devices' test windows")
            evaluator = Evaluator(scenario.model, [(name, gateway_of[name], path) for name, path in devices])
        return city_section(scenario, members, read_results(members), evaluator, say)
    except Exception as exc:  # noqa: BLE001 (the report says so; the run's record comes first)
        return {"tier": bool(scenario.city), "error": f"{type(exc).__name__}: {exc}"}


def comparison_view(city: dict[str, Any] | None) -> dict[str, Any] | None:
    """A comparison row's view of a run's `city`: the tier's final accuracy, how many distinct final digests and
    who was flagged; or the isolated gateways' mean on every device."""
    if not isinstance(city, dict):
        return None
    if not city.get("tier"):
        return {"tier": False, "isolated_mean": city.get("isolated_mean")}
    return {"tier": True, "final_accuracy": city.get("final_accuracy"),
            "distinct_final_digests": len(set((city.get("final_digests") or {}).values())),
            "flagged": sorted(city.get("flagged") or {}), "epochs": len(city.get("epochs") or [])}


def all_devices_accuracy(report: dict[str, Any]) -> float | None:
    """The final accuracy on every device of the run: the city model's (tier), the mean of the gateways' final
    models (isolated), or the one gateway's own last evaluation (it covers all its devices)."""
    city = report.get("city")
    if isinstance(city, dict):
        return city.get("final_accuracy") if city.get("tier") else city.get("isolated_mean")
    accs = [r.get("accuracy") for r in report.get("rounds", []) if r.get("accuracy") is not None]
    return accs[-1] if accs else None


def gateway_attack(adversary: Adversary, members: list[Member], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A gateway attack's entry in the report's `attacks`: who wrote mismatch evidence against its target
    (`flagged_by`, from the gateways' `city.flagged`), and the city epochs each other gateway left it out of,
    and why. As expected: every other gateway's last city epoch left it out as "flagged" (its models stay out
    of the city model)."""
    name = _names(members)
    target = next((m for m in members if m.name == adversary.target), None)
    peers = [m for m in members if m.name != adversary.target]
    flagged_by: set[str] = set()
    left_out: dict[str, list[dict[str, Any]]] = {}
    kept_out = bool(peers)
    for m in peers:
        city = (results.get(m.name) or {}).get("city") or {}
        evidence = (city.get("flagged") or {}).get(target.id) if target is not None else None
        if isinstance(evidence, dict):
            flagged_by |= {str(name(a)) for a in evidence.get("accusers") or [m.id]}
        records = [r for r in city.get("epochs") or [] if isinstance(r, dict)]
        left_out[m.name] = [{"epoch": r.get("epoch"), "reason": x.get("reason")} for r in records
                            for x in r.get("left_out") or [] if isinstance(x, dict) and target is not None
                            and x.get("gateway") == target.id]
        last = max(records, key=lambda r: r.get("epoch", 0), default=None)
        flagged_last = last is not None and {"epoch": last.get("epoch"), "reason": "flagged"} in left_out[m.name]
        kept_out = kept_out and flagged_last
    entry = {"attack": adversary.attack, "target": adversary.target, "devices": [], "accepted": 0, "rejected": {},
             "skipped": {}, "expected": ["flagged"], "flagged_by": sorted(flagged_by), "left_out": left_out,
             "as_expected": kept_out}
    from .tampered_gateway import DEFAULT_SCALE

    entry["scale"] = adversary.scale if adversary.scale is not None else DEFAULT_SCALE
    return entry


def members_of(gateways: list[Any]) -> list[Member]:
    """The report's view of the emulator's GatewayRun handles."""
    return [Member(g.name, g.identity.id, g.home) for g in gateways]


def read_results(members: list[Member]) -> dict[str, dict[str, Any]]:
    """Each gateway's result.json ({} when it wrote none)."""
    out = {}
    for m in members:
        path = m.home / "result.json"
        out[m.name] = json.loads(path.read_text()) if path.exists() else {}
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
