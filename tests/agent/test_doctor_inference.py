"""`starling-agent doctor` with `[inference]`: the socket's folder, what sits at the socket's path, the
`[inference.mqtt]` broker; and the model it loaded (`[model] name` or `path`, its input shape and task)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_model_path import build_folder, write_config

from hw.broker import Broker, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker")) as running:
        yield running


def doctor(conf: Path, as_json: bool = True) -> tuple[int, dict[str, dict] | str]:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "--config", str(conf)]
                          + (["--json"] if as_json else []), capture_output=True, text=True, cwd=ROOT, timeout=120)
    if not as_json:
        return done.returncode, done.stdout
    return done.returncode, {c["name"]: c for c in json.loads(done.stdout)["checks"]}


def inference(socket_path: Path | str, mqtt_port: int | None = None) -> str:
    table = f'[inference]\nsocket = "{socket_path}"\n'
    if mqtt_port is not None:
        table += f'[inference.mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
    return table


def test_inference_that_can_run_passes_and_doctor_says_which_model_it_loaded(broker, tmp_path):
    folder = build_folder(tmp_path / "mine")
    (tmp_path / "run").mkdir()
    conf = write_config(tmp_path, 'path = "mine"', broker.port, inference(tmp_path / "run" / "i.sock", broker.port))
    code, checks = doctor(conf)
    assert code == 0, checks
    assert list(checks)[-3:] == ["broker", "inference.socket", "inference.mqtt"]
    assert checks["inference.socket"]["detail"] == f"{tmp_path / 'run' / 'i.sock'}: {tmp_path / 'run'} is writable"
    assert checks["inference.mqtt"]["detail"] == f"127.0.0.1:{broker.port} (plain MQTT, no TLS), MQTT login accepted"
    assert checks["model"]["detail"].startswith(f"{folder} (tabular_mlp): input [24], classification (7 classes); ")
    # Plain text: one line per check, as the others.
    code, text = doctor(conf, as_json=False)
    lines = text.splitlines()
    assert code == 0 and len(lines) == len(checks)
    assert lines[-2].startswith("ok   inference.socket") and lines[-1].startswith("ok   inference.mqtt")


def test_a_packaged_model_is_named_with_its_shape_and_task(broker, tmp_path):
    conf = write_config(tmp_path, 'name = "tabular_mlp"', broker.port)
    code, checks = doctor(conf)
    assert code == 0, checks
    assert checks["model"]["detail"].startswith("tabular_mlp: input [24], classification (7 classes); ")
    assert "inference.socket" not in checks and "inference.mqtt" not in checks  # no [inference]: not checked


def test_a_socket_folder_still_to_make_and_an_old_socket_pass(broker, tmp_path):
    conf = write_config(tmp_path, 'name = "tabular_mlp"', broker.port, inference(tmp_path / "new" / "sub" / "i.sock"))
    code, checks = doctor(conf)
    assert code == 0 and checks["inference.socket"]["detail"].endswith(f"will be made (in {tmp_path}, writable)")
    assert not (tmp_path / "new").exists()  # doctor changes nothing
    old = tmp_path / "old.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(old))
    listener.close()  # the file stays: what a power cut leaves
    code, checks = doctor(write_config(tmp_path, 'name = "tabular_mlp"', broker.port, inference(old)))
    assert code == 0 and "an old socket, replaced when the agent starts" in checks["inference.socket"]["detail"]


def test_each_inference_problem_is_named_with_what_to_do(broker, tmp_path):
    taken = tmp_path / "results.sock"
    taken.write_text("not a socket")
    conf = write_config(tmp_path, 'name = "tabular_mlp"', broker.port, inference(taken, free_port()))
    code, checks = doctor(conf)
    assert code == 1
    assert not checks["inference.socket"]["ok"]
    assert checks["inference.socket"]["detail"] == (f"{taken} is a file, not a socket: the agent cannot listen "
                                                    "there; remove it or set another [inference] socket")
    assert not checks["inference.mqtt"]["ok"] and "cannot reach 127.0.0.1:" in checks["inference.mqtt"]["detail"]
    assert checks["broker"]["ok"] and checks["model"]["ok"]  # the rest is still checked

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the socket's folder would go")
    code, checks = doctor(write_config(tmp_path, 'name = "tabular_mlp"', broker.port,
                                       inference(blocker / "run" / "i.sock")))
    assert code == 1 and not checks["inference.socket"]["ok"]
    assert f"{blocker / 'run'} does not exist and cannot be made ({blocker} is not a writable folder)" in \
        checks["inference.socket"]["detail"]


def test_personalization_is_checked_against_the_model_it_would_tune(broker, tmp_path):
    tuned = inference(tmp_path / "i.sock") + "[personalization]\nsteps = 20\n"
    code, checks = doctor(write_config(tmp_path, 'name = "tabular_mlp"', broker.port, tuned))
    assert code == 0, checks
    assert checks["personalization"] == {**checks["personalization"], "ok": True,
                                         "detail": "20 steps at lr 0.1 on out_w, out_b"}
    (tmp_path / "ae").mkdir()
    code, checks = doctor(write_config(tmp_path / "ae", 'name = "imu_autoencoder"', broker.port, tuned))
    assert code == 1 and not checks["personalization"]["ok"]
    assert "tunes a classifier" in checks["personalization"]["detail"]
