"""The dashboard page: HTML, CSS and JavaScript, kept as strings so nothing but Python files is installed.

The script opens `/events` (server-sent events; the browser reconnects by
itself) and re-renders from each snapshot (view.py). Text from the network is
only ever set with `textContent`; the one exception is the accuracy chart,
which the server draws from numbers (chart.py). No inline script or style,
so the strict Content-Security-Policy of server.py holds. Elements carry
`data-*` attributes naming what they show, for tests and scrapers.
"""

from __future__ import annotations

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Starling fleet</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <h1>Starling fleet</h1>
  <span id="broker" class="badge" data-field="broker">connecting…</span>
  <span id="counts" class="muted" data-field="counts"></span>
</header>
<main>
  <section>
    <h2>Alerts <span id="alert-count" class="count"></span></h2>
    <ul id="alerts" data-section="alerts"><li class="muted">waiting for data…</li></ul>
  </section>
  <section>
    <h2>Gateways <span id="gateway-count" class="count"></span></h2>
    <div id="gateways" class="cards" data-section="gateways"></div>
  </section>
  <section>
    <h2>Devices <span id="device-count" class="count"></span></h2>
    <table id="devices" data-section="devices">
      <thead><tr><th>gateway</th><th>device</th><th>online</th><th>last seen</th><th>accepted</th>
        <th>rejected</th><th>skipped</th><th>revoked</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
  <footer id="malformed" class="muted" data-field="malformed"></footer>
