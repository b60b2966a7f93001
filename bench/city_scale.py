"""The city tier at scale: how long a city epoch takes to reach every gateway, and what it moves between them.

    python bench/city_scale.py [--gateways 5] [--devices-per-gateway 200] [--rounds 10] [--every 2]
                               [--rule weighted] [--audit-share 1.0] [--timeout-s 1800] [--keep DIR]

The run (all of it real, on this machine): one Mosquitto on a free loopback
port; a genesis naming every gateway (hw/city.py, as `starling-ledger init`);
`--gateways` `starling-gateway` processes (`python -m gateway.cli run`), each
with ledger gossip, the blob exchange and `[city] every, rule, deadline_s,
audit_share`; and `--devices-per-gateway` real agents per gateway in device
pools (`python -m hw.device_pool`, up to `--pool-size` agents a process) with
the synthetic training profile (hw/synthetic.py). The synthetic model has
the IMU CNN's weight names and shapes (firmware_models/imu_cnn: 11,751
float32 parameters, a 47 KB model; int8 updates of 12 KB), so every model
and update on the wire is the size the real fleet's would be; only the
training is a stand-in. The gateways run `--rounds` rounds (FedAvg,
evaluation after every round: the gateway's defaults) with a city epoch every
`--every` rounds (epochs = rounds // every are measured), plus one trailing
round when the last round is an epoch's, so that no gateway exits while a
peer may still fetch its model for that epoch (with every = 1 the trailing
round is an epoch too: merged and counted in the bytes, not measured). Every
child runs with OPENBLAS_NUM_THREADS=1; all of them are stopped here (SIGTERM,
then kill) at the end, at `--timeout-s`, or when this bench gets SIGTERM or
SIGINT. After the rounds the ledgers are gossiped level (hw/city.py `settle`,
as the emulator does); the figures read the union of them.

What it prints (one JSON object on stdout; progress on stderr):

    epoch_latency_s   `from_last_aggregate`, per epoch: (when the last gateway had the city model) -
                      (when the last aggregate that went into it was recorded), i.e. the newest `city`
                      vertex of the epoch (each gateway writes one once it has released the merged model
                      to its devices) minus the newest `aggregate` vertex named by the epoch's
                      `city.offer`s. That covers the last gateway's contribution scoring and offer, the
                      offer's gossip, every gateway noticing it (0.1 s polls), fetching the models it
                      lacks over the blob exchange, merging, releasing and recording. Waiting for the
                      slowest gateway's round is not in it (it starts at that gateway's aggregate), nor
                      is the gateways' rounds drifting apart (`offer_spread_s`, per epoch).
                      `from_last_offer`: the same from the newest `city.offer` vertex. p50/p95
                      interpolate linearly between the epochs' values (with 5 epochs the p95 is close to
                      the max, printed too). Vertex times are the writers' clocks (one machine here).
                      Per epoch also `city_spread_s` (first gateway's city vertex to the last) and the
                      longest fetch of an offered model (`model_fetch_max_s`; all of them in
                      `model_fetch_s`), from the gateways' `blob.fetched` log lines: asking to holding
                      the checked bytes, queueing behind the exchange's other fetches (audits) included.
                      `gateway_epoch_s`: each gateway's own epoch time (result.json: offer, wait, fetch,
                      merge), min and max over the gateways. Goal: from_last_aggregate p95 <= 2 s.
    model_bytes       one encoded model (protocol.schemas.encode_model of the IMU CNN's shapes)
    city_sent_bytes_per_epoch   model bytes the gateways sent for the merges: each pushes its offered
                      model once to every member (result.json city.pushed_bytes, summed) / the epochs in
                      the run: gateways x model_bytes. Goal: <= goal_bytes = 2 x gateways x model_bytes
                      (`bytes_goal_met` compares this).
    city_bytes_per_epoch   model bytes all gateways received from other members for their merges (pushed
                      to them, or fetched when a push was missed: the sum of city.fetched_bytes) / the
                      epochs. Every gateway computes the merge itself, so each receives every other
                      member's model: the broker's fan-out makes this gateways x (gateways - 1) x
                      model_bytes (`mesh_bytes_per_epoch`), above 2 x gateways x model_bytes from 4
                      gateways on. The ledger's gossip is not counted.
    audit_bytes_per_epoch  the bytes the auditors fetched (peers' round inputs and base models, city
                      inputs), apart from the merges', / the epochs in the run; `audit_bytes_per_round` too.
    recompute_s_per_aggregate   `in_run`: the gateways' auditors' own figures (result.json city.audits:
                      seconds per recompute, fetching excluded, peers' round aggregates and city merges
                      together, under the run's load): the mean of the gateways' means, the largest p95.
                      `offline`: after the run, every `aggregate` and `city` vertex recomputed here, on
                      this otherwise idle machine (gateway.recompute.verify_body and
                      gateway.city_merge.verify_city, what `starling-ledger audit --recompute` runs),
                      its blobs read into memory first so only the recompute is timed: mean, p95, max
                      per aggregate and per city merge, with the verdicts counted.
    one_model_per_epoch   every gateway wrote a `city` vertex for every measured epoch, all of an epoch's
                      name one output digest, and the gateways' result.json epochs agree.
    epochs_merged (measured epochs every gateway merged), epochs_in_run, audits (the auditors' counts,
    summed), left_out and flagged (should be empty), gateway_states, ledgers_agree, finished, seconds
    (the whole bench, wall).

The same audit from the command line: `starling-ledger audit --recompute --db <gw>/ledger.db --blobs
<gw-1>/blobs ... --blobs <gw-N>/blobs` (`--keep DIR` keeps the run folder for it). The gateways keep
every round's blobs here (`[blobs] keep` above the rounds), so the offline recompute finds them all.
Exit 0 when every gateway finished its rounds and merged every measured epoch, else 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hw.broker import Broker
from hw.city import GatewayLedger, settle, write_genesis
from hw.emulate import stop_processes
from hw.synthetic import write_manifest
from hw.toml_files import write_toml
from protocol.keys import Identity

GOAL_LATENCY_P95_S = 2.0
SETTLE_S = 30.0
STOP_S = 30.0  # SIGTERM, then this long before kill -9


def _say(text: str) -> None:
    print(f"city_scale: {text}", file=sys.stderr, flush=True)


def imu_cnn_shapes() -> dict[str, tuple[int, ...]]:
    manifest = json.loads((ROOT / "firmware_models" / "imu_cnn" / "manifest.json").read_text())
    return {w["name"]: tuple(w["shape"]) for w in manifest["weights"]}


def percentiles(values: list[float], digits: int = 3) -> dict[str, float | None]:
    """p50 and p95 (linear interpolation between the values), max and how many."""
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    import numpy as np

    return {"p50": round(float(np.percentile(values, 50)), digits),
            "p95": round(float(np.percentile(values, 95)), digits), "max": round(max(values), digits), "n": len(values)}


# --- the run -----------------------------------------------------------------------------------


class Run:
    """The broker, gateways and device pools of one bench run, all started and stopped here."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.epochs = args.rounds // args.every
        # A trailing round after the last measured epoch (with every = 1 it is an epoch too, merged but not
        # measured): no gateway exits while a peer may still fetch its model for that epoch.
        self.num_rounds = args.rounds + 1 if args.rounds % args.every == 0 else args.rounds
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                                   if p),
                    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.names = [f"gw-{i + 1}" for i in range(args.gateways)]
        self.homes = [workdir / "gateways" / name for name in self.names]
        self.identities: list[Identity] = []
        self.gateways: list[subprocess.Popen] = []
        self.pools: list[subprocess.Popen] = []
        self.logs: list[Any] = []

    def prepare(self, broker: Broker) -> None:
        args, workdir = self.args, self.workdir
        for home in self.homes:
            home.mkdir(parents=True)
            identity = Identity.generate()
            identity.save(home / "gateway.key")
            self.identities.append(identity)
        self.genesis = write_genesis(workdir / "city", "city-scale", [i.public_key for i in self.identities])
        self.manifest = write_manifest(workdir / "model", imu_cnn_shapes(), seed=0)
        for name, home in zip(self.names, self.homes):
            write_toml(home / "gateway.toml", {
                "gateway": {"name": name, "key": str(home / "gateway.key"), "state_dir": str(home)},
                "broker": {"host": broker.host, "port": broker.port},
                "strategy": {"name": "FedAvg", "params": {}},
                "rounds": {"num_rounds": self.num_rounds, "deadline_s": args.round_deadline_s, "epochs": 1,
                           "batch_size": 32, "lr": 0.2, "min_devices": args.devices_per_gateway,
                           "wait_devices_s": args.wait_devices_s},
                "enrollment": {"policy": "open"},
                "model": {"manifest": str(self.manifest)},
                # Every gateway starts from the same genesis at once: no checkpoint to wait for.
                "ledger": {"genesis": str(self.genesis), "gossip": True, "bootstrap_s": 0.0},
                "blobs": {"keep": self.num_rounds + 8},  # every round's blobs stay, for the offline recompute
                "city": {"every": args.every, "rule": args.rule, "deadline_s": args.city_deadline_s,
                         "audit_share": args.audit_share},
            })
        devices = []
        for g, identity in enumerate(self.identities):
            for d in range(args.devices_per_gateway):
                home = workdir / "devices" / f"{self.names[g]}-d{d:04d}"
                home.mkdir(parents=True)
                write_toml(home / "agent.toml", {
                    "device": {"name": home.name, "key": str(home / "device.key"), "state_dir": str(home / "state")},
                    "gateway": {"id": identity.id, "public_key": identity.public_key.hex()},
                    "broker": {"host": broker.host, "port": broker.port},
                    "data": {"replay": str(workdir / "none.npz")},  # the synthetic profile reads no data
                })
                devices.append({"config": str(home / "agent.toml"), "seed": len(devices) + 1})
        self.pool_files = []
        for p in range(0, len(devices), args.pool_size):
            path = workdir / "pools" / f"pool-{p // args.pool_size + 1}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({"model": "synthetic", "manifest": str(self.manifest),
                                        "devices": devices[p:p + args.pool_size]}))
            self.pool_files.append(path)

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(out)
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)

    def start(self) -> None:
        for name, home in zip(self.names, self.homes):
            self.gateways.append(self._spawn([sys.executable, "-m", "gateway.cli", "run", "--config",
                                              str(home / "gateway.toml")], self.workdir / "logs" / f"{name}.log"))
        for path in self.pool_files:
            self.pools.append(self._spawn([sys.executable, "-m", "hw.device_pool", "--pool", str(path)],
                                          self.workdir / "logs" / f"{path.stem}.log"))

    def wait(self, timeout_s: float, stop: threading.Event) -> bool:
        """Until every gateway has exited (True), or the time is up or we are stopped (False); progress every 15 s."""
        deadline = time.monotonic() + timeout_s
        progress = Progress([self.workdir / "logs" / f"{name}.log" for name in self.names])
        next_say = time.monotonic() + 15
        while any(p.poll() is None for p in self.gateways):
            if time.monotonic() > deadline or stop.is_set():
                return False
            if any(p.poll() is not None for p in self.pools):
                _say("a device pool exited early: " + ", ".join(
                    str(f) for f, p in zip(self.pool_files, self.pools) if p.poll() is not None))
                return False
            if time.monotonic() >= next_say:
                next_say += 15
                _say(progress.line())
            time.sleep(0.5)
        _say(progress.line())
        return True

    def stop(self) -> None:
        stop_processes(self.gateways, STOP_S)  # SIGTERM: each still writes result.json
        stop_processes(self.pools, STOP_S)
        for out in self.logs:
            out.close()


