"""Inference on the device, piece by piece: its config, the local socket and its clients, releases swapped in
whole while the model runs, the autoencoder's own threshold, and `starling-agent predict`.
(tests/agent/test_agent_inference.py runs it inside the real agent process.)"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent import cli
from agent.config import ConfigError, InferenceSettings, parse_config
from agent.data_source import LiveWindows, RecordedWindows
from agent.inference import Inference
from agent.inference_state import THRESHOLD_FILE
from agent.local_out import MAX_BACKLOG_BYTES, SocketOut
from agent.sample_store import SampleStore
from firmware_models.runtime import TrainableModel
from hw.datasets import load_watch_devices


@pytest.fixture(scope="module")
def watch():
    return load_watch_devices([3])[0]


@pytest.fixture(scope="module")
def cnn():
    return TrainableModel.from_package("imu_cnn")


@pytest.fixture(scope="module")
def autoencoder():
    return TrainableModel.from_package("imu_autoencoder")


def shifted(model: TrainableModel, by: float) -> dict[str, np.ndarray]:
    """The shipped weights moved by `by`: another release, with clearly other outputs."""
    return {k: v + np.float32(by) for k, v in model.get_weights().items()}


# --- config ---------------------------------------------------------------------------------------------------


def doc(inference=None, **tables) -> dict:
    out = {"device": {"name": "d", "key": "k", "state_dir": "/var/lib/starling"},
           "gateway": {"id": "0" * 32, "public_key": "ab" * 32}, "data": {"replay": "x.npz"}, **tables}
    if inference is not None:
        out["inference"] = inference
    return out


def test_inference_is_off_without_its_table_and_on_with_defaults_when_it_is_there():
    assert parse_config(doc()).inference is None
    settings = parse_config(doc({})).inference
    assert settings == InferenceSettings(socket=Path("/var/lib/starling/inference.sock"))
    assert settings.every_s == 10.0 and settings.windows == 32 and settings.mqtt is None  # nothing leaves
    assert parse_config(doc({"socket": ""})).inference.socket is None
    given = parse_config(doc({"every_s": 2, "windows": 8, "threshold_quantile": 0.95, "calibration_windows": 500,
                              "min_calibration": 20, "socket": "run/i.sock",
                              "mqtt": {"host": "10.0.0.2", "port": 8883, "topic": "home/imu", "qos": 1}}),
                         Path("/etc/starling")).inference
    assert (given.every_s, given.windows, given.threshold_quantile, given.calibration_windows,
            given.min_calibration, given.socket) == (2.0, 8, 0.95, 500, 20, Path("/etc/starling/run/i.sock"))
    assert (given.mqtt.host, given.mqtt.port, given.mqtt.topic, given.mqtt.qos) == ("10.0.0.2", 8883, "home/imu", 1)


@pytest.mark.parametrize("inference, message", [
    ({"every_s": 0}, r"inference\.every_s must be between 0\.1 and 86400"),
    ({"every_s": "10s"}, r"inference\.every_s must be float, got str"),
    ({"every_s": float("nan")}, r"inference\.every_s must be a finite number"),
    ({"windows": 0}, r"inference\.windows must be between 1 and 256"),
    ({"windows": 2.5}, r"inference\.windows must be int"),
    ({"threshold_quantile": 1.0}, r"inference\.threshold_quantile must be between 0\.5 and 0\.9999"),
    ({"calibration_windows": 5}, r"inference\.calibration_windows must be between 10 and 100000"),
    ({"calibration_windows": 50, "min_calibration": 60}, r"inference\.min_calibration must be between 1 and 50"),
    ({"evry_s": 5}, r"unknown key inference\.evry_s; known: .*every_s"),
    ({"socket": "/tmp/" + "s" * 120}, r"inference\.socket: .* bytes long; a Unix socket's path takes at most 107"),
    ({"mqtt": "broker"}, r"\[inference\.mqtt\] must be a table"),
    ({"mqtt": {}}, r"inference\.mqtt\.host is required"),
    ({"mqtt": {"host": ""}}, r"inference\.mqtt\.host must not be empty"),
    ({"mqtt": {"host": "h", "port": 70000}}, r"inference\.mqtt\.port 70000 is not a TCP port"),
    ({"mqtt": {"host": "h", "topic": "a/+/b"}}, r"inference\.mqtt\.topic must be a plain MQTT topic"),
    ({"mqtt": {"host": "h", "topic": "$SYS/x"}}, r"inference\.mqtt\.topic must be a plain MQTT topic"),
    ({"mqtt": {"host": "h", "qos": 2}}, r"inference\.mqtt\.qos must be 0 or 1"),
    ({"mqtt": {"host": "h", "hots": "x"}}, r"unknown key inference\.mqtt\.hots; known: .*host"),
    ({"mqtt": {"host": "h", "tls_ca": "/nonexistent/ca.crt"}}, r"inference\.mqtt\.tls_ca: .* is not a file"),
    ({"mqtt": {"host": "h", "password_file": __file__}},
     r"inference\.mqtt\.password_file needs inference\.mqtt\.username"),
])
def test_a_bad_inference_table_is_refused_naming_the_field(inference, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(doc(inference))


# --- the local socket -------------------------------------------------------------------------------------------


def client(path: Path, buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    sock.connect(str(path))
    return sock


def read_lines(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, "the agent closed the connection"
        data += chunk
    return data.splitlines()


def test_every_client_gets_each_line_and_one_that_leaves_or_stops_reading_costs_nobody_else(tmp_path):
    path = tmp_path / "out.sock"
    out = SocketOut(path).open()
    try:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        a, b, leaver, stuck = client(path), client(path), client(path), client(path, buffer=4096)
        out.serve(0.1)
        assert out.clients == 4
        out.send(b'{"n": 0}\n')
        assert read_lines(a, 1) == read_lines(b, 1) == read_lines(leaver, 1) == [b'{"n": 0}']
        leaver.close()  # a client that goes away: noticed, dropped, no error for the others
        out.serve(0.1)
        assert out.clients == 3
        line = b'{"pad": "' + b"x" * 1000 + b'"}\n'
        b.settimeout(5)
        started = time.monotonic()
        for _ in range((MAX_BACKLOG_BYTES + 2 * 1024 * 1024) // len(line)):  # far more than `stuck` takes
            out.send(line)
            assert read_lines(a, 1) == [line.strip()]  # a reader keeps up and gets every line
            b.recv(1 << 20)
        assert time.monotonic() - started < 20  # never blocked on the client that does not read
        assert out.dropped == 1 and out.clients == 2  # that one was dropped once its backlog was full
        stuck.settimeout(5)
        received = b""
        while chunk := stuck.recv(1 << 20):  # what it was sent, then the end (its last line may be cut)
            received += chunk
        assert received.startswith(b'{"n": 0}\n' + line)
    finally:
        out.close()
    assert not path.exists()  # the socket file goes with the agent


def test_a_socket_file_left_by_a_power_cut_is_replaced_and_anything_else_there_is_not(tmp_path):
    path = tmp_path / "out.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    out = SocketOut(path).open()
    c = client(path)
    out.send(b"{}\n")
    assert read_lines(c, 1) == [b"{}"]
    out.close()
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(OSError):
        SocketOut(tmp_path / "file").open()
    assert (tmp_path / "file").read_text() == "not a socket"


# --- no torn weights ---------------------------------------------------------------------------------------------


def test_a_release_installed_while_the_model_runs_is_used_whole_from_one_run_to_the_next(tmp_path, cnn, watch):
    """Another thread installs two releases turn about, as fast as it can, while the inference thread runs:
    every result equals `predict` under the one release it names, never a mix."""
    x = watch.x_train[:96]
    reference = TrainableModel.from_package("imu_cnn")
    expected = {}
    for name, by in (("a" * 64, 0.01), ("b" * 64, -0.01)):
        reference.set_weights(shifted(cnn, by))
        expected[name] = reference.predict(x)
    releases = [(shifted(cnn, 0.01), 1, "a" * 64), (shifted(cnn, -0.01), 2, "b" * 64)]
    model = TrainableModel.from_package("imu_cnn")
    inference = Inference(InferenceSettings(windows=32, socket=None), model, model.manifest, tmp_path, "dev",
                          RecordedWindows(x))
    done = threading.Event()

    def installer() -> None:
        i = 0
        while not done.is_set():
            weights, version, digest = releases[i % 2]
            inference.install(weights, version, digest)
            i += 1

    thread = threading.Thread(target=installer)
    thread.start()
    seen: dict[str, int] = {}
    try:
        for _ in range(60):
            for result in inference.run():
                digest = result["model_digest"]
                if digest is None:
                    continue  # the shipped weights, before the first release was taken
                seen[digest] = seen.get(digest, 0) + 1
                assert result["model_version"] == (1 if digest == "a" * 64 else 2)
                np.testing.assert_array_equal(np.float32(result["probs"]), expected[digest][result["index"]])
    finally:
        done.set()
        thread.join()
    assert set(seen) == {"a" * 64, "b" * 64}  # both releases were swapped in, many times over


def test_the_release_in_use_survives_a_restart(tmp_path, cnn, watch):
    x = watch.x_test[:5]
    first = TrainableModel.from_package("imu_cnn")
    inference = Inference(InferenceSettings(socket=None), first, first.manifest, tmp_path, "dev", RecordedWindows(x))
    inference.install(shifted(cnn, 0.02), 4, "c" * 64)
    again = TrainableModel.from_package("imu_cnn")
    restarted = Inference(InferenceSettings(socket=None), again, again.manifest, tmp_path, "dev", RecordedWindows(x))
    restarted.load()
    results = restarted.run()
    assert {(r["model_version"], r["model_digest"]) for r in results} == {(4, "c" * 64)}
    cnn_copy = TrainableModel.from_package("imu_cnn")
    cnn_copy.set_weights(shifted(cnn, 0.02))
    np.testing.assert_array_equal(np.float32([r["probs"] for r in results]), cnn_copy.predict(x))
    assert [r["name"] for r in results] == [cnn.manifest["classes"][r["class"]] for r in results]


# --- the autoencoder's own threshold ---------------------------------------------------------------------------


def test_the_threshold_is_a_high_quantile_of_the_devices_own_recent_scores_and_survives_a_restart(
        tmp_path, autoencoder, watch):
    normal = watch.x_train
    settings = InferenceSettings(windows=16, socket=None, threshold_quantile=0.95, calibration_windows=200,
                                 min_calibration=40)
    model = TrainableModel.from_package("imu_autoencoder")
    # No windows to seed from: no threshold until `min_calibration` scores are in, and nothing is flagged.
    inference = Inference(settings, model, model.manifest, tmp_path, "dev", RecordedWindows(normal[:0]))
    inference.load()
    inference.source = RecordedWindows(normal)
    scores: list[float] = []
    for _ in range(3):  # 0, 16, 32 scores before each run: fewer than 40
        results = inference.run()
        assert all(r["threshold"] is None and r["anomaly"] is None for r in results)
        scores += [r["score"] for r in results]
    np.testing.assert_allclose(scores, autoencoder.reconstruction_error(normal[:48]), rtol=1e-6)
    while len(scores) < 200 + 48:
        results = inference.run()
        threshold = results[0]["threshold"]
        # Judged against the bar from before this run: the quantile of the last 200 scores so far.
        assert threshold == pytest.approx(float(np.quantile(scores[-200:], 0.95)), rel=1e-9)
        assert [r["anomaly"] for r in results] == [r["score"] > threshold for r in results]
        scores += [r["score"] for r in results]
    # A burst of windows unlike the device's normal is flagged, all of it: it does not raise its own bar.
    rng = np.random.default_rng(1)
    odd = normal[:16] + rng.normal(0, 3.0, size=normal[:16].shape).astype(np.float32)
    flagged = inference.predict(odd, [{"index": i} for i in range(16)])
    assert all(r["anomaly"] for r in flagged)
    bar = inference.calibration.threshold
    inference.stop()  # saves the scores (atomically: no temporary file left)
    saved = json.loads((tmp_path / THRESHOLD_FILE).read_text())
    assert saved["model"] is None and saved["quantile"] == 0.95 and saved["threshold"] == bar
    assert len(saved["scores"]) == 200
    assert [p.name for p in (tmp_path / "inference").iterdir()] == ["threshold.json"]
    # A restart has its threshold at once, from the file (there is nothing to seed from).
    again = TrainableModel.from_package("imu_autoencoder")
    restarted = Inference(settings, again, again.manifest, tmp_path, "dev", RecordedWindows(normal[:0]))
    restarted.load()
    assert restarted.calibration.threshold == bar
    # A new release starts again: seeded with its own scores of the newest windows the device holds.
    restarted.source = RecordedWindows(normal[:100])
    restarted.install(shifted(autoencoder, 0.001), 1, "d" * 64)
    restarted.run()
    other = TrainableModel.from_package("imu_autoencoder")
    other.set_weights(shifted(autoencoder, 0.001))
    seeded = other.reconstruction_error(normal[:100])
    assert restarted.calibration.model == "d" * 64
    np.testing.assert_allclose(restarted.calibration.scores[:100], seeded, rtol=1e-6)


def test_live_windows_are_handed_out_once_each_newest_first_and_never_across_a_gap(tmp_path):
    with SampleStore(tmp_path / "samples.db", channels=6) as store:
        t = time.time() - 30.0 + np.arange(600) / 50.0  # recent: the store drops rows past its retention
        t[300:] += 5.0  # the sensor paused: no window spans it
        store.append_many(t, np.arange(600 * 6, dtype=np.float32).reshape(600, 6))
        source = LiveWindows(store, (128, 6))
        x, where = source.newest(32)
        assert len(x) == len(where) > 0
        rows = (x[:, :, 0] / 6).astype(int)  # each sample's row in the store
        assert np.all(np.diff(rows, axis=1) == 1)  # consecutive samples ...
        assert np.all((rows[:, 0] >= 300) | (rows[:, -1] < 300))  # ... never across the pause
        np.testing.assert_array_equal(t[rows[:, 0]], [w["start"] for w in where])
        np.testing.assert_array_equal(t[rows[:, -1]], [w["end"] for w in where])
        assert rows[-1, -1] > 600 - 64  # the newest window ends within a stride of the newest sample
        assert source.newest(32)[0].shape == (0, 128, 6)  # nothing new
        store.append_many(t[-1] + 5.0 + np.arange(128) / 50.0, np.ones((128, 6), np.float32))
        fresh, where2 = source.newest(32)
        assert len(fresh) >= 1 and all(w["end"] > where[-1]["end"] for w in where2)


def test_a_run_hands_out_what_came_since_the_last_one_missing_no_sample(tmp_path):
    with SampleStore(tmp_path / "samples.db", channels=6) as store:
        now = time.time()
        t = now - 20.0 + np.arange(1000) / 50.0  # 50 Hz, one unbroken stream
        store.append_many(t[:600], np.zeros((600, 6), np.float32))
        source = LiveWindows(store, (128, 6))
        _, first = source.newest(32)
        assert len(first) == (600 - 128) // 64 + 1
        store.append_many(t[600:920], np.ones((320, 6), np.float32))  # 5 strides later
        _, second = source.newest(32)
        # Every sample is in a window handed out (the new ones overlap the last one handed out), up to within a
        # stride of the newest; and no more windows than 5 strides of new samples make were read.
        assert second[0]["start"] <= first[-1]["end"] < second[0]["end"]
        assert second[-1]["end"] > t[919] - 64 / 50.0
        assert 5 <= len(second) <= 6


# --- starling-agent predict ---------------------------------------------------------------------------------------


def replay_config(tmp_path: Path, watch, model: str = "imu_cnn") -> Path:
    np.savez(tmp_path / "replay.npz", x_train=watch.x_train, y_train=watch.y_train, x_test=watch.x_test,
             y_test=watch.y_test)
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nname = "d"\nkey = "{tmp_path / "device.key"}"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[gateway]\nid = "{"0" * 32}"\npublic_key = "{"ab" * 32}"\n'
                      f'[data]\nreplay = "{tmp_path / "replay.npz"}"\n[model]\nname = "{model}"\n')
    return config


def predict(capsys, *args: str) -> tuple[int, list[dict]]:
    capsys.readouterr()
    code = cli.main(["predict", *args])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def test_predict_prints_the_models_results_for_a_file_of_windows_or_the_newest_windows(tmp_path, capsys, cnn, watch):
    config = replay_config(tmp_path, watch)
    x = watch.x_test[:7]
    np.save(tmp_path / "w.npy", x)
    code, results = predict(capsys, "--config", str(config), "--input", str(tmp_path / "w.npy"))
    assert code == 0 and [r["index"] for r in results] == list(range(7))
    np.testing.assert_array_equal(np.float32([r["probs"] for r in results]), cnn.predict(x))
    assert [r["class"] for r in results] == list(np.argmax(cnn.predict(x), axis=1))
    assert {r["model_version"] for r in results} == {None}  # no release yet: the shipped weights
    np.savez(tmp_path / "one.npz", X=x[0])  # a single window, under the emulator's name
    code, results = predict(capsys, "--config", str(config), "--input", str(tmp_path / "one.npz"))
    assert code == 0 and len(results) == 1 and results[0]["probs"] == [float(p) for p in cnn.predict(x[:1])[0]]
    # No file: the device's newest windows (a replay device's: the end of its recording), with the release
    # the service keeps.
    model = TrainableModel.from_package("imu_cnn")
    Inference(InferenceSettings(socket=None), model, model.manifest, tmp_path / "state", "d",
              RecordedWindows(x)).install(shifted(cnn, 0.01), 3, "e" * 64)
    code, results = predict(capsys, "--config", str(config), "--windows", "5")
    n = len(watch.x_train) + len(watch.x_test)
    assert code == 0 and [r["index"] for r in results] == list(range(n - 5, n))
    model.set_weights(shifted(cnn, 0.01))
    np.testing.assert_array_equal(np.float32([r["probs"] for r in results]), model.predict(watch.x_test[-5:]))
    assert {(r["model_version"], r["model_digest"]) for r in results} == {(3, "e" * 64)}


def test_predict_gives_an_autoencoders_score_against_the_kept_threshold(tmp_path, capsys, autoencoder, watch):
    config = replay_config(tmp_path, watch, "imu_autoencoder")
    np.save(tmp_path / "w.npy", watch.x_test[:4])
    code, results = predict(capsys, "--config", str(config), "--input", str(tmp_path / "w.npy"))
    assert code == 0
    np.testing.assert_allclose([r["score"] for r in results], autoencoder.reconstruction_error(watch.x_test[:4]),
                               rtol=1e-6)
    # Nothing kept yet: seeded from the device's own newest windows, and nothing written.
    recent = np.concatenate([watch.x_train, watch.x_test])[-256:]
    expected = float(np.quantile(autoencoder.reconstruction_error(recent).astype(np.float64), 0.99))
    assert results[0]["threshold"] == pytest.approx(expected, rel=1e-6)
    assert [r["anomaly"] for r in results] == [r["score"] > r["threshold"] for r in results]
    assert not (tmp_path / "state" / THRESHOLD_FILE).exists()


@pytest.mark.parametrize("content, message", [
    (np.zeros((2, 64, 6), np.float32), "windows are (64, 6), the model takes (128, 6)"),
    (np.full((1, 128, 6), np.nan, np.float32), "NaN or infinite"),
    (None, "not a readable .npy or .npz"),
])
def test_predict_refuses_windows_it_cannot_use_saying_why(tmp_path, capsys, watch, content, message):
    config = replay_config(tmp_path, watch)
    path = tmp_path / "w.npy"
    if content is None:
        path.write_text("hello")
    else:
        np.save(path, content)
    assert cli.main(["predict", "--config", str(config), "--input", str(path)]) == 2
    assert message in capsys.readouterr().err
    os.unlink(path)
