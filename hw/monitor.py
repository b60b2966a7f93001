"""The emulator's view of a running fleet: every gateway's status, the devices' statuses, the ledger gossip.

    monitor = Monitor(network.endpoints(), gateways, rounds, started)   # one MQTT connection per broker
    monitor.rounds_done("gw-1")      # the last round gw-1 finished (what `at_round` faults wait for)
    monitor.close()

It prints one progress line per finished round and per city epoch (the
status's `city`, when the gateways run the city tier), notes when each round
ended (`t`, seconds since the run started) and samples each gateway's ledger
height and finality lag over time, for the report.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from mqttlink import Connection, ConnectionOptions
from protocol import cbor, topics

from .fleet import GatewayRun

# A gateway in these states will report nothing more for its last round. Not "stopped": a stopped
# gateway that starts again re-opens the round its stop interrupted, and evaluates it then.
FINISHED = ("done", "failed")



LEDGER_VV = "starling/ledger/vv/+"



class Monitor:
    """Follows every gateway's retained status, the devices' statuses and the ledger gossip.

    Prints one line per finished round (prefixed by the gateway's name in a city), notes when
    each round ended (`t`, seconds since `started`) and samples every gateway's ledger height and
    finality lag over time.
    """

    def __init__(self, endpoints: list[tuple[str, int]], gateways: list[GatewayRun], rounds: int, started: float,
                 stream=sys.stderr) -> None:
        self.rounds = rounds
        self.started = started
        self.stream = stream
        self.names = {g.identity.id: g.name for g in gateways}
        self.prefix = len(gateways) > 1
        self.lock = threading.RLock()  # one paho thread per broker feeds it
        self.seen = {g.identity.id: -1 for g in gateways}
        self.status: dict[str, dict[str, Any]] = {}
        self.round_t: dict[str, dict[int, float]] = {g.identity.id: {} for g in gateways}
        self.series: dict[str, list[tuple[float, int, int]]] = {g.identity.id: [] for g in gateways}
        self.devices: dict[str, dict[str, Any]] = {}  # device id -> its latest status at its gateway
        self.epochs = {g.identity.id: 0 for g in gateways}  # the last city epoch shown, per gateway
        subscriptions = [(LEDGER_VV, 0)]
        for g in gateways:
            subscriptions += [(topics.status(g.identity.id), 1), (topics.device_status(g.identity.id, "+"), 1)]
        self.connections = []
        for i, (host, port) in enumerate(endpoints):  # one per broker when every gateway has its own
            options = ConnectionOptions(f"emu-{os.getpid()}-{i}", host, port, clean_session=True,
                                        subscriptions=tuple(subscriptions), log_name="starling.emulate.monitor",
                                        reconnect_min_s=0.2, reconnect_max_s=2.0)  # back quickly after a restart
            self.connections.append(Connection(options, deliver=self._on_message).start())

    def rounds_done(self, gateway_name: str) -> int:
        """The last round the named gateway finished (-1 before any)."""
        ids = [gid for gid, name in self.names.items() if name == gateway_name]
        return self.seen.get(ids[0], -1) if ids else -1

    def _t(self, when: Any) -> float:
        return round((when if isinstance(when, (int, float)) else time.time()) - self.started, 3)

    def _sample(self, gateway: str, when: Any, ledger: Any) -> None:
        if gateway not in self.series or not isinstance(ledger, dict):
            return
        height, lag = ledger.get("height"), ledger.get("lag")
        if isinstance(height, int) and isinstance(lag, int):
            with self.lock:
                self.series[gateway].append((self._t(when), height, lag))

    def _on_message(self, msg) -> None:
        try:
            if msg.topic.startswith("starling/ledger/vv/"):
                doc = cbor.loads(msg.payload)
                if isinstance(doc, dict):
                    self._sample(msg.topic.rsplit("/", 1)[-1], doc.get("time"), doc)
                return
            doc = json.loads(msg.payload)
        except Exception:  # noqa: BLE001 (whatever is on the wire must not stop the monitor)
            return
        if not isinstance(doc, dict):
            return
        if "/status/device/" in msg.topic:
            with self.lock:
                self.devices[msg.topic.rsplit("/", 1)[-1]] = doc
            return
        with self.lock:
            self._on_gateway_status(doc)

    def _on_gateway_status(self, doc: dict[str, Any]) -> None:
        gateway = doc.get("gateway")
        if gateway not in self.seen:
            return
        self.status[gateway] = doc
        self._sample(gateway, doc.get("time"), doc.get("ledger"))
        history = doc.get("history", [])
        finished = doc.get("state") in FINISHED
        for i, record in enumerate(history):
            # A round is shown once its evaluation is in (or nothing more will come for it): its accuracy, or
            # for a model without one (a reconstruction model) its loss.
            evaluated = record["accuracy"] is not None or record.get("loss") is not None
            complete = evaluated or i + 1 < len(history) or finished
            if record["round"] > self.seen[gateway] and complete:
                self.seen[gateway] = record["round"]
                self.round_t[gateway].setdefault(record["round"], self._t(doc.get("time")))
                acc, loss = record["accuracy"], record.get("loss")
                figure = f"accuracy {acc:.3f}" if acc is not None else \
                    f"loss {loss:.4f}" if loss is not None else "accuracy   -  "
                print(
                    f"  {self.names[gateway] + ' ' if self.prefix else ''}round {record['round']}/{self.rounds}"
                    f"  {figure}  participants {record['participants']}"
                    f"  rejected {record['rejected']}  {record['seconds']:.1f} s",
                    file=self.stream, flush=True,
                )
        city = doc.get("city")
        for record in (city.get("epochs") or []) if isinstance(city, dict) else []:
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) \
                    and record["epoch"] > self.epochs[gateway]:
                self.epochs[gateway] = record["epoch"]
                self._print_epoch(gateway, record)

    def _print_epoch(self, gateway: str, record: dict[str, Any]) -> None:
        """One line per city epoch a gateway recorded: its city model, the inputs merged and those left out."""
        def name(gateway_id: Any) -> str:
            return self.names.get(gateway_id, str(gateway_id)[:8])

        inputs = [name(i.get("gateway")) for i in record.get("inputs") or [] if isinstance(i, dict)]
        left = [f"{name(x.get('gateway'))} ({x.get('reason')})" for x in record.get("left_out") or []
                if isinstance(x, dict)]
        print(f"  {self.names[gateway]} city epoch {record['epoch']} (round {record.get('round')})  model "
              f"{str(record.get('model'))[:12]}  inputs {' '.join(inputs) or '-'}  left out {', '.join(left) or '-'}",
              file=self.stream, flush=True)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