</main>
</body>
</html>
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1f2328; background: #f6f8fa; }
header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1.2em; background: #24292f; color: #fff; }
header h1 { font-size: 1.2em; margin: 0; }
main { padding: .5em 1.2em 2em; }
h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
.count { color: #57606a; font-weight: normal; }
.muted { color: #8c959f; }
header .muted { color: #d0d7de; }
.badge { display: inline-block; padding: 0 .5em; border-radius: 1em; font-size: .85em; background: #d0d7de; color: #1f2328; }
.badge.ok { background: #1a7f37; color: #fff; }
.badge.warn { background: #bf8700; color: #fff; }
.badge.bad { background: #cf222e; color: #fff; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: .6em .8em; min-width: 300px; }
.card h3 { margin: 0 0 .3em; font-size: 1em; display: flex; gap: .5em; align-items: baseline; }
.card dl { display: grid; grid-template-columns: max-content 1fr; gap: .1em .8em; margin: .3em 0; }
.card dt { color: #57606a; }
.card dd { margin: 0; font-variant-numeric: tabular-nums; }
.id { font-family: ui-monospace, monospace; font-size: .9em; color: #57606a; }
#alerts { list-style: none; padding: 0; margin: 0; }
#alerts li { padding: .3em .6em; margin: .2em 0; border-radius: 4px; background: #fff; border-left: 4px solid #d0d7de; }
#alerts li.critical { border-left-color: #cf222e; }
#alerts li.warning { border-left-color: #bf8700; }
table { border-collapse: collapse; background: #fff; border: 1px solid #d0d7de; }
th, td { padding: .25em .6em; border-bottom: 1px solid #eaeef2; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; font-weight: 600; }
tr.revoked td { background: #ffebe9; }
tr.rejected td.rejected { color: #cf222e; font-weight: 600; }
"""

JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function ago(seconds) {
  if (seconds == null) return "–";
  if (seconds < 1) return "now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function reasons(table) {
  const parts = Object.entries(table || {}).filter(([, n]) => n > 0).map(([r, n]) => r + " " + n);
  return parts.length ? parts.join(", ") : "–";
}

const num = (v, digits) => v == null ? "–" : (digits == null ? String(v) : Number(v).toFixed(digits));
const short = (id) => id ? id.slice(0, 8) : "–";
const STATE_CLASS = { running: "ok", idle: "ok", waiting: "warn", starting: "warn", done: "", stopped: "warn",
                      failed: "bad", offline: "bad" };

function renderAlerts(alerts, now) {
  const list = $("alerts");
  list.replaceChildren();
  $("alert-count").textContent = alerts.length ? "(" + alerts.length + ")" : "";
  if (!alerts.length) { list.append(el("li", { class: "muted" }, "No alerts")); return; }
  for (const a of alerts) {
    list.append(el("li", { class: a.severity, "data-rule": a.rule, "data-subject": a.subject },
      el("b", {}, a.severity + " · " + a.rule.replace(/_/g, " ")), " — ", a.message,
      el("span", { class: "muted" }, a.since ? "  (" + ago(now - a.since) + ")" : "")));
  }
}

function field(dl, name, label, value) {
  dl.append(el("dt", {}, label), el("dd", { "data-field": name }, value));
}

function renderGateways(gateways, now) {
  const box = $("gateways");
  box.replaceChildren();
  $("gateway-count").textContent = "(" + gateways.length + ")";
  if (!gateways.length) { box.append(el("p", { class: "muted" }, "No gateway status received yet")); return; }
  for (const g of gateways) {
    const card = el("div", { class: "card", "data-gateway": g.id });
    card.append(el("h3", {}, el("span", { "data-field": "name" }, g.name || short(g.id)),
      el("span", { class: "id" }, short(g.id)),
      el("span", { class: "badge " + (STATE_CLASS[g.state] || ""), "data-field": "state" }, g.state)));
    const dl = el("dl");
    field(dl, "online", "online", g.online == null ? "run ended" : (g.online ? "yes" : "no"));
    field(dl, "round", "round", num(g.round) + (g.num_rounds != null ? " / " + g.num_rounds : "") +
          (g.state === "idle" && g.next_round_at != null && g.status_time != null
           ? " (next in " + num(Math.max(0, g.next_round_at - g.status_time), 0) + " s)" : ""));
    field(dl, "model", "model", g.model_version == null ? "–" : "v" + g.model_version + " (lineage " + num(g.lineage) + ")");
    field(dl, "participants", "participants", num(g.participants));
    field(dl, "devices", "devices online", num(g.devices_online) + " of " + num(g.enrolled));
    field(dl, "accuracy", "accuracy", num(g.accuracy, 3));
    const L = g.ledger || {};
    field(dl, "ledger-height", "ledger height", num(L.height));
    field(dl, "finality-lag", "finality lag",
          g.ledger ? num(L.lag) + " vertices" + (L.lag ? " (oldest " + num(L.oldest_pending_s, 0) + " s)" : "") : "–");
    field(dl, "peers", "peers", g.ledger ? (L.peers.length ? L.peers.length + ": " + L.peers.map(short).join(", ") : "none") : "–");
    field(dl, "rejections", "rejected", g.rejected_total ? g.rejected_total + " (" + reasons(g.rejections) + ")" : "0");
    field(dl, "updated", "status", ago(g.received != null ? now - g.received : null));
    card.append(dl);
    const chart = el("div", { "data-field": "accuracy-chart" });
    chart.innerHTML = g.accuracy_svg;  // drawn by the server from numbers only (chart.py)
    card.append(chart);
    box.append(card);
  }
}

function renderDevices(devices, total, now) {
  const body = $("devices").tBodies[0];
  body.replaceChildren();
  $("device-count").textContent = "(" + total + (total > devices.length ? ", " + devices.length + " shown" : "") + ")";
  for (const d of devices) {
    const cls = (d.revoked ? "revoked " : "") + (d.rejected_total ? "rejected" : "");
    body.append(el("tr", { class: cls, "data-device": d.device, "data-gateway": d.gateway },
      el("td", { class: "id" }, short(d.gateway)),
      el("td", { class: "id", title: d.device }, d.name ? d.name + " · " + short(d.device) : short(d.device)),
      el("td", { "data-field": "online" }, d.online == null ? "–" : (d.online ? "yes" : "no")),
      el("td", { "data-field": "last-seen" }, ago(d.last_seen != null ? now - d.last_seen : null)),
      el("td", { "data-field": "accepted" }, d.accepted),
      el("td", { class: "rejected", "data-field": "rejected" }, reasons(d.rejected)),
      el("td", { "data-field": "skipped" }, reasons(d.skipped)),
      el("td", { "data-field": "revoked" }, d.revoked || "–")));
  }
}

function render(doc) {
  const now = doc.now;
  const broker = $("broker");
  broker.textContent = doc.broker.connected ? "broker connected" : "broker: " + doc.broker.detail;
  broker.className = "badge " + (doc.broker.connected ? "ok" : "bad");
  $("counts").textContent = doc.messages + " messages · updated " + new Date(now * 1000).toLocaleTimeString();
  renderAlerts(doc.alerts, now);
  renderGateways(doc.gateways, now);
  renderDevices(doc.devices, doc.devices_total, now);
  $("malformed").textContent = doc.malformed.total
    ? "Ignored " + doc.malformed.total + " malformed message" + (doc.malformed.total === 1 ? "" : "s") + ": " + reasons(doc.malformed.by_reason) : "";
  document.body.dataset.version = doc.version;
}

function connect() {
  const source = new EventSource("/events");
  source.onmessage = (e) => render(JSON.parse(e.data));
  source.onerror = () => {
    const broker = $("broker");
    broker.textContent = "dashboard unreachable, retrying…";
    broker.className = "badge bad";
  };
}

connect();
"""