class Progress:
    """Each gateway's last finished round and last merged epoch, read from the new lines of its log."""

    ROUND = re.compile(rb"round\.done round=(\d+)")
    EPOCH = re.compile(rb"city\.merged epoch=(\d+)")

    def __init__(self, logs: list[Path]) -> None:
        self.logs = logs
        self.offsets = [0] * len(logs)
        self.rounds = [0] * len(logs)
        self.epochs = [0] * len(logs)

    def line(self) -> str:
        for i, path in enumerate(self.logs):
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets[i])
                    data = fh.read()
            except OSError:
                continue
            cut = data.rfind(b"\n") + 1
            self.offsets[i] += cut
            for m in self.ROUND.finditer(data[:cut]):
                self.rounds[i] = max(self.rounds[i], int(m.group(1)))
            for m in self.EPOCH.finditer(data[:cut]):
                self.epochs[i] = max(self.epochs[i], int(m.group(1)))
        return "rounds done " + " ".join(map(str, self.rounds)) + "; epochs merged " + " ".join(map(str, self.epochs))


# --- the figures --------------------------------------------------------------------------------


def read_vertices(dbs: list[Path]) -> dict[str, dict[bytes, Any]]:
    """The `aggregate`, `city.offer` and `city` vertices of every ledger (the union, by id)."""
    from ledger.kinds import AGGREGATE, CITY, CITY_OFFER
    from ledger.store import Ledger

    out: dict[str, dict[bytes, Any]] = {AGGREGATE: {}, CITY_OFFER: {}, CITY: {}}
    for db in dbs:
        if not db.exists():
            continue
        with Ledger.open(db, read_only=True) as ledger:
            for vertex in ledger.vertices_of(AGGREGATE, CITY_OFFER, CITY):
                out[vertex.kind].setdefault(vertex.id, vertex)
    return out


