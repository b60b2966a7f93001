"""What a run's report.json says: built from the gateways' result.json, the monitor and the ledgers.

    report = build_report(scenario, workdir, started, ...)   # the top level, `gateways`, `ledger_check`,
    report.update(profile_sections(...))                     # `faults`, `attacks`, `lineage`, ...
    report["city"] = city_section(...)                       # hw/city_report.py
    report["final_accuracy"] = final_accuracy(report)        # the headline (the city model's, with the tier)
    write_report(report, path)                               # report.json and report.html beside it
    report = variants_report(scenario, reports, workdir, started)   # a scenario with [[variant]]s: each run's
                                                                    # report and their `comparison`

(hw/report.py draws report.html from it; README "The emulator" lists the keys.)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from protocol.atomic import write_atomic

from .adversary_tables import Adversary
from .city_report import Member, all_devices_accuracy, comparison_view, gateway_attack, members_of
from .faults import fault_sections
from .fleet import GatewayRun
from .monitor import Monitor
from .scenario import Scenario


def ledger_section(g: GatewayRun, result: dict[str, Any], monitor: Monitor, verify_store) -> dict[str, Any]:
    from ledger.store import Ledger

    verified = verify_store(g.ledger) if g.ledger.exists() else None
    series = sorted(monitor.series.get(g.identity.id, []))
    if g.ledger.exists():  # where the ledger ended (after a city's gossip settled)
        with Ledger.open(g.ledger, read_only=True) as ledger:
            end = ledger.finality()
        series.append((round(time.time() - monitor.started, 3), end["height"], end["lag"]))
    # Only the samples where something changed (the version vector comes every second), and the last.
    series = [p for i, p in enumerate(series) if i in (0, len(series) - 1) or p[1:] != series[i - 1][1:]]
    return {
        "path": str(g.ledger),
        "height": result.get("ledger", {}).get("height"),
        "verified": bool(verified and verified.ok),
        "problem": None if verified is None or verified.ok else f"{verified.bad_vertex}: {verified.reason}",
        "height_series": [[t, h] for t, h, _ in series],
        "finality_lag_series": [[t, lag] for t, _, lag in series],
    }



GATEWAY_FAULTS = ("gateway_restart", "gateway_stop")  # the faults a gateway's model lineage must outlive



def lineage_section(g: GatewayRun, result: dict[str, Any], started: float,
                     timeline: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The chain of the gateway's final model on its ledger (ledger.audit.lineage), and each restart it crossed.

    {"model", "version", "complete", "length", "gap", "releases": [{"model", "round", "strategy",
    "inputs", "t"} newest first, the lineage's first model last with its "version" and "reason"],
    "restarts_crossed": [{"kind", "t", "before": {"model", "round"}, "after": {...}, "crossed"}]}:
    `t` in seconds since the run started (the vertex's time); per gateway_restart or gateway_stop of
    this gateway, the last release before it went down and the first after it came back, and whether
    the final model's chain holds both (then it runs through the restart: a new lineage would not).
    None when there is no final model or ledger.
    """
    from ledger.audit import lineage
    from ledger.store import Ledger

    model = (result.get("model") or {}).get("digest")
    if not model or not g.ledger.exists():
        return None
    try:
        with Ledger.open(g.ledger, read_only=True) as ledger:
            walk = lineage(ledger, bytes.fromhex(model))
    except Exception as exc:  # noqa: BLE001 (the report says so; the run's record comes first)
        return {"model": model, "complete": False, "error": f"{type(exc).__name__}: {exc}"}
    releases = []
    for r in walk["releases"]:
        entry = {"model": r["model"], "round": r["round"], "strategy": r["strategy"], "inputs": r["inputs"],
                 "t": round(r["time"] - started, 3)}
        if r["base"] is None:  # the lineage's first model: where it started, and why
            entry.update(version=r.get("version"), reason=r.get("reason"))
        releases.append(entry)
    crossed = []
    for fault in sorted(timeline, key=lambda f: f["t"]):
        if fault["kind"] not in GATEWAY_FAULTS or fault["target"] != g.name or fault["t_end"] is None \
                or fault["detail"].get("restarted") is False or "skipped" in fault["detail"]:
            continue
        before = next((i for i, r in enumerate(releases) if r["t"] <= fault["t"]), None)  # newest first
        after = next((i for i in reversed(range(len(releases))) if releases[i]["t"] >= fault["t_end"]), None)
        crossed.append({"kind": fault["kind"], "t": fault["t"],
                        "before": None if before is None else {k: releases[before][k] for k in ("model", "round")},
                        "after": None if after is None else {k: releases[after][k] for k in ("model", "round")},
                        # both in the chain: it runs from the one to the other (each release names its base)
                        "crossed": before is not None and after is not None})
    return {"model": model, "version": (result.get("model") or {}).get("version"), "complete": walk["complete"],
            "length": walk["length"], "gap": walk["gap"], "releases": releases, "restarts_crossed": crossed}



