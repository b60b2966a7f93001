"""hw.report renders an emulator report.json as report.html with PNG plots."""

from __future__ import annotations

import copy
import html
import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from hw.report import NOT_IN_REPORT, main, plots_folder, round_times, write_html_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = '<script>alert("x")</script>&$\\frac{1}{$'

# A real quickstart report (starling-emulate --scenario hw/scenarios/quickstart.toml), paths shortened.
QUICKSTART = {
    "scenario": "quickstart",
    "rounds": [
        {"round": 0, "accuracy": 0.0325, "loss": 2.0001, "participants": 0, "rejected": 0,
         "bytes_up": 1787, "bytes_down": 50962, "seconds": 0.169, "skipped": 0},
        {"round": 1, "accuracy": 0.6804, "loss": 1.0263, "participants": 5, "rejected": 0,
         "bytes_up": 63998, "bytes_down": 54950, "seconds": 1.358, "skipped": 0},
        {"round": 2, "accuracy": 0.7041, "loss": 0.7804, "participants": 5, "rejected": 0,
         "bytes_up": 63990, "bytes_down": 54597, "seconds": 1.098, "skipped": 0},
        {"round": 3, "accuracy": 0.7366, "loss": 0.6169, "participants": 5, "rejected": 0,
         "bytes_up": 63994, "bytes_down": 55303, "seconds": 0.84, "skipped": 0},
        {"round": 4, "accuracy": 0.8047, "loss": 0.5318, "participants": 5, "rejected": 0,
         "bytes_up": 63994, "bytes_down": 54950, "seconds": 1.295, "skipped": 0},
        {"round": 5, "accuracy": 0.7958, "loss": 0.4824, "participants": 5, "rejected": 0,
         "bytes_up": 64004, "bytes_down": 54969, "seconds": 1.285, "skipped": 0},
    ],
    "rejections": {},
    "ledger": {"path": "run/gateway/ledger.db", "height": 16, "verified": True, "problem": None},
    "config": {"name": "quickstart", "rounds": 5, "seed": 0, "timeout_s": 600, "devices": 5,
               "subjects": [1, 2, 3, 4, 5], "source": "watch", "stride": 64, "strategy": "FedAvg",
               "strategy_params": {}, "strategy_dp": {}, "epochs": 2, "batch_size": 32, "lr": 0.2,
               "deadline_s": 60, "broker": "auto"},
    "gateway": {"id": "f6ce0c420f300936517892fe817b51ba", "name": "gw-1", "public_key": "6731d44c" * 8,
                "state": "done", "exit_code": 0, "enroll_rejections": {}},
    "model": {"digest": "94dd6b53" * 8, "version": 5, "path": "run/gateway/model.npz"},
    "broker": "mosquitto",
    "workdir": "run",
    "seconds": 17.0,
    "timed_out": False,
}


def _rounds(n: int, seed: int, evaluate_every: int = 1) -> list[dict]:
    out = []
    for r in range(n + 1):
        acc = None if r % evaluate_every else round(0.1 + 0.8 * (1 - 0.85 ** r) + 0.01 * seed, 4)
        out.append({"round": r, "accuracy": acc, "loss": None if acc is None else round(2 - 1.8 * acc, 3),
                    "participants": 0 if r == 0 else 100 - seed - (r % 3), "rejected": (r + seed) % 4,
                    "bytes_up": 1000 + 64000 * (r > 0) * 100, "bytes_down": 55000 * 100,
                    "seconds": 2.0 + 0.1 * seed,
                    "skipped": r % 2})
    return out


