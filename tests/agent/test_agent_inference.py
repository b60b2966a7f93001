"""The real agent process uses what it learns: it samples a (replayed) sensor, takes a trained release from its
gateway, and every half second hands the model's results on its newest windows to local clients and to an
MQTT topic, each equal to `TrainableModel.predict` on the same windows cut from its sample store."""

from __future__ import annotations

import json
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

import firmware_models
from firmware_models.runtime import TrainableModel
from hw.broker import Broker, _child_env
from hw.datasets import load_watch_devices
from protocol import envelope, schemas, topics
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
RATE_HZ = 1000  # the recording replayed twenty times faster than it was sampled: windows within seconds
GATEWAY = Identity.from_seed(b"I" * 32)
TOPIC = "home/imu/inference"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def rows(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from samples").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def window(db: Path, start: float, end: float) -> np.ndarray:
    """The samples of one window, as the agent cut it: every row from its first sample time to its last."""
    with sqlite3.connect(db) as conn:
        blobs = conn.execute("select v from samples where t >= ? and t <= ? order by seq", (start, end)).fetchall()
    return np.frombuffer(b"".join(b for (b,) in blobs), np.float32).reshape(-1, 6)


class Lines:
    """A local client of the agent's socket: JSON lines as they come."""

    def __init__(self, path: Path) -> None:
        self.sock = wait_for(lambda: self._connect(path), 60, "the inference socket")
        self.sock.settimeout(30)
        self._buffer = b""

    @staticmethod
    def _connect(path: Path) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            return None
        return sock

    def next(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the agent closed the socket"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


def trained_weights() -> dict[str, np.ndarray]:
    """The IMU CNN after a few epochs on another subject's labelled windows: a release worth using."""
    model = TrainableModel.from_package("imu_cnn")
    subject = load_watch_devices([5])[0]
    model.train_epochs(subject.x_train, subject.y_train, epochs=3, lr=0.2, rng=0)
    return model.get_weights()


def release(weights: dict[str, np.ndarray], version: int) -> tuple[bytes, bytes]:
    model = schemas.encode_model(weights)
    ctx = envelope.Context(GATEWAY.public_key, GATEWAY.id, version, "model", b"")
    body = {"version": version, "architecture": firmware_models.load_manifest("imu_cnn")["sha256"],
            "size": len(model), "chunks": 1, "expires": time.time() + 3600}
    wire = envelope.seal(GATEWAY, "model", ctx, body, model)
    return wire, envelope.decode(wire).body["digest"]


def evaluate_task(device: Identity, base: bytes) -> bytes:
    config = schemas.TrainConfig(epochs=1, batch_size=32, lr=0.1, deadline=time.time() + 120)
    ctx = envelope.Context(GATEWAY.public_key, GATEWAY.id, 1, "evaluate-1", base)
    return envelope.seal(GATEWAY, "task", ctx, schemas.Task("evaluate", device.id, config, "i8").to_body())


def test_the_agent_serves_its_releases_predictions_on_its_newest_windows_to_local_clients(tmp_path):
    device = Identity.generate()
    device.save(tmp_path / "device.key")
    state, sock_path = tmp_path / "state", tmp_path / "inference.sock"
    recording = tmp_path / "imu.npz"
    np.savez(recording, X=load_watch_devices([2])[0].x_train)  # streamed sample by sample, as a sensor would
    now = time.time()
    (tmp_path / "labels.csv").write_text(f"start,end,label\n{now - 3600},{now + 7200},3\n")
    weights = trained_weights()
    released, shipped = TrainableModel.from_package("imu_cnn"), TrainableModel.from_package("imu_cnn")
    released.set_weights(weights)
    classes = firmware_models.load_manifest("imu_cnn")["classes"]
    with Broker(tmp_path / "broker") as broker:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[device]\nname = "uses-it"\nkey = "{tmp_path / "device.key"}"\nstate_dir = "{state}"\n'
            "resend_s = 1.0\nenroll_retry_s = 5.0\n"
            f'[gateway]\nid = "{GATEWAY.id}"\npublic_key = "{GATEWAY.public_key.hex()}"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[model]\nname = "imu_cnn"\n'
            f'[data]\nrate_hz = {RATE_HZ}\nlabels = "{tmp_path / "labels.csv"}"\n'
            f'[[sensor]]\nkind = "replay"\npath = "{recording}"\nrate_hz = {RATE_HZ}\n'
            f'[inference]\nevery_s = 0.5\nwindows = 8\nsocket = "{sock_path}"\n'
            f'[inference.mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic = "{TOPIC}"\n'
        )
        seen: queue.Queue = queue.Queue()
        peer = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="peer")
        peer.on_message = lambda _c, _u, m: seen.put((m.topic, m.payload))
        peer.connect(broker.host, broker.port)
        peer.loop_start()
        online = topics.online(GATEWAY.id, device.id)
        peer.subscribe([(TOPIC, 1), (online, 1), (topics.reply(GATEWAY.id, device.id), 1)])
        log = tmp_path / "agent.log"
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                                 env=_child_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT)
        try:
            first = Lines(sock_path)
            leaver = Lines(sock_path)
            leaver.next()
            leaver.sock.close()  # a client that goes away mid-stream costs the agent nothing
            before = [first.next() for _ in range(4)]  # the shipped weights, before any release
            assert all(r["model_version"] is None and r["model_digest"] is None for r in before)

            # The gateway's trained release, through an evaluation task: the agent checks and takes it.
            wait_for(lambda: rows(state / "samples.db") > 6000, 60, "enough samples for a round")
            wire, digest = release(weights, version=1)
            peer.publish(topics.model(GATEWAY.id, digest.hex()), wire, qos=1, retain=True).wait_for_publish(5)
            wait_for(lambda: any(t == online and p == b"1" for t, p in list(seen.queue)), 30, "the device online")
            peer.publish(topics.task(GATEWAY.id, device.id), evaluate_task(device, digest), qos=1).wait_for_publish(5)
            after = []
            deadline = time.monotonic() + 90
            while len(after) < 12:
                assert time.monotonic() < deadline, "no results under the release"
                result = first.next()
                if result["model_digest"] == digest.hex():
                    after.append(result)
            second = Lines(sock_path)  # several local clients at once: a second one gets the same lines
            theirs = [second.next() for _ in range(8)]
            while after[-1]["end"] < theirs[-1]["end"]:
                after.append(first.next())
            assert {r["model_version"] for r in after} == {1} and {r["device"] for r in after} == {device.id}
            ends = [r["end"] for r in after]
            assert ends == sorted(ends) and len(set(ends)) == len(ends)  # newest windows, each once
            for results, model in ((before, shipped), (after, released)):
                x = np.stack([window(state / "samples.db", r["start"], r["end"]) for r in results])
                assert x.shape == (len(results), 128, 6)
                probs = model.predict(x)
                np.testing.assert_allclose([r["probs"] for r in results], probs, rtol=1e-5, atol=1e-6)
                assert [r["class"] for r in results] == list(np.argmax(probs, axis=1))
                assert [r["name"] for r in results] == [classes[r["class"]] for r in results]
            mine = {r["end"]: r for r in after}
            assert all(r == mine[r["end"]] for r in theirs)
            # The integrator's MQTT topic got the same lines.
            wait_for(lambda: any(t == TOPIC and json.loads(p)["end"] == ends[-1] for t, p in list(seen.queue)), 30,
                     "the results on MQTT")
            published = {r["end"]: r for r in (json.loads(p) for t, p in list(seen.queue) if t == TOPIC)}
            assert all(published[end] == mine[end] for end in ends)
            assert any(t == topics.reply(GATEWAY.id, device.id) for t, _ in list(seen.queue))  # it evaluated too

            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
            assert not sock_path.exists()  # the socket went with the agent

            # A restart runs the release it had, at once: no gateway needed.
            agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                     cwd=ROOT, env=_child_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT)
            again = Lines(sock_path)
            assert again.next()["model_digest"] == digest.hex()
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0

            # `starling-agent predict`: the same release on the newest windows of the sample store, at once.
            done = subprocess.run([sys.executable, "-m", "agent.cli", "predict", "--config", str(config),
                                   "--windows", "3"], cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, done.stderr
            once = [json.loads(line) for line in done.stdout.splitlines()]
            assert len(once) == 3 and {(r["model_version"], r["model_digest"]) for r in once} == {(1, digest.hex())}
            x = np.stack([window(state / "samples.db", r["start"], r["end"]) for r in once])
            np.testing.assert_allclose([r["probs"] for r in once], released.predict(x), rtol=1e-5, atol=1e-6)
        finally:
            if agent.poll() is None:
                agent.kill()
            peer.loop_stop()
            peer.disconnect()
    text = log.read_text()
    assert "Traceback" not in text
    done = [line for line in text.splitlines() if " inference.done " in line]
    assert len(done) >= 4 and all("windows=" in line and "newest=" in line for line in done)
    assert any("model=shipped" in line for line in done) and any(f"model={digest.hex()[:12]} version=1" in line
                                                                for line in done)
    assert text.count(" inference.start ") == 2 and text.count(" inference.stop ") == 2
    assert f"inference.model version=1 digest={digest.hex()}" in text