def epoch_figures(vertices: dict[str, dict[bytes, Any]], epochs: int, gateways: int) -> dict[str, Any]:
    """Per epoch: the latencies (module docstring), how many gateways merged it and on how many models."""
    from ledger.kinds import AGGREGATE, CITY, CITY_OFFER

    rows = []
    for epoch in range(1, epochs + 1):
        offers: dict[str, Any] = {}
        for v in sorted(vertices[CITY_OFFER].values(), key=lambda v: v.time):
            if v.body["epoch"] == epoch:
                offers.setdefault(v.creator_id, v)  # each gateway's first offer counts
        merges: dict[str, Any] = {}
        for v in sorted(vertices[CITY].values(), key=lambda v: v.time):
            if v.body["epoch"] == epoch:
                merges.setdefault(v.creator_id, v)
        aggregates = [vertices[AGGREGATE].get(o.body["aggregate"]) for o in offers.values()]
        row: dict[str, Any] = {"epoch": epoch, "offers": len(offers), "merged_by": len(merges),
                               "models": len({v.body["output"] for v in merges.values()})}
        if offers and merges and all(a is not None for a in aggregates):
            last_aggregate = max(a.time for a in aggregates)
            last_offer = max(o.time for o in offers.values())
            first_city, last_city = min(v.time for v in merges.values()), max(v.time for v in merges.values())
            row.update({"from_last_aggregate_s": round(last_city - last_aggregate, 3),
                        "from_last_offer_s": round(last_city - last_offer, 3),
                        "city_spread_s": round(last_city - first_city, 3),  # first gateway's city model to last
                        "offer_spread_s": round(last_offer - min(o.time for o in offers.values()), 3)})
        rows.append(row)
    complete = [r for r in rows if r["merged_by"] == gateways and "from_last_aggregate_s" in r]
    return {
        "per_epoch": rows,
        "from_last_aggregate": percentiles([r["from_last_aggregate_s"] for r in complete]),
        "from_last_offer": percentiles([r["from_last_offer_s"] for r in complete]),
        "epochs_merged": len(complete),
        "one_model": len(complete) == epochs and all(r["models"] == 1 for r in rows),
    }


