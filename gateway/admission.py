"""Stage 2 of the reply check: a pure decision against the round book.

`admit(book, auth, now)` reads the book (open tasks, what was accepted and
closed, the current round, the exchange an interrupted run left open) and
returns what to do with an authenticated reply. It changes nothing: the
book applies the outcome (rounds.py), so the decision can be tested and
reasoned about on its own.
"""

from __future__ import annotations

import math
from typing import Protocol

from protocol.tensors import TOPK, topk_count

from .ingest import Accepted, Authenticated, Deferred, Duplicate, OpenTask, Rejected, Skipped


class RoundView(Protocol):
    """What admission reads of the round book."""

    current_round: int
    evaluate_metrics: frozenset[str]

    def open_task(self, device: str, task: str) -> OpenTask | None: ...
    def accepted_reply(self, device: str, task: str) -> tuple[int, bytes] | None: ...  # (round, update digest)
    def closed_in(self, device: str, task: str) -> int | None: ...  # round of a task closed without a reply
    def is_reopening(self, task: str) -> bool: ...  # the exchange an interrupted run left open
    def is_revoked(self, key: bytes) -> bool: ...


def admit(book: RoundView, auth: Authenticated, now: float) -> Accepted | Skipped | Duplicate | Deferred | Rejected:
    """Match an authenticated reply to its open task; every rule in one place, cheapest first."""
    env, reply, metrics = auth.envelope, auth.reply, auth.metrics
    device, task_id = env.ctx.sender_id, env.ctx.task
    if book.is_revoked(env.ctx.sender):  # an ingest worker's copy of the revocations may lag by a moment
        return Rejected("revoked", device, "the device's key was revoked", env)

    def refuse(reason: str, detail: str) -> Rejected:  # from here on the sender is authenticated
        return Rejected(reason, device, detail, env, authenticated=True)

    accepted = book.accepted_reply(device, task_id)
    if accepted is not None:
        accepted_round, digest = accepted
        if digest != reply.digest:  # a second, different answer: a device bug or a lie
            return refuse("conflicting_reply", f"task {task_id} was answered with another update")
        if accepted_round >= book.current_round:  # a re-send while its receipt was on the way
            return Duplicate(device, accepted_round, env)
        # Still acknowledged: an honest device whose receipts were all lost stops re-sending.
        return Rejected("replay", device, f"task {task_id} was answered in round {accepted_round}", env,
                        authenticated=True, already_accepted=True)
    task = book.open_task(device, task_id)
    if task is None:
        if book.is_reopening(task_id):  # after a restart, before its exchange re-opened: keep it
            return Deferred(device, task_id)
        if book.closed_in(device, task_id) is not None:
            return refuse("late", f"task {task_id} closed before this reply")
        if env.ctx.round < book.current_round:
            return refuse("stale_round", f"round {env.ctx.round} is over")
        return refuse("not_selected", f"no open task {task_id} for this device")
    if env.ctx.round != task.round:
        return refuse("wrong_round", f"round {env.ctx.round}, task is round {task.round}")
    if env.ctx.base != task.base:
        return refuse("wrong_base", "built on another model")
    if now > task.deadline:
        return refuse("late", f"{now - task.deadline:.1f} s after the deadline")
    if reply.skip:  # the round need not wait for this device any longer
        return Skipped(task, env, reply.skip)
    if task.kind == "train":
        if auth.shapes != {k: v.shape for k, v in task.base_weights.items()}:
            return refuse("wrong_shape", "delta does not match the model's weights")
        wrong = codec_mismatch(task, auth)
        if wrong:
            return refuse("wrong_codec", wrong)
        if set(metrics) != task.train_metrics or reply.examples < 1:
            return refuse("wrong_metrics", f"train metrics {sorted(metrics)}")
    else:
        if auth.shapes or set(metrics) != book.evaluate_metrics or reply.examples < 1:
            return refuse("wrong_metrics", f"evaluate metrics {sorted(metrics)}")
        if not 0.0 <= metrics.get("accuracy", 0.0) <= 1.0 or any(metrics[k] < 0 for k in metrics):
            return refuse("wrong_metrics", "accuracy, loss or error out of range")
    return Accepted(task, env, metrics, reply.examples)


def codec_mismatch(task: OpenTask, auth: Authenticated) -> str:
    """Why the update is not encoded as its task asked ("" if it is): another codec in any tensor, or with
    topk more entries than the task's density allows. A device asked for a sparse update that sends a dense
    one (or a denser one) would get more than its share of the uplink, and of the aggregate's attention."""
    codecs = sorted({codec for codec, _ in auth.encodings.values()} - {task.codec})
    if codecs:
        return f"the task asked for {task.codec}, the update has {', '.join(codecs)}"
    if task.codec == TOPK:
        for name, (_, sent) in auth.encodings.items():
            allowed = topk_count(math.prod(auth.shapes[name]), task.density)
            if sent > allowed:
                return f"tensor {name!r}: {sent} entries, the task's density {task.density} allows {allowed}"
    return ""