def city_report(rounds: int = 30) -> dict:
    """A synthetic 3-gateway report with faults, attacks and a comparison, as the emulator will write."""
    names = ["gw-north", "gw-south", "gw-" + HOSTILE]
    gateways = {}
    for i, name in enumerate(names):
        heights = [[t * 1.0, 3 * t + i] for t in range(0, 64, 2)]
        lags = [[t * 1.0, (t * (i + 1)) % 5] for t in range(0, 64, 2)]
        gateways[name] = {
            # the third gateway evaluates every other round only
            "rounds": _rounds(rounds, i, evaluate_every=1 if i < 2 else 2),
            "rejections": {"bad_signature": 3 + i, "norm_outlier": 10 * i, "stale_round": 1},
            "state": "done",
            "ledger": {"height": heights[-1][1], "verified": True, "height_series": heights,
                       "finality_lag_series": lags},
        }
    report = copy.deepcopy(QUICKSTART)
    report.update({
        "scenario": "city",
        "rounds": gateways["gw-north"]["rounds"],
        "rejections": gateways["gw-north"]["rejections"],
        "gateways": gateways,
        "faults": [
            {"t": 12.5, "kind": "kill", "target": "gw-south", "detail": "SIGKILL"},
            {"t": 20.0, "kind": "restart", "target": "gw-south", "detail": None},
            {"t": 30.0, "t_end": 40.0, "kind": "partition", "target": HOSTILE,
             "detail": {"from": "gw-north"}},
            {"t": None, "kind": "churn", "target": "devices", "detail": "no time: table only"},
        ],
        "attacks": [
            {"attack": "sign_flip", "fraction": 0.3, "devices": 90,
             "rejected": {"norm_outlier": 40, "cosine": 12}},
            {"attack": HOSTILE, "fraction": 0.1, "devices": ["d1", "d2"], "rejected": {"bad_signature": 20}},
        ],
        "comparison": [
            {"name": "clean", "strategy": "FedAvg", "attack": None, "final_accuracy": 0.85,
             "accuracy": [0.1, 0.5, None, 0.8, 0.85]},
            {"name": "fedavg-signflip", "strategy": "FedAvg", "attack": "sign_flip", "final_accuracy": 0.12,
             "accuracy": [0.1, 0.3, 0.2, 0.15, 0.12]},
            {"name": "robust-" + HOSTILE, "strategy": "FedMedian", "attack": "sign_flip",
             "final_accuracy": 0.81,
             "accuracy": [{"round": 0, "accuracy": 0.1}, {"round": 1, "accuracy": 0.6},
                          {"round": 4, "accuracy": 0.81}]},
        ],
    })
    report["config"]["devices"] = 300
    report["config"]["strategy"] = "FedAvg"
    return report


def _pngs_ok(paths: list[Path]) -> None:
    for png in paths:
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC, png
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert 300 <= width <= 3000 and 150 <= height <= 3000, (png, width, height)
        assert 5_000 < len(data) < 2_000_000, (png, len(data))


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_quickstart_report(tmp_path):
    out = tmp_path / "report.html"
    written = write_html_report(copy.deepcopy(QUICKSTART), out)
    assert written[0] == out and out.exists()
    pngs = written[1:]
    assert {p.name for p in pngs} == {"accuracy.png", "participation.png", "bytes.png"}
    assert all(p.parent == plots_folder(out) == tmp_path / "report_plots" for p in pngs)
    _pngs_ok(pngs)
    page = out.read_text()
    assert sorted(_img_srcs(page)) == sorted(f"report_plots/{p.name}" for p in pngs)
    for src in _img_srcs(page):
        assert (tmp_path / src).is_file()
    assert "quickstart" in page and "FedAvg" in page
    assert "0.796" in page  # final accuracy
    assert "0.805" in page  # best accuracy
    assert re.search(r"rounds completed</td><td>5<", page)
    assert re.search(r"ledger height</td><td>16<", page)
    assert "No update was rejected." in page
    for section in ("fault timeline", "attacks", "strategy comparison",
                    "ledger height and finality lag over time"):
        assert f"{section}: {NOT_IN_REPORT}" in page
    assert "<script" not in page