FETCHED = re.compile(r"blob\.fetched digest=([0-9a-f]+) holder=\S+ bytes=\d+ seconds=([0-9.]+)")


def model_fetch_seconds(vertices: dict[str, dict[bytes, Any]], logs: list[Path]) -> dict[int, list[float]]:
    """Epoch -> the seconds each fetch of one of its offered models took at the fetching gateway (its
    `blob.fetched` log lines: from asking to holding the checked bytes, queueing behind other fetches included)."""
    from ledger.kinds import CITY_OFFER

    epoch_of = {v.body["model"].hex()[:16]: v.body["epoch"] for v in vertices[CITY_OFFER].values()}
    out: dict[int, list[float]] = {}
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        for digest, seconds in FETCHED.findall(text):
            if digest[:16] in epoch_of:
                out.setdefault(epoch_of[digest[:16]], []).append(float(seconds))
    return out


def offline_recompute(vertices: dict[str, dict[bytes, Any]], folders: list[Path]) -> dict[str, Any]:
    """Every aggregate and city vertex recomputed here, its blobs read first: seconds per recompute."""
    from gateway.blobs import BlobStore
    from gateway.city_merge import verify_city
    from gateway.recompute import verify_body
    from ledger.kinds import AGGREGATE, CITY

    logging.getLogger("flwr").setLevel(logging.WARNING)  # not a line per recompute
    stores = [BlobStore(f, read_only=True) for f in folders if f.is_dir()]

    def read(digest: bytes) -> bytes | None:
        return next((data for s in stores if (data := s.get(digest)) is not None), None)

    out: dict[str, Any] = {}
    for kind, verify in ((AGGREGATE, verify_body), (CITY, verify_city)):
        seconds, verdicts = [], {}
        for vertex in vertices[kind].values():
            body = vertex.body
            if kind == AGGREGATE:
                digests = [body["base"], *(d for d, _ in body["inputs"])] if "rule" in body else [body["base"]]
            else:
                digests = [m for _, m, _ in body["inputs"]]
            blobs = {d: data for d in dict.fromkeys(digests) if (data := read(d)) is not None}
            started = time.perf_counter()
            verdict = verify(body, blobs.get)
            took = time.perf_counter() - started
            verdicts[verdict.status] = verdicts.get(verdict.status, 0) + 1
            if verdict.status in ("match", "mismatch"):
                seconds.append(took)
        spread = percentiles(seconds, 4)
        out["aggregates" if kind == AGGREGATE else "cities"] = {
            "count": len(vertices[kind]), "verdicts": verdicts,
            "mean_s": round(sum(seconds) / len(seconds), 4) if seconds else None,
            "p95_s": spread["p95"], "max_s": spread["max"]}
    return out


