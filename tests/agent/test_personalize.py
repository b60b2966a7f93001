"""A personal touch: [personalization] tunes only the output layer of the model inference runs, to the device's
own labelled windows, never touching what the device trains and sends; it falls back to the release when it
cannot tune."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import ConfigError, Personalization, parse_config
from agent.data_source import RecordedWindows, training_of
from agent.inference import Inference
from agent.live_data import NoData
from agent.personalize import CannotPersonalize, NotBetter, Personalizer, tuned_weights
from agent.samples import LocalData
from firmware_models.runtime import TrainableModel
from hw.datasets import load_watch_devices


@pytest.fixture(scope="module")
def wearer():
    """One watch wearer whose data the shipped model (trained on the pooled wearers) knows least well."""
    return load_watch_devices([10])[0]


@pytest.fixture()
def cnn():
    return TrainableModel.from_package("imu_cnn")


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x), axis=1) == y))


# --- config -------------------------------------------------------------------------------------------------------


def doc(**tables) -> dict:
    return {"device": {"name": "d", "key": "k", "state_dir": "/var/lib/starling"},
            "gateway": {"id": "0" * 32, "public_key": "ab" * 32}, "data": {"replay": "x.npz"}, **tables}


def test_personalization_is_off_without_its_table_and_needs_inference():
    assert parse_config(doc(inference={})).personalization is None
    assert parse_config(doc(inference={}, personalization={})).personalization == Personalization()
    given = parse_config(doc(inference={}, personalization={"steps": 20, "lr": 0.05, "weights": ["dense_w"]}))
    assert given.personalization == Personalization(20, 0.05, ("dense_w",))
    with pytest.raises(ConfigError, match=r"\[personalization\] needs \[inference\]"):
        parse_config(doc(personalization={}))


@pytest.mark.parametrize("table, message", [
    ({"steps": 0}, r"personalization\.steps must be between 1 and 10000"),
    ({"steps": True}, r"personalization\.steps must be int"),
    ({"lr": 0}, r"personalization\.lr must be between"),
    ({"lr": float("inf")}, r"personalization\.lr must be a finite number"),
    ({"weights": ["dense_w", "dense_w"]}, r"personalization\.weights must be a list of distinct weight names"),
    ({"weights": [1]}, r"personalization\.weights must be a list of distinct weight names"),
    ({"layers": "last"}, r"personalization\.layers"),
])
def test_bad_personalization_settings_are_refused_naming_the_field(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(doc(inference={}, personalization=table))


# --- which weights ----------------------------------------------------------------------------------------------


def test_the_output_layer_is_found_by_shape_and_names_can_be_given():
    assert tuned_weights(Personalization(), TrainableModel.from_package("imu_cnn")) == ("dense_w", "dense_b")
    assert tuned_weights(Personalization(), TrainableModel.from_package("tabular_mlp")) == ("out_w", "out_b")
    mlp = TrainableModel.from_package("tabular_mlp")
    assert tuned_weights(Personalization(weights=("fc2_w", "out_b")), mlp) == ("fc2_w", "out_b")
    with pytest.raises(CannotPersonalize, match=r"names \['nope'\], not weights of this model"):
        tuned_weights(Personalization(weights=("nope",)), mlp)
    with pytest.raises(CannotPersonalize, match="task is 'reconstruction'"):
        tuned_weights(Personalization(), TrainableModel.from_package("imu_autoencoder"))


# --- tuning -------------------------------------------------------------------------------------------------------


def test_tuning_moves_only_the_output_layer_and_fits_the_wearer(cnn, wearer):
    release = cnn.get_weights()
    before = accuracy(cnn, wearer.x_test, wearer.y_test)
    personal = Personalizer(Personalization(steps=50, lr=0.1), cnn, seed=0).fit(release, wearer.x_train,
                                                                                  wearer.y_train)
    for name in ("conv1_w", "conv1_b", "conv2_w", "conv2_b"):
        np.testing.assert_array_equal(personal[name], release[name])  # exactly: SGD on the output layer alone
    assert not np.array_equal(personal["dense_w"], release["dense_w"])
    current = cnn.get_weights()
    assert all(np.array_equal(current[k], personal[k]) for k in release)  # the model now holds what fit returned
    after = accuracy(cnn, wearer.x_test, wearer.y_test)  # test windows: never seen by the tuning
    assert after >= before + 0.02, (before, after)


def test_the_same_seed_tunes_the_same_way(cnn, wearer):
    release = cnn.get_weights()
    a = Personalizer(Personalization(steps=5), cnn, seed=7).fit(release, wearer.x_train, wearer.y_train)
    b = Personalizer(Personalization(steps=5), cnn, seed=7).fit(release, wearer.x_train, wearer.y_train)
    np.testing.assert_array_equal(a["dense_w"], b["dense_w"])


def test_a_tuning_that_does_not_fit_the_windows_better_is_refused_and_the_model_keeps_the_release(cnn, wearer):
    broken = {k: v * np.float32(1e30) for k, v in cnn.get_weights().items()}  # its activations overflow
    with pytest.raises(NotBetter):
        Personalizer(Personalization(steps=20, lr=10.0), cnn, seed=0).fit(broken, wearer.x_train, wearer.y_train)
    assert all(np.array_equal(cnn.get_weights()[k], v) for k, v in broken.items())


def test_fewer_windows_than_a_batch_are_used_whole_and_none_are_refused(cnn, wearer):
    release = cnn.get_weights()
    personal = Personalizer(Personalization(steps=3), cnn, seed=0).fit(release, wearer.x_train[:5],
                                                                         wearer.y_train[:5])
    assert not np.array_equal(personal["dense_b"], release["dense_b"])
    with pytest.raises(ValueError, match="0 windows and 0 labels"):
        Personalizer(Personalization(), cnn).fit(release, wearer.x_train[:0], wearer.y_train[:0])


# --- inside inference ----------------------------------------------------------------------------------------------


def inference(cnn, wearer, tmp_path, training, settings=Personalization(steps=20, lr=0.1)) -> Inference:
    return Inference(parse_config(doc(inference={"socket": ""})).inference, cnn, {"classes": 7}, tmp_path, "dev",
                     RecordedWindows(wearer.x_test), personalizer=Personalizer(settings, cnn, seed=0),
                     training=training)


def test_inference_runs_each_release_tuned_to_the_device_and_says_so(cnn, wearer, tmp_path):
    data = LocalData(wearer.x_train, wearer.y_train, wearer.x_test, wearer.y_test)
    inf = inference(cnn, wearer, tmp_path, training_of(data))
    inf.load()
    shipped = inf.release.weights
    assert inf.personal and not np.array_equal(cnn.get_weights()["dense_w"], shipped["dense_w"])
    results = inf.run()
    assert results and all(r["personal"] is True for r in results)
    expected = Personalizer(Personalization(steps=20, lr=0.1), TrainableModel.from_package("imu_cnn"), seed=0)
    tuned = expected.fit(shipped, wearer.x_train, wearer.y_train)
    twin = TrainableModel.from_package("imu_cnn")
    twin.set_weights(tuned)
    np.testing.assert_allclose([r["probs"] for r in results], twin.predict(wearer.x_test[:len(results)]),
                               rtol=1e-5, atol=1e-6)
    release = {k: v + np.float32(0.01) for k, v in shipped.items()}
    inf.install(release, 3, "ab" * 32)
    inf.run()
    assert inf.release.version == 3 and inf.personal
    np.testing.assert_array_equal(cnn.get_weights()["conv1_w"], release["conv1_w"])  # the new release's layers
    assert not np.array_equal(cnn.get_weights()["dense_w"], release["dense_w"])  # tuned again


def test_without_labelled_windows_or_when_tuning_fails_the_release_runs_as_it_is(cnn, wearer, tmp_path):
    def too_few() -> LocalData:
        raise NoData("not_enough_data", "3 training windows")

    inf = inference(cnn, wearer, tmp_path, too_few)
    inf.load()
    assert not inf.personal
    assert all(np.array_equal(cnn.get_weights()[k], v) for k, v in inf.release.weights.items())
    assert all(r["personal"] is False for r in inf.run())

    data = LocalData(wearer.x_train, wearer.y_train, wearer.x_test, wearer.y_test)
    diverging = inference(cnn, wearer, tmp_path, training_of(data), Personalization(steps=50, lr=10.0))
    big = {k: v * np.float32(1e30) for k, v in cnn.get_weights().items()}  # its activations overflow
    diverging.install(big, 1, "cd" * 32)
    diverging.run()
    assert not diverging.personal
    assert all(np.array_equal(cnn.get_weights()[k], v) for k, v in diverging.release.weights.items())
