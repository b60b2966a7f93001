"""ServerApp: Flower's Message-API FedAvg over the SuperLink's grid, nothing of Starling's but the model.

Every selected node trains each round (fraction 1.0) and then evaluates the
new global model on its local test windows (fraction 1.0); accuracy is the
examples-weighted mean, as Starling's gateway computes it. `evaluate_fn`
(Flower's server-side hook, called before round 1 and after each round's
evaluation) only records the time: the bench cuts the byte counts at those
instants. Results go to the run config's `out` file as JSON.
"""

from __future__ import annotations

import json
import os
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .task import new_model, to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds = int(cfg["num-server-rounds"])
    nodes = int(cfg["min-nodes"])
    marks: dict[int, float] = {}
    out = str(cfg.get("out", ""))

    def mark(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        marks[server_round] = time.time()
        if out:  # one line per finished round, for the bench's progress output
            with open(out + ".progress", "a") as fh:
                fh.write(json.dumps({"round": server_round, "time": marks[server_round]}) + "\n")
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=nodes,
                      min_evaluate_nodes=nodes, min_available_nodes=nodes)
    train_config = ConfigRecord({"lr": float(cfg["lr"]), "local-epochs": int(cfg["local-epochs"]),
                                 "batch-size": int(cfg["batch-size"])})
    result = strategy.start(grid=grid, initial_arrays=to_record(new_model().get_weights()),
                            num_rounds=rounds, timeout=float(cfg["round-timeout-s"]),
                            train_config=train_config, evaluate_fn=mark)
    if out:
        evaluated = result.evaluate_metrics_clientapp
        trained = result.train_metrics_clientapp
        doc = {
            "marks": {str(r): t for r, t in sorted(marks.items())},
            "accuracy": {str(r): float(m["accuracy"]) for r, m in sorted(evaluated.items())},
            "loss": {str(r): float(m["loss"]) for r, m in sorted(evaluated.items())},
            "train_loss": {str(r): float(m["train_loss"]) for r, m in sorted(trained.items())
                           if "train_loss" in m},
            "pid": os.getpid(),
        }
        tmp = out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, out)