def figures(run: Run, results: list[dict[str, Any]], settled: dict[str, Any], started: float) -> dict[str, Any]:
    import numpy as np

    from protocol.schemas import encode_model

    args, gateways = run.args, run.args.gateways

    model_bytes = len(encode_model({k: np.zeros(s, np.float32) for k, s in imu_cnn_shapes().items()}))
    vertices = read_vertices([home / "ledger.db" for home in run.homes])
    epochs = epoch_figures(vertices, run.epochs, gateways)
    fetches = model_fetch_seconds(vertices, [run.workdir / "logs" / f"{name}.log" for name in run.names])
    fetches = {e: got for e, got in fetches.items() if e <= run.epochs}  # the measured epochs'
    for row in epochs["per_epoch"]:
        got = fetches.get(row["epoch"], [])
        row["model_fetches"] = len(got)
        row["model_fetch_max_s"] = round(max(got), 3) if got else None
    cities = [r.get("city") or {} for r in results]
    audits = [c.get("audits") or {} for c in cities]
    city_bytes = sum(c.get("fetched_bytes", 0) for c in cities)
    sent_bytes = sum(c.get("pushed_bytes", 0) for c in cities)
    audit_bytes = sum(a.get("fetched_bytes", 0) for a in audits)
    # result.json's own epochs: every gateway on one model per epoch there too
    models_by_epoch: dict[int, set[str]] = {}
    for c in cities:
        for e in c.get("epochs", []):
            models_by_epoch.setdefault(e["epoch"], set()).add(e["model"])
    # the bytes are counted over the whole run: every epoch the gateways merged (the trailing one too, if any)
    merged = max(1, len(models_by_epoch))
    results_agree = (len(models_by_epoch) >= run.epochs and all(len(m) == 1 for m in models_by_epoch.values())
                     and all(len(c.get("epochs", [])) >= run.epochs for c in cities))
    tier_seconds = {}
    for e in range(1, run.epochs + 1):
        got = [x["seconds"] for c in cities for x in c.get("epochs", []) if x["epoch"] == e]
        tier_seconds[e] = {"min": min(got), "max": max(got)} if got else None
    means = [a["recompute_s"] for a in audits if a.get("recompute_s") is not None]
    p95s = [a["recompute_p95_s"] for a in audits if a.get("recompute_p95_s") is not None]
    goal_bytes = 2 * gateways * model_bytes
    latency = epochs["from_last_aggregate"]
    return {
        "gateways": gateways, "devices_per_gateway": args.devices_per_gateway,
        "devices": gateways * args.devices_per_gateway, "rounds": run.num_rounds, "every": args.every,
        "epochs": run.epochs, "epochs_merged": epochs["epochs_merged"], "rule": args.rule,
        "audit_share": args.audit_share,
        "model": {"shapes": "imu_cnn (synthetic training)", "params": int(sum(math.prod(s) for s in
                                                                             imu_cnn_shapes().values()))},
        "model_bytes": model_bytes,
        "epoch_latency_s": {"from_last_aggregate": latency, "from_last_offer": epochs["from_last_offer"],
                            "per_epoch": epochs["per_epoch"],
                            "model_fetch_s": percentiles([x for got in fetches.values() for x in got]),
                            # each gateway's own epoch time (offer, wait, fetch, merge): the fastest is the
                            # last offerer's, which waited for nobody
                            "gateway_epoch_s": tier_seconds},
        "goal_latency_p95_s": GOAL_LATENCY_P95_S,
        "latency_goal_met": latency["p95"] is not None and latency["p95"] <= GOAL_LATENCY_P95_S,
        "city_sent_bytes_per_epoch": round(sent_bytes / merged),
        "city_bytes_per_epoch": round(city_bytes / merged),
        "city_fetched_bytes_by_gateway": {n: c.get("fetched_bytes") for n, c in zip(run.names, cities)},
        "goal_bytes": goal_bytes,
        "bytes_goal_met": bool(models_by_epoch) and sent_bytes / merged <= goal_bytes,
        "epochs_in_run": len(models_by_epoch),  # what the bytes per epoch divide by
        "mesh_bytes_per_epoch": gateways * (gateways - 1) * model_bytes,
        "audit_bytes_per_epoch": round(audit_bytes / merged),
        "audit_bytes_per_round": round(audit_bytes / run.num_rounds),
        "recompute_s_per_aggregate": {
            "in_run": {"mean_s": round(sum(means) / len(means), 4) if means else None,
                       "p95_s": max(p95s) if p95s else None},
            "offline": offline_recompute(vertices, [home / "blobs" for home in run.homes]),
        },
        "audits": {k: sum(a.get(k, 0) or 0 for a in audits)
                   for k in ("checked", "match", "mismatch", "unverifiable", "missing_inputs", "pending")},
        "one_model_per_epoch": epochs["one_model"] and results_agree,
        "left_out": sorted({f"epoch {x['epoch']}: {o['gateway'][:8]} {o['reason']}" for c in cities
                            for x in c.get("epochs", []) for o in x.get("left_out", [])}),
        "flagged": sorted({g for c in cities for g in c.get("flagged", {})}),
        "gateway_states": {n: r.get("state") for n, r in zip(run.names, results)},
        "ledgers_agree": settled.get("agreed"),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=5)
    parser.add_argument("--devices-per-gateway", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10, help="rounds with epochs in them (one more runs after)")
    parser.add_argument("--every", type=int, default=2, help="rounds per city epoch")
    parser.add_argument("--rule", default="weighted", choices=("weighted", "median"))
    parser.add_argument("--audit-share", type=float, default=1.0)
    parser.add_argument("--city-deadline-s", type=float, default=120.0, help="[city] deadline_s")
    parser.add_argument("--round-deadline-s", type=float, default=60.0, help="[rounds] deadline_s")
    parser.add_argument("--wait-devices-s", type=float, default=300.0, help="[rounds] wait_devices_s")
    parser.add_argument("--pool-size", type=int, default=100, help="agents per device pool process")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="the rounds are stopped after this")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (new or empty) and keep it: keys, configs, logs, "
                                                      "ledgers, blobs")
    args = parser.parse_args()
    if args.gateways < 2 or args.devices_per_gateway < 1 or not 1 <= args.every <= args.rounds:
        parser.error("needs --gateways >= 2, --devices-per-gateway >= 1 and 1 <= --every <= --rounds")
    started = time.monotonic()
    if args.keep:
        workdir = Path(args.keep).resolve()
        if workdir.exists() and any(workdir.iterdir()):
            parser.error(f"--keep {workdir}: not empty")
        workdir.mkdir(parents=True, exist_ok=True)
        return bench(args, workdir, started)
    with tempfile.TemporaryDirectory(prefix="starling-city-scale-") as tmp:
        return bench(args, Path(tmp), started)


