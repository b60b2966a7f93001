"""bench/vs_flower.py's runs, over the seeds: each side's means and spread, Starling's ratios to the baselines,
the goals (issue 17), and the table of it all for stderr. Pure functions of the runs' figures (dicts).

`summarize` turns one side's runs into its entry of the JSON, `judge` adds `ratio` and `goals` to the
document from those entries, `table` renders the document for a human.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

SIDES = ("flower", "flower_process", "starling")


def _spread(values: list[float], digits: int) -> dict[str, Any]:
    return {"mean": round(statistics.fmean(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits),
            "std": round(statistics.stdev(values), digits) if len(values) > 1 else 0.0,
            "values": [round(v, digits) for v in values]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side over its successful runs: the means, and the spread of the three headline figures."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": "; ".join(r["error"] for r in runs) or "no run"}

    def mean(get, digits: int = 2) -> float:
        return round(statistics.fmean(get(r) for r in ok), digits)

    out: dict[str, Any] = {
        "runtime": ok[0]["runtime"], "update": ok[0]["update"], "seeds": [r["seed"] for r in ok],
        "failed_runs": len(runs) - len(ok),
        "bytes_per_round": {k: round(mean(lambda r, k=k: r["bytes_per_round"][k])) for k in ("up", "down", "total")},
        "seconds_per_round": mean(lambda r: r["seconds_per_round"], 3),
        "final_accuracy": mean(lambda r: r["final_accuracy"], 4),
    }
    for key in ("server_cpu_s", "server_cpu_s_window", "server_peak_rss_mb", "devices_cpu_s",
                "devices_peak_rss_mb", "broker_cpu_s", "broker_peak_rss_mb"):
        if key in ok[0]:
            out[key] = mean(lambda r, key=key: r[key], 1 if key.endswith("mb") else 2)
    idle = [r["idle_bytes_per_s"] for r in ok if r.get("idle_bytes_per_s") is not None]
    out["idle_bytes_per_s"] = round(statistics.fmean(idle), 1) if idle else None
    clientapps = [r["devices_processes"].get("flwr-clientapp", {}).get("count", 0) for r in ok]
    if any(clientapps):
        out["clientapp_processes_per_run"] = clientapps
    out["spread"] = {
        "bytes_per_round": _spread([r["bytes_per_round"]["total"] for r in ok], 0),
        "seconds_per_round": _spread([r["seconds_per_round"] for r in ok], 3),
        "final_accuracy": _spread([r["final_accuracy"] for r in ok], 4),
    }
    return out


def _ratios(s: dict[str, Any], f: dict[str, Any]) -> dict[str, float | None]:
    ratio = lambda a, b: round(a / b, 3) if b else None  # noqa: E731
    return {
        "bytes_per_round": ratio(s["bytes_per_round"]["total"], f["bytes_per_round"]["total"]),
        "seconds_per_round": ratio(s["seconds_per_round"], f["seconds_per_round"]),
        "bytes_up_per_round": ratio(s["bytes_per_round"]["up"], f["bytes_per_round"]["up"]),
        "bytes_down_per_round": ratio(s["bytes_per_round"]["down"], f["bytes_per_round"]["down"]),
        "server_cpu_s": ratio(s["server_cpu_s"], f["server_cpu_s"]),
        "server_peak_rss_mb": ratio(s["server_peak_rss_mb"], f["server_peak_rss_mb"]),
    }


def judge(doc: dict[str, Any]) -> None:
    """`ratio` and `goals` (issue 17) into `doc`, from the sides' means."""
    s = doc.get("starling", {})
    baselines = [b for b in ("flower", "flower_process") if "bytes_per_round" in doc.get(b, {})]
    if "bytes_per_round" not in s or not baselines:
        return
    doc["ratio"] = {b: _ratios(s, doc[b]) for b in baselines}
    goals: dict[str, Any] = {
        "accuracy_gap_points": {b: round(100 * (s["final_accuracy"] - doc[b]["final_accuracy"]), 2)
                                for b in baselines},
        "equal_accuracy_on_means": all(s["final_accuracy"] >= doc[b]["final_accuracy"] - 0.01 for b in baselines),
        "bytes_per_round_le_0_15x": all(doc["ratio"][b]["bytes_per_round"] <= 0.15 for b in baselines),
    }
    if "flower_process" in baselines:
        goals["seconds_per_round_le_0_5x_flower_process"] = doc["ratio"]["flower_process"]["seconds_per_round"] <= 0.5
    goals["judged_against"] = baselines
    doc["goals"] = goals


def table(doc: dict[str, Any]) -> str:
    """The sides' means (min-max over the seeds) as text, for stderr."""
    sides = [s for s in SIDES if "bytes_per_round" in doc.get(s, {})]
    lines = [f"{'mean over seeds (min-max)':<28}" + "".join(f"{s:>32}" for s in sides)]

    def cell(side: str, key: str, fmt: str) -> str:
        sp = doc[side]["spread"][key]
        return f"{format(sp['mean'], fmt)} ({format(sp['min'], fmt)}-{format(sp['max'], fmt)})"

    for label, key, fmt in (("bytes per round", "bytes_per_round", ",.0f"),
                            ("seconds per round", "seconds_per_round", ".2f"),
                            ("final accuracy", "final_accuracy", ".4f")):
        lines.append(f"{label:<28}" + "".join(f"{cell(s, key, fmt):>32}" for s in sides))
    lines.append(f"{'server CPU s / peak RSS MB':<28}" + "".join(
        f"{doc[s]['server_cpu_s']:>22.1f} / {doc[s]['server_peak_rss_mb']:>6.0f}" for s in sides))
    for b, r in doc.get("ratio", {}).items():
        lines.append(f"starling / {b}: bytes {r['bytes_per_round']}, seconds {r['seconds_per_round']}, "
                     f"server CPU {r['server_cpu_s']}, server RSS {r['server_peak_rss_mb']}")
    if "goals" in doc:
        lines.append("goals: " + json.dumps({k: v for k, v in doc["goals"].items() if k != "judged_against"}))
    return "\n".join(lines)
