"""Error feedback for topk uploads: what is not sent is kept, added next round, and survives a restart."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from agent import learner
from agent.error_feedback import RESIDUAL_FILE, ErrorFeedback
from hw.synthetic import SyntheticModel, synthetic_data
from protocol import schemas

SHAPES = {"w": (20, 10), "b": (10,)}
BASE = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def task(codec: str, density: float = 0.1) -> schemas.Task:
    return schemas.Task("train", "d", schemas.TrainConfig(epochs=2, lr=0.3), codec, density)


def train(codec: str, residual=None, density: float = 0.1) -> learner.Outcome:
    model = SyntheticModel(SHAPES, seed=3)
    return learner.train(model, BASE, synthetic_data(64), task(codec, density), np.random.default_rng(0),
                         residual=residual)


def full_delta() -> dict[str, np.ndarray]:
    return schemas.decode_update(train("f32").attachment)[0]


def test_what_is_sent_plus_the_residual_is_exactly_the_delta():
    outcome = train("topk")
    sent, _ = schemas.decode_update(outcome.attachment)
    delta = full_delta()
    for name in SHAPES:
        np.testing.assert_allclose(sent[name] + outcome.residual[name], delta[name], atol=1e-6)
        assert np.count_nonzero(sent[name]) <= int(np.ceil(0.1 * delta[name].size))
        # the entries left out are the small ones: the residual is smaller than the delta
        assert np.linalg.norm(outcome.residual[name]) < np.linalg.norm(delta[name])


def test_the_residual_is_added_to_the_next_delta_before_selection():
    first = train("topk")
    second = train("topk", residual=first.residual)
    sent, _ = schemas.decode_update(second.attachment)
    delta = full_delta()
    for name in SHAPES:  # sent + new residual == this round's delta + the residual kept
        np.testing.assert_allclose(sent[name] + second.residual[name], delta[name] + first.residual[name],
                                   atol=1e-6)
    # over two rounds the device has sent more of the delta than one topk round would
    total = {k: schemas.decode_update(first.attachment)[0][k] + sent[k] for k in SHAPES}
    assert sum(np.count_nonzero(total[k]) for k in SHAPES) > sum(
        np.count_nonzero(schemas.decode_update(first.attachment)[0][k]) for k in SHAPES)


def test_dense_codecs_keep_no_residual_and_ignore_one_given():
    for codec in ("i8", "f16", "f32"):
        outcome = train(codec, residual={k: np.ones(s, np.float32) for k, s in SHAPES.items()})
        assert outcome.residual is None
    np.testing.assert_allclose(schemas.decode_update(train("f32", residual={
        k: np.ones(s, np.float32) for k, s in SHAPES.items()}).attachment)[0]["w"], full_delta()["w"])


def test_a_residual_that_does_not_fit_the_model_is_ignored():
    wrong = {"w": np.ones((3, 3), np.float32), "b": np.ones(10, np.float32)}
    np.testing.assert_allclose(schemas.decode_update(train("topk", residual=wrong).attachment)[0]["w"],
                               schemas.decode_update(train("topk").attachment)[0]["w"])


def test_the_residual_persists_across_a_restart_and_keeps_accumulating(tmp_path):
    kept = ErrorFeedback(tmp_path)
    assert kept.load(SHAPES, "gw:arch", 3) is None  # nothing yet
    first = train("topk")
    kept.keep(first.residual, "gw:arch", 3)
    mode = stat.S_IMODE(os.stat(tmp_path / RESIDUAL_FILE).st_mode)
    assert mode == 0o600 and [p.name for p in tmp_path.iterdir()] == [RESIDUAL_FILE]  # no temp file left over

    restarted = ErrorFeedback(tmp_path)  # a new agent process on the same state dir
    loaded = restarted.load(SHAPES, "gw:arch", 4)
    assert loaded is not None and all(np.array_equal(loaded[k], first.residual[k]) for k in SHAPES)
    second = train("topk", residual=loaded)
    restarted.keep(second.residual, "gw:arch", 4)
    again = ErrorFeedback(tmp_path).load(SHAPES, "gw:arch", 5)
    assert all(np.array_equal(again[k], second.residual[k]) for k in SHAPES)


@pytest.mark.parametrize("shapes, lineage, version, reason", [
    ({"w": (20, 11), "b": (10,)}, "gw:arch", 3, "a tensor changed shape"),
    ({"w": (20, 10)}, "gw:arch", 3, "a tensor went away"),
    (SHAPES, "other-gw:arch", 3, "another gateway's lineage"),
    (SHAPES, "gw:new-arch", 3, "another model architecture"),
    (SHAPES, "gw:arch", 2, "the model version went back"),
])
def test_a_residual_that_no_longer_applies_is_dropped(tmp_path, shapes, lineage, version, reason):
    kept = ErrorFeedback(tmp_path)
    kept.keep(train("topk").residual, "gw:arch", 3)
    assert kept.load(shapes, lineage, version) is None, reason
    assert not (tmp_path / RESIDUAL_FILE).exists()


def test_a_mangled_or_non_finite_residual_file_is_ignored(tmp_path):
    kept = ErrorFeedback(tmp_path)
    (tmp_path / RESIDUAL_FILE).write_bytes(b"not an npz")
    assert kept.load(SHAPES, "gw:arch", 0) is None and not (tmp_path / RESIDUAL_FILE).exists()
    bad = {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    kept.keep(bad, "gw:arch", 0)
    assert kept.load(SHAPES, "gw:arch", 0) is None


def test_keeping_none_drops_the_residual(tmp_path):
    kept = ErrorFeedback(tmp_path)
    kept.keep(train("topk").residual, "gw:arch", 0)
    kept.keep(None, "gw:arch", 0)
    assert not (tmp_path / RESIDUAL_FILE).exists()