def bench(args: argparse.Namespace, workdir: Path, started: float) -> int:
    run = Run(args, workdir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Broker(workdir / "broker", kind="mosquitto") as broker:
        run.prepare(broker)
        _say(f"{args.gateways} gateways x {args.devices_per_gateway} devices ({len(run.pool_files)} device pools), "
             f"{run.num_rounds} rounds, a city epoch every {args.every} ({run.epochs} epochs, {args.rule}), "
             f"audit share {args.audit_share}, Mosquitto on 127.0.0.1:{broker.port}, run folder {workdir}")
        finished = False
        try:
            run.start()
            finished = run.wait(args.timeout_s, stop)
            if not finished:
                _say("stopping the gateways early (timeout, a pool exited, or SIGTERM/SIGINT)")
        finally:
            run.stop()
        results = []
        for home in run.homes:
            path = home / "result.json"
            results.append(json.loads(path.read_text()) if path.exists() else {})
        _say("gossiping the ledgers level")
        try:
            if stop.is_set():
                raise InterruptedError("stopped")
            settled = settle([GatewayLedger(n, h / "ledger.db", h / "gateway.key") for n, h in zip(run.names, run.homes)
                              if (h / "ledger.db").exists()], broker.host, broker.port, timeout_s=SETTLE_S)
        except Exception as exc:  # noqa: BLE001 - the figures come from the union of the ledgers anyway
            settled = {"agreed": False, "error": f"{type(exc).__name__}: {exc}"}
    _say("reading the ledgers and recomputing every aggregate")
    out = figures(run, results, settled, started)
    out["finished"] = finished
    print(json.dumps(out))
    ok = finished and all(r.get("state") == "done" for r in results) and out["epochs_merged"] == run.epochs
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
