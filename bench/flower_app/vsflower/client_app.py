"""ClientApp: one SuperNode is one device; it trains and evaluates Starling's IMU CNN on its own windows.

The SuperNode's node config names the device's data file (`data = "<path>.npz"`,
the very file the Starling agent of the same device replays) and a `seed`.
Training is `TrainableModel.train_epochs` (the TFLite `train` signature, full
batches of the graph's size); the reply is the trained weights as float32
arrays, which is what Flower's FedAvg averages.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import from_record, new_model, to_record

app = ClientApp()


def _data(context: Context) -> dict[str, np.ndarray]:
    with np.load(str(context.node_config["data"]), allow_pickle=False) as npz:
        return {
            "x_train": npz["x_train"].astype(np.float32), "y_train": npz["y_train"].astype(np.int32),
            "x_test": npz["x_test"].astype(np.float32), "y_test": npz["y_test"].astype(np.int32),
        }


@app.train()
def train(msg: Message, context: Context) -> Message:
    data = _data(context)
    cfg = msg.content["config"]
    model = new_model()
    model.set_weights(from_record(msg.content["arrays"]))
    # A fresh generator per round: the node's seed and the round number.
    rng = np.random.default_rng([int(context.node_config.get("seed", 0)), int(cfg.get("server-round", 0))])
    losses = model.train_epochs(data["x_train"], data["y_train"], epochs=int(cfg["local-epochs"]),
                                batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]), rng=rng)
    metrics = MetricRecord({"train_loss": float(losses[-1]), "num-examples": int(len(data["x_train"]))})
    content = RecordDict({"arrays": to_record(model.get_weights()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    data = _data(context)
    model = new_model()
    model.set_weights(from_record(msg.content["arrays"]))
    loss, accuracy = model.evaluate(data["x_test"], data["y_test"])
    metrics = MetricRecord({"loss": float(loss), "accuracy": float(accuracy),
                            "num-examples": int(len(data["x_test"]))})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