def link_outages(links, offset: float) -> list[dict[str, Any]]:
    """A link's disconnect schedule as entries of the fault timeline (so the plots mark them too)."""
    return [{"t": round(offset + start, 3), "t_end": round(offset + end, 3), "kind": "link_outage",
             "target": spec.name, "detail": {"devices": spec.fraction if spec.fraction is not None else spec.count}}
            for spec in links for start, end in spec.outages]



def device_totals(ids: list[str], monitor: Monitor) -> dict[str, Any]:
    accepted, duplicates, rejected, skipped = 0, 0, {}, {}
    with monitor.lock:
        docs = [monitor.devices.get(d, {}) for d in ids]
    for doc in docs:
        accepted += int(doc.get("accepted", 0))
        duplicates += int(doc.get("duplicates", 0))
        for target, key in ((rejected, "rejected"), (skipped, "skipped")):
            for reason, n in (doc.get(key) or {}).items():
                target[reason] = target.get(reason, 0) + int(n)
    return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected, "skipped": skipped}



def profile_sections(scenario: Scenario, profile_of: dict, link_of: dict, relays: dict, monitor: Monitor,
                      device_ids: dict[str, str]) -> dict[str, Any]:
    """What each device profile and each link did: its devices' replies, and the link's traffic."""
    out: dict[str, Any] = {}
    if scenario.device_profiles:
        out["device_profiles"] = []
        for spec in scenario.device_profiles:
            names = sorted(n for n, p in profile_of.items() if p.name == spec.name)
            out["device_profiles"].append({**{k: v for k, v in asdict(spec).items() if v is not None},
                                           "devices": names, **device_totals([device_ids[n] for n in names], monitor)})
    if scenario.links:
        out["links"] = []
        for spec in scenario.links:
            names = sorted(n for n, link in link_of.items() if link.name == spec.name)
            stats = [asdict(r.stats) for (link, _), r in relays.items() if link == spec.name]
            traffic = {key: sum(s[key] for s in stats) for key in
                       ("connections", "refused", "dropped", "bytes_up", "bytes_down", "delayed_chunks")}
            out["links"].append({**{k: v for k, v in asdict(spec).items() if v is not None}, "devices": names,
                                 **traffic, **device_totals([device_ids[n] for n in names], monitor)})
    return out



def attack_outcome(expected: tuple[str, ...], accepted: int, rejected: dict[str, int]) -> bool:
    if "accepted" in expected:
        return accepted > 0 and not rejected
    return sum(rejected.values()) > 0 and set(rejected) <= set(expected)