def test_city_report_with_faults_attacks_comparison(tmp_path):
    report = city_report()
    out = tmp_path / "city.html"
    started = time.perf_counter()
    written = write_html_report(report, out)
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"rendering took {elapsed:.1f} s"
    pngs = written[1:]
    assert {p.stem for p in pngs} == {"accuracy", "participation", "rejections", "bytes", "ledger", "attacks",
                                      "comparison"}
    _pngs_ok(pngs)
    page = out.read_text()
    assert sorted(_img_srcs(page)) == sorted(f"city_plots/{p.name}" for p in pngs)
    assert NOT_IN_REPORT not in page
    # headline figures
    final_north = report["gateways"]["gw-north"]["rounds"][-1]["accuracy"]
    assert f"{final_north:.3f}" in page
    assert re.search(r"gateways</td><td>3<", page)
    assert re.search(r"rejected updates</td><td>45<", page)  # (3+0+1) + (4+10+1) + (5+20+1)
    assert "0.850" in page and "0.120" in page and "0.810" in page  # comparison
    assert "sign_flip" in page and "gw-south" in page and "SIGKILL" in page
    # every hostile string is escaped, never raw
    assert HOSTILE not in page
    assert "<script>" not in page
    assert html.escape(HOSTILE, quote=True) in page
    # the time axis was derived from durations (the rounds carry no `t`)
    assert "cumulative sum" in page


def test_rendering_is_deterministic(tmp_path):
    a = write_html_report(city_report(rounds=8), tmp_path / "a" / "report.html")
    b = write_html_report(city_report(rounds=8), tmp_path / "b" / "report.html")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_fault_markers_change_the_time_plots(tmp_path):
    with_faults = city_report(rounds=8)
    without = copy.deepcopy(with_faults)
    without["faults"] = []
    a = {p.stem: p.read_bytes() for p in write_html_report(with_faults, tmp_path / "a" / "r.html")[1:]}
    b = {p.stem: p.read_bytes() for p in write_html_report(without, tmp_path / "b" / "r.html")[1:]}
    for name in ("accuracy", "participation", "bytes", "ledger", "rejections"):
        assert a[name] != b[name], f"{name}.png has no fault markers"
    assert "No fault was injected." in (tmp_path / "b" / "r.html").read_text()


@pytest.mark.parametrize("report", [
    {},
    {"scenario": None, "rounds": None, "ledger": None, "gateways": None, "faults": None, "attacks": None,
     "comparison": None, "config": None, "gateway": None, "rejections": None},
    {"rounds": [{"round": 0}, {"round": 1, "accuracy": None, "seconds": None}, "junk", None]},
    {"rounds": [{"round": "x", "accuracy": "0.5", "participants": float("nan"), "bytes_up": True}]},
    {"gateways": {"gw": {"rounds": [], "ledger": {"height_series": [[0, 1], ["bad"], None, [1, None]]}}},
     "faults": [{"t": "soon", "kind": None}, "junk", {"t": 1e9, "kind": "kill"}]},
    {"attacks": [{"attack": "x"}, None], "comparison": [{"name": "only-final", "final_accuracy": 0.5}, {}]},
])
def test_missing_and_malformed_values_do_not_crash(tmp_path, report):
    written = write_html_report(report, tmp_path / "report.html")
    _pngs_ok(written[1:])
    page = written[0].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for src in _img_srcs(page):
        assert (tmp_path / src).is_file()


def test_accuracy_none_rounds_are_gaps_not_zero(tmp_path):
    report = copy.deepcopy(QUICKSTART)
    report["rounds"][-1]["accuracy"] = None  # the last round was not evaluated
    page = write_html_report(report, tmp_path / "r.html")[0].read_text()
    assert re.search(r"final accuracy</td><td>0.805<", page)  # the last evaluated round's


def test_round_times_explicit_and_derived():
    assert round_times([{"seconds": 1.0}, {"seconds": 2.5}, {}]) == ([1.0, 3.5, 3.5], False)
    assert round_times([{"seconds": 1.0, "t": 10.0}, {"seconds": 2.0}]) == ([10.0, 12.0], True)


def test_rerender_removes_stale_plots(tmp_path):
    out = tmp_path / "report.html"
    write_html_report(city_report(rounds=4), out)
    assert (plots_folder(out) / "ledger.png").exists()
    written = write_html_report(copy.deepcopy(QUICKSTART), out)
    assert not (plots_folder(out) / "ledger.png").exists()
    assert sorted(plots_folder(out).iterdir()) == sorted(written[1:])


def test_cli(tmp_path, capsys):
    src = tmp_path / "report.json"
    src.write_text(json.dumps(city_report(rounds=5)))
    assert main([str(src)]) == 0
    out = tmp_path / "report.html"
    assert out.exists() and str(out) in capsys.readouterr().out
    assert main([str(src), "--out", str(tmp_path / "x" / "page.html")]) == 0
    assert (tmp_path / "x" / "page_plots" / "accuracy.png").exists()
    (tmp_path / "bad.json").write_text("[1, 2")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert main([str(tmp_path / "missing.json")]) == 2


