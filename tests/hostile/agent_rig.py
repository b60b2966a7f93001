"""An `agent.service.Agent` driven without a broker: messages go in through its MQTT callback
(`Agent._on_message`, what its connection delivers), its own worker thread (`Agent._worker`) handles them.

`Rig.answer_fetch` answers the agent's model fetch (`Downloads.awaited`) with whatever release the test
gives, so a task that gets as far as fetching its model never waits out
`agent.downloads.MODEL_WAIT_S`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import world

from agent.config import AgentConfig
from agent.service import Agent
from hw.synthetic import SyntheticModel, synthetic_data
from mqttlink import Message
from protocol import envelope, schemas, topics
from protocol.errors import ProtocolError


def agent_config(state_dir: Path, host: str = "127.0.0.1", port: int = 1) -> AgentConfig:
    return AgentConfig(name="dev", key=state_dir / "dev.key", state_dir=state_dir, gateway_id=world.GATEWAY.id,
                       gateway_public_key=world.GATEWAY.public_key, broker_host=host, broker_port=port,
                       replay=None, resend_s=3600.0, enroll_retry_s=3600.0)


def make_agent(state_dir: Path, host: str = "127.0.0.1", port: int = 1) -> Agent:
    return Agent(agent_config(state_dir, host, port), world.DEVICE, SyntheticModel(world.SHAPES, seed=1),
                 synthetic_data(64), architecture=world.ARCHITECTURE)


def model_topic(digest: bytes = world.BASE) -> str:
    return topics.model(world.GATEWAY.id, digest.hex())


def refused_total(agent: Agent) -> int:
    return sum(dict(agent.counters.refused_tasks).values())


def snapshot(agent: Agent) -> dict:
    """What the garbage must not change: the state file and the replies waiting for a receipt."""
    state_dir = agent.config.state_dir
    state = state_dir / "state.json"
    return {"state": state.read_bytes() if state.exists() else None,
            "pending": {p.name: p.read_bytes() for p in sorted((state_dir / "pending").glob("*"))}}


def might_be_acted_on(payload: bytes, answered: frozenset[str] = frozenset()) -> bool:
    """True for a gateway-signed task or receipt for this device that the agent would rightly act on (or
    ignore as a duplicate) rather than refuse. Re-signed mutants like that are no garbage: the floods leave
    them out, so that every message sent must be refused and counted."""
    try:
        env = envelope.decode(payload)
        env.verify()
        if env.ctx.sender != world.GATEWAY.public_key or env.ctx.gateway != world.GATEWAY.id:
            return False
        if env.type == "task":
            task = schemas.Task.from_body(env.body)
            if task.device != world.DEVICE.id:
                return False
            if f"{env.ctx.round:06d}-{env.ctx.task}" in answered:
                return True  # a duplicate: ignored, not refused
            return not (task.config.deadline and time.time() > task.config.deadline)
        if env.type == "receipt":
            return schemas.Receipt.from_body(env.body).device == world.DEVICE.id
    except ProtocolError:
        return False
    return False


class Rig:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.worker = threading.Thread(target=agent._worker, args=(self.stop,), daemon=True)
        self.worker.start()

    def deliver(self, topic: str, payload: bytes) -> None:
        self.agent._on_message(Message(topic, payload, time.time()))

    def idle(self, timeout: float = 30.0) -> None:
        """Wait until the worker has taken everything delivered (and a moment for the last one)."""
        deadline = time.monotonic() + timeout
        while not self.agent._inbox.empty():
            assert time.monotonic() < deadline, "the agent's worker did not keep up"
            time.sleep(0.01)
        time.sleep(0.1)

    def wait_refused(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while refused_total(self.agent) < count:
            assert time.monotonic() < deadline, f"{refused_total(self.agent)} refusals, expected {count}"
            time.sleep(0.002)

    def wait_no_saved_tasks(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while list((self.agent.config.state_dir / "tasks").glob("*.task")):
            assert time.monotonic() < deadline, "a saved task was never dropped"
            time.sleep(0.001)

    def answer_fetch(self, release: bytes, timeout: float = 10.0, digest: bytes | None = world.BASE) -> None:
        """Wait for the agent to ask for its base model (`digest`, or any with None), then hand it `release`."""
        deadline = time.monotonic() + timeout
        while (awaited := self.agent.downloads.awaited) is None or (digest is not None and awaited != digest):
            assert time.monotonic() < deadline, "the agent never asked for its model"
            time.sleep(0.0005)
        self.deliver(model_topic(awaited), release)

    def close(self) -> None:
        self.stop.set()
        self.worker.join(10)
