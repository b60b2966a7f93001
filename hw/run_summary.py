"""What `starling-emulate` says about a finished run, read from its report (hw/run_report.py builds it):

    print(summary(report, report_path), file=sys.stderr)   # a few lines: accuracy, ledgers, city, attacks
    return 0 if ok(report) else 1                          # the exit status

A run is ok when every gateway ended its rounds with a verified ledger, a city's ledgers are identical and hold
every accepted update, a city tier left every gateway on the one city model, and, with variants, every variant
ran and was ok.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def ok(report: dict[str, Any]) -> bool:
    if "variants" in report:
        return bool(report["variants"]) and len(report["variants"]) == len(report["comparison"]) and all(
            ok(r) for r in report["variants"]) and len(report["variants"]) == len(report["config"]["variants"])
    gateways_ok = all(s["state"] == "done" and s["ledger"]["verified"] for s in report["gateways"].values())
    check = report.get("ledger_check")
    ledgers_ok = check is None or (check["identical"] and check["every_accepted_update_in_every_ledger"])
    city = report.get("city") or {}
    tier_ok = not city.get("tier") or len(set((city.get("final_digests") or {}).values())) == 1 and \
        len(city["final_digests"]) == len(report["gateways"])  # every gateway ends on the one city model
    return gateways_ok and ledgers_ok and tier_ok


def summary(report: dict[str, Any], report_path: Path) -> str:
    if "variants" in report:
        lines = [f"starling-emulate: {len(report['variants'])} runs in {report['seconds']:.0f} s, report {report_path}"]
        for c in report["comparison"]:
            acc = c["final_accuracy"]
            defense = f" ({c['defense']})" if c.get("defense") else ""
            everywhere = c.get("all_devices_accuracy")
            on_all = "" if everywhere is None or everywhere == acc else f", on all devices {everywhere:.3f}"
            auc = f", anomaly AUC {c['anomaly_auc']:.3f}" if c.get("anomaly_auc") is not None else ""
            lines.append(f"  {c['name']}: {c['strategy']}{defense}, attack {c['attack'] or 'none'}: final accuracy "
                         f"{'-' if acc is None else f'{acc:.3f}'}{on_all}{auc} ({c['state']}"
                         f"{'' if c['last_round_evaluated'] else ', the last rounds were not evaluated'})")
        return "\n".join(lines)
    rounds = report["rounds"]
    final = report.get("final_accuracy")
    city = report.get("city") or {}
    text = (f"starling-emulate: {len(rounds) - 1 if rounds else 0} rounds in {report['seconds']:.0f} s, "
            f"final accuracy {final if final is None else round(final, 3)}"
            f"{' (the city model on all devices)' if city.get('tier') else ''}, "
            f"ledger height {report['ledger']['height']} verified={report['ledger']['verified']}")
    last = rounds[-1] if rounds else {}
    if last.get("reconstruction_loss") is not None:  # a reconstruction model (hw/model_report.py)
        text += f"\n  last round: reconstruction error {last['reconstruction_loss']:.4f} on the normal test windows"
        if last.get("anomaly_auc") is not None:
            text += f", anomaly AUC {last['anomaly_auc']:.3f}"
    check = report.get("ledger_check")
    if check is not None:
        text += (f", {len(report['gateways'])} ledgers identical={check['identical']} "
                 f"every accepted update in every ledger={check['every_accepted_update_in_every_ledger']}")
    if city.get("tier"):
        digests = set((city.get("final_digests") or {}).values())
        text += (f"\n  city: {len(city.get('epochs') or [])} epochs, {len(digests)} distinct final digest"
                 f"{'' if len(digests) == 1 else 's'}, flagged {', '.join(city.get('flagged') or {}) or 'none'}")
    elif city.get("isolated_mean") is not None:
        text += f"\n  isolated gateways' final models on all devices: mean accuracy {city['isolated_mean']:.3f}"
    for attack in report.get("attacks", []):
        if "target" in attack:  # a gateway attack
            text += (f"\n  attack {attack['attack']} at {attack['target']}: flagged by "
                     f"{', '.join(attack['flagged_by']) or 'nobody'}: {'yes' if attack['as_expected'] else 'NO'}")
            continue
        n = len(attack["devices"])
        text += (f"\n  attack {attack['attack']} ({n} device{'' if n == 1 else 's'}): accepted {attack['accepted']}, "
                 f"rejected {attack['rejected'] or '-'}; expected {'/'.join(attack['expected'])}: "
                 f"{'yes' if attack['as_expected'] else 'NO'}")
    return text + f", report {report_path}"