def test_module_entry_point(tmp_path):
    src = tmp_path / "report.json"
    src.write_text(json.dumps(QUICKSTART))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "hw.report", str(src), "--out", str(tmp_path / "q.html")],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "q.html").exists() and (tmp_path / "q_plots" / "accuracy.png").exists()


def test_multi_gateway_rejections_table_has_a_column_per_gateway(tmp_path):
    page = write_html_report(city_report(rounds=4), tmp_path / "r.html")[0].read_text()
    table = page.split("<h2>Rejected updates</h2>")[1].split("</table>")[0]
    assert "<th>gw-north</th><th>gw-south</th>" in table and "<th>total</th>" in table
    # norm_outlier: 0 + 10 + 20
    assert re.search(r"<td>norm_outlier</td><td class=\"n\">0</td><td class=\"n\">10</td>"
                     r"<td class=\"n\">20</td><td class=\"n\">30</td>", table)


def test_without_matplotlib_the_page_has_the_tables(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written = write_html_report(city_report(rounds=4), tmp_path / "report.html")
    assert written == [tmp_path / "report.html"]
    page = written[0].read_text()
    assert "Plots need matplotlib" in page and "<img" not in page
    assert "sign_flip" in page and "gw-south" in page


def test_odd_output_name_gives_working_relative_links(tmp_path):
    from urllib.parse import unquote

    out = tmp_path / "my run #1.html"
    written = write_html_report(copy.deepcopy(QUICKSTART), out)
    srcs = _img_srcs(out.read_text())
    assert srcs and all(" " not in s and "#" not in s for s in srcs)
    assert sorted(tmp_path / unquote(s) for s in srcs) == sorted(written[1:])


def test_a_lineage_through_a_stop_and_a_crash_is_shown_with_both_faults_marked(tmp_path):
    report = copy.deepcopy(QUICKSTART)
    for r in report["rounds"]:
        r["t"] = 2.0 + r["round"]
    report["faults"] = [
        {"t": 3.2, "t_end": 4.5, "kind": "gateway_stop", "target": "gw-1",
         "detail": {"signal": "SIGTERM", "exit": "exited", "overrides": {"lr": 0.1}, "previous": {"lr": 0.2}}},
        {"t": 5.1, "t_end": 6.0, "kind": "gateway_restart", "target": "gw-1", "detail": {"signal": "SIGKILL"}},
    ]
    report["lineage"] = {"model": "94dd6b53" * 8, "version": 5, "complete": True, "length": 6, "gap": None,
                         "releases": [], "restarts_crossed": [{"kind": "gateway_stop", "crossed": True},
                                                              {"kind": "gateway_restart", "crossed": True}]}
    page = write_html_report(report, tmp_path / "report.html")[0].read_text()
    assert re.search(r'model lineage</td><td>6 releases, <span class="good">complete</span>, through 2 of 2 '
                     r"restarts<", page)
    assert "gateway_stop" in page and "&quot;overrides&quot;: {&quot;lr&quot;: 0.1}" in page
    without = copy.deepcopy(report)
    without["faults"] = [f for f in report["faults"] if f["kind"] != "gateway_stop"]
    plots = {p.stem: p.read_bytes() for p in write_html_report(without, tmp_path / "b" / "r.html")[1:]}
    assert (plots_folder(tmp_path / "report.html") / "accuracy.png").read_bytes() != plots["accuracy"]
    broken = copy.deepcopy(report)
    broken["lineage"].update(complete=False, gap={"model": "ab" * 32, "after": None})
    page = write_html_report(broken, tmp_path / "c" / "r.html")[0].read_text()
    assert '<span class="bad">broken</span> at abababababababab…' in page


def _personalized(report: dict) -> dict:
    """`report` as a run with [personalization] leaves it (hw/personal_report.py): one device is HOSTILE."""
    report.update({
        "global_accuracy": 0.8, "personalized_accuracy": 0.85,
        "personalization": {
            "steps": 20, "lr": 0.05, "weights": ["dense_w", "dense_b"],
            "gateways": {"gw-1": {"round": 5, "model": "ab" * 32}},
            "devices": [
                {"device": "d-1", "gateway": "gw-1", "test_windows": 40, "train_windows": 160, "global": 0.75,
                 "personalized": 0.85},
                {"device": HOSTILE, "gateway": "gw-1", "test_windows": 60, "train_windows": 240, "global": 0.85,
                 "personalized": 0.85},
                {"device": "d-3", "gateway": "gw-1", "test_windows": 0, "global": None, "personalized": None},
            ],
            "gain": 0.05,
        },
    })
    return report


def test_the_page_shows_personalization_when_the_report_has_it(tmp_path):
    page = write_html_report(_personalized(copy.deepcopy(QUICKSTART)), tmp_path / "r.html")[0].read_text()
    assert page.index("<h2>Accuracy</h2>") < page.index("<h2>Personalization</h2>") < page.index(
        "<h2>Participation</h2>")
    part = page.split("<h2>Personalization</h2>")[1].split("<h2>")[0]
    assert "final model (gw-1's round 5)" in part
    assert "20 SGD steps of dense_w, dense_b at learning rate 0.05." in part
    assert "Mean over the 2 devices" in part
    assert "<b>0.800</b> with the final model, <b>0.850</b> personalized, a gain of <b>+0.050</b>" in part
    assert ("<tr><th>device</th><th>gateway</th><th>test windows</th><th>global model</th><th>personalized</th>"
            "<th>difference</th></tr>") in part
    assert ('<tr><td>d-1</td><td>gw-1</td><td class="n">40</td><td class="n">0.750</td><td class="n">0.850</td>'
            '<td class="n">+0.100</td></tr>') in part
    assert f'<tr><td>{html.escape(HOSTILE)}</td><td>gw-1</td><td class="n">60</td>' in part
    assert '<td class="n">0.850</td><td class="n">0.850</td><td class="n">+0.000</td>' in part
    assert '<tr><td>d-3</td><td>gw-1</td><td class="n">0</td><td class="n">–</td><td class="n">–</td>' in part
    assert "<script>" not in page and 'class="bad"' not in part


def test_personalization_that_failed_says_why(tmp_path):
    report = _personalized(copy.deepcopy(QUICKSTART))
    del report["global_accuracy"], report["personalized_accuracy"]
    section = report["personalization"]
    section.update(devices=[], error="RuntimeError: " + HOSTILE, weights=[])
    section["gateways"]["gw-2"] = {"round": None, "missing": True}
    del section["gain"]
    part = write_html_report(report, tmp_path / "r.html")[0].read_text().split("<h2>Personalization</h2>")[1]
    part = part.split("<h2>")[0]
    assert "Mean over" not in part and "<table>" not in part and "of the output layer" in part
    assert '<p class="bad">No final model in the blob store of gw-2' in part
    assert f'<p class="bad">Personalization could not be measured: RuntimeError: {html.escape(HOSTILE)}</p>' in part


def test_without_personalization_the_page_has_no_such_part(tmp_path):
    page = write_html_report(copy.deepcopy(QUICKSTART), tmp_path / "r.html")[0].read_text()
    assert "Personalization" not in page and "personalized" not in page
    page = write_html_report(city_report(rounds=4), tmp_path / "c.html")[0].read_text()
    assert "Personalization" not in page and "personalized" not in page


def test_the_comparison_shows_personalization_when_a_variant_has_it(tmp_path):
    report = city_report(rounds=4)
    report["comparison"][0].update(global_accuracy=0.8, personalized_accuracy=0.875)
    table = write_html_report(report, tmp_path / "r.html")[0].read_text().split("<h2>Comparison</h2>")[1]
    table = table.split("</table>")[0]
    assert "<th>global model, device mean</th><th>personalized, device mean</th></tr>" in table
    assert '<td class="n">0.850</td><td class="n">–</td><td class="n">0.800</td><td class="n">0.875</td></tr>' in table
    assert '<td class="n">0.120</td><td class="n">–</td><td class="n">–</td><td class="n">–</td></tr>' in table
