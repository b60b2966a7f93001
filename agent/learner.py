"""Local learning: train or evaluate the task's base model and build the update.

Kept free of MQTT so it can be tested and timed on its own. Training runs
whole mini-batches of the model's fixed batch size, epoch by epoch, and stops
early when the task's deadline is near, reporting only what it really did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from protocol import schemas

from .samples import LocalData

DEADLINE_MARGIN_S = 2.0


@dataclass(frozen=True)
class Outcome:
    """What a device sends back: the update attachment and its example count."""

    attachment: bytes
    examples: int
    metrics: dict[str, float]


def train(model, base: dict[str, np.ndarray], data: LocalData, task: schemas.Task, rng: np.random.Generator) -> Outcome:
    """Train from `base` and return the int8 (or task-codec) weight delta."""
    model.set_weights(base)
    cfg = task.config
    batch = model.batch_size
    n = len(data.x_train)
    stop_at = cfg.deadline - DEADLINE_MARGIN_S if cfg.deadline else float("inf")
    losses: list[float] = []
    seen = 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):  # the runtime pads a short last batch
            if time.time() > stop_at:
                break
            idx = order[start : start + batch]
            losses.append(float(model.train_step(data.x_train[idx], data.y_train[idx], cfg.lr)))
            if epoch == 0:
                seen += len(idx)
    new = model.get_weights()
    delta = {name: new[name] - base[name] for name in base}
    per_epoch = -(-n // batch)
    metrics = {"train_loss": float(np.mean(losses[-per_epoch:])) if losses else 0.0, "steps": float(len(losses))}
    examples = seen  # windows actually trained on: fewer than n only when the deadline cut the first epoch
    return Outcome(schemas.encode_update(delta, metrics, task.codec), examples, metrics)


def evaluate(model, base: dict[str, np.ndarray], data: LocalData) -> Outcome:
    """Evaluate `base` on the device's local test windows (no weights sent back)."""
    model.set_weights(base)
    loss, accuracy = model.evaluate(data.x_test, data.y_test)
    metrics = {"loss": float(loss), "accuracy": float(accuracy)}
    return Outcome(schemas.encode_update({}, metrics), len(data.x_test), metrics)