def attacks_section(scenario: Scenario, attackers: dict[str, tuple[int, Adversary]], device_ids: dict[str, str],
             gateway_of: dict[str, str], monitor: Monitor, sections: dict[str, dict[str, Any]],
             vouchers: bool, members: list[Member] | None = None,
             results: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per [[adversary]]: its devices and what the gateways did with their replies; a gateway attack's entry
    says which peers flagged its target (hw.city_report.gateway_attack, from `members`' `results`)."""
    from .adversary import EXPECTED

    out = []
    for i, adv in enumerate(scenario.adversaries):
        if adv.on_gateway:
            out.append(gateway_attack(adv, members or [], results or {}))
            continue
        names = sorted(name for name, (j, _) in attackers.items() if j == i)
        totals = device_totals([device_ids[name] for name in names], monitor)
        accepted, rejected, skipped = totals["accepted"], totals["rejected"], totals["skipped"]
        with monitor.lock:
            docs = {name: monitor.devices.get(device_ids[name], {}) for name in names}
        per_device = {name: {"id": device_ids[name], "gateway": gateway_of[name],
                             "accepted": int(doc.get("accepted", 0)), "rejected": dict(doc.get("rejected") or {})}
                      for name, doc in docs.items()}
        # Under "open" enrollment a sybil is enrolled and acts as its payload: accepted. Under vouchers it
        # never is, so it has no device status: its refusals are the gateways' (no other device causes them).
        expected = ("accepted",) if adv.attack == "sybil" and not vouchers else tuple(EXPECTED[adv.attack])
        if adv.attack == "sybil" and vouchers:
            expected = ("no_voucher", *expected)
            for section in sections.values():
                for reason, n in {**section["enroll_rejections"], **section["rejections"]}.items():
                    if reason in expected:
                        rejected[reason] = rejected.get(reason, 0) + int(n)
        entry = {"attack": adv.attack, "fraction": adv.fraction if adv.fraction is not None
                 else round(len(names) / max(1, scenario.devices), 4),
                 "devices": names, "accepted": accepted, "rejected": rejected, "skipped": skipped,
                 "expected": list(expected), "as_expected": attack_outcome(expected, accepted, rejected),
                 "per_device": per_device}
        for key in ("scale", "sigma", "payload", "claim", "z", "bound_multiple"):
            if getattr(adv, key) is not None:
                entry[key] = getattr(adv, key)
        out.append(entry)
    return out



def build_report(scenario: Scenario, workdir: Path, started: float, broker_kind: str, gateways: list[GatewayRun],
            monitor: Monitor, attackers: dict[str, tuple[int, Adversary]], device_ids: dict[str, str],
            timed_out: bool, settled: dict[str, Any] | None, verify_store,
            faults: list[dict[str, Any]] | None = None, vouchers: bool = False) -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {}
    results = {}
    for g in gateways:
        result_file = g.home / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        results[g.name] = result
        round_t = monitor.round_t.get(g.identity.id, {})
        rounds = [{**r, "t": round_t[r["round"]]} if r.get("round") in round_t else r for r in result.get("rounds", [])]
        sections[g.name] = {
            "id": g.identity.id,
            "state": result.get("state", "no result"),
            "failure": result.get("failure"),
            "exit_code": g.process.returncode if g.process is not None else None,
            "devices": g.devices,
            "rounds": rounds,
            "rejections": result.get("rejections", {}),
            "duplicates": result.get("duplicates", 0),  # honest re-sends of accepted replies, acknowledged again
            "enroll_rejections": result.get("enroll_rejections", {}),
            "model": result.get("model", {}),
            # a DP run's privacy spent: epsilon, delta, rounds, noise_multiplier, method (gateway/privacy.py)
            "privacy": result.get("privacy"),
            "ledger": ledger_section(g, result, monitor, verify_store),
            "lineage": lineage_section(g, result, started, faults or []),
        }
    first = gateways[0]
    main_section = sections[first.name]
    main_result = results[first.name]
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "rounds": main_section["rounds"],
        "rejections": main_section["rejections"],
        "duplicates": main_section["duplicates"],  # re-sends of accepted replies in their round: not rejections
        "ledger": {k: main_section["ledger"][k] for k in ("path", "height", "verified", "problem")},
        "config": scenario.to_dict(),
        "gateway": {**main_result.get("gateway", {}), "state": main_section["state"],
                    "exit_code": main_section["exit_code"], "enroll_rejections": main_section["enroll_rejections"]},
        "model": main_section["model"],
        "lineage": main_section["lineage"],
        "gateways": sections,
        "broker": broker_kind,
        "workdir": str(workdir),
        "seconds": round(time.time() - started, 1),
        "timed_out": timed_out,
    }
    if len(gateways) > 1:
        from .city import GatewayLedger, compare_ledgers

        accepted = {g.name: sum(r.get("participants", 0) for r in sections[g.name]["rounds"] if r.get("round", 0) > 0)
                    for g in gateways}
        check = compare_ledgers([GatewayLedger(g.name, g.ledger, g.key) for g in gateways], accepted,
                                {g.name: g.identity.public_key for g in gateways})
        report["ledger_check"] = {**check, "settle": settled}
    if scenario.faults or faults:
        report["faults"] = fault_sections(faults or [], {name: s["rounds"] for name, s in sections.items()})
    if scenario.adversaries:
        gateway_of = {name: g.name for g in gateways for name in g.devices}
        report["attacks"] = attacks_section(scenario, attackers, device_ids, gateway_of, monitor, sections,
                                     vouchers, members_of(gateways), results)
    ours = set(device_ids.values())
    with monitor.lock:
        others = {d: dict(doc) for d, doc in monitor.devices.items() if d not in ours}
    if others:  # real devices that joined through --listen
        report["real_devices"] = others
    report["devices"] = {name: {"id": device_ids[name], "gateway": g.name,
                                **({"attack": attackers[name][1].attack} if name in attackers else {})}
                         for g in gateways for name in g.devices}
    return report



def write_report(report: dict[str, Any], report_path: Path) -> Path:
    """report.json (atomically) and report.html beside it; return the HTML's path."""
    from .report import write_html_report

    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(report_path, (json.dumps(report, indent=2) + "\n").encode())
    html = report_path.with_suffix(".html")
    write_html_report(report, html)
    return html


def final_accuracy(report: dict[str, Any]) -> float | None:
    """The run's headline accuracy: with the city tier the city model's on every device of the city
    (`city.final_accuracy`, hw/city_report.py); otherwise the mean over the gateways of each one's last
    evaluated accuracy (on its own devices)."""
    city = report.get("city")
    if isinstance(city, dict) and city.get("tier"):
        return city.get("final_accuracy")
    finals = []
    for section in report.get("gateways", {}).values():
        accs = [r.get("accuracy") for r in section.get("rounds", []) if r.get("accuracy") is not None]
        if accs:
            finals.append(accs[-1])
    return sum(finals) / len(finals) if finals else None


def comparison_section(variants: tuple[Scenario, ...], reports: list[dict[str, Any]],
                       workdir: Path) -> list[dict[str, Any]]:
    """A scenario's `comparison`: a row per variant that ran (`reports`, each the report of its run)."""
    comparison = []
    for variant, sub in zip(variants, reports):
        accuracy = [r.get("accuracy") for r in sub.get("rounds", [])]
        comparison.append({
            "name": variant.name, "strategy": variant.strategy, "attack": variant.attack_label(),
            "defense": variant.defense_label(),  # [aggregation] and [defense] (None: the gateway's defaults)
            "seconds": sub.get("seconds"),
            "final_accuracy": final_accuracy(sub),  # with the city tier the city model's on every device
            "all_devices_accuracy": all_devices_accuracy(sub),  # every run's final model(s) on every device
            "city": comparison_view(sub.get("city")),
            # False when the last rounds got no evaluation (e.g. the devices refused a diverged model)
            "last_round_evaluated": bool(accuracy) and accuracy[-1] is not None,
            "accuracy": accuracy,
            # a reconstruction model with injected anomalies: its last round's AUC (hw/model_report.py)
            **({"anomaly_auc": sub["rounds"][-1].get("anomaly_auc")} if variant.anomalies and sub.get("rounds")
               else {}),
            # [personalization]: each device's tuning of the final model (hw/personal_report.py)
            **{key: sub[key] for key in ("global_accuracy", "personalized_accuracy") if key in sub},
            "state": sub["gateway"]["state"],
            "report": str(workdir / variant.name / "report.json"),
        })
    return comparison


def variants_report(scenario: Scenario, reports: list[dict[str, Any]], workdir: Path,
                    started: float) -> dict[str, Any]:
    """The report of a scenario with variants: the `comparison` of its runs, their reports (`variants`) and every
    run's `attacks` (each naming its run)."""
    comparison = comparison_section(scenario.variants, reports, workdir)
    attacks = [{**a, "variant": sub["scenario"]} for sub in reports for a in sub.get("attacks", [])]
    return {
        "scenario": scenario.name,
        "config": scenario.to_dict(),
        "comparison": comparison,
        "variants": reports,
        **({"attacks": attacks} if attacks else {}),
        "broker": reports[0]["broker"] if reports else None,
        "workdir": str(workdir),
        "seconds": round(time.time() - started, 1),
        "timed_out": any(r["timed_out"] for r in reports),
    }
