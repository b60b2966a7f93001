"""A personal touch: the device tunes the model it runs to its own data, and keeps that to itself.

    tuner = Personalizer(settings, model)             # settings: [personalization] (agent/config.py)
    personal = tuner.fit(release_weights, x, y)       # the release with its output layer tuned to (x, y)

Federated training finds one model for every device; a device's own data
differ (one wearer's movements, one room's air), and its inference can do
better with a model that leans towards them. Each time inference takes a new
release (agent/inference.py), the device starts from it and runs
`settings.steps` SGD steps of one batch each on its own labelled training
windows, changing only `settings.weights`: by default the classifier's
output layer (the dense kernel [k, classes] and bias [classes], found by
shape). The other weights stay the release's, so a few steps cannot undo
what the federation learned, and the tuned layer is small.

Only some of the weights move, while the graph's `train` signature steps
all of them: every step starts from the release's other weights and the
tuned layer so far, and keeps only the tuned layer's new values. That is
exactly SGD on the tuned layer alone (the graph's optimizer is plain SGD,
no state between steps).

A tuning that does not fit the device's training windows better than the
release (a higher mean loss on them, or one that diverged) is not kept:
`fit` raises `NotBetter` and inference runs the release as it is.

The tuned weights exist only in the inference model's memory: they are
never written to the update a device sends (that is trained from the
release by the learner's own model) and never leave the device. A restart
tunes again from the kept release. The fine-tuning uses the device's
training windows only, never its test windows, so the device's own
evaluation of personalization (the emulator's `personalized_accuracy`) is
honest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .config import Personalization

CLASSIFICATION = "classification"


class CannotPersonalize(ValueError):
    """The model cannot be personalized as configured (not a classifier, no such weight, no clear output layer)."""


def tuned_weights(settings: Personalization, model) -> tuple[str, ...]:
    """The names of the weights personalization changes: `settings.weights`, else the output layer."""
    if model.task != CLASSIFICATION:
        raise CannotPersonalize(f"personalization tunes a classifier to the device's labels; this model's task is "
                                f"{model.task!r}")
    shapes = model.weight_shapes
    if settings.weights:
        unknown = [name for name in settings.weights if name not in shapes]
        if unknown:
            raise CannotPersonalize(f"personalization.weights names {unknown}, not weights of this model "
                                    f"(it has {sorted(shapes)})")
        return tuple(settings.weights)
    classes = model.num_classes
    kernels = [name for name, shape in shapes.items() if len(shape) == 2 and shape[-1] == classes]
    biases = [name for name, shape in shapes.items() if tuple(shape) == (classes,)]
    if len(kernels) != 1 or len(biases) != 1:
        raise CannotPersonalize(f"cannot tell this model's output layer by shape (kernels [k, {classes}]: "
                                f"{kernels}, biases [{classes}]: {biases}); name it in personalization.weights")
    return kernels[0], biases[0]


class NotBetter(ValueError):
    """The tuning did not fit the device's own training windows better than the release; it is not used."""


class Personalizer:
    """Fits a release's tuned weights to one device's labelled windows (on the thread that owns `model`)."""

    def __init__(self, settings: Personalization, model, seed: int | None = None) -> None:
        self.settings, self.model = settings, model
        self.names = tuned_weights(settings, model)
        self._rng = np.random.default_rng(seed)

    def fit(self, release: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """The release with its tuned weights fitted to (x, y); leaves the model holding it. `x` must be
        non-empty; each step takes a batch drawn without replacement (all of x when it is smaller). Raises
        NotBetter, leaving the model holding the release, when the tuned model's mean loss on (x, y) is not
        below the release's (or the steps diverged)."""
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"personalization needs labelled windows, got {len(x)} windows and {len(y)} labels")
        release = dict(release)
        batch = min(self.model.batch_size, len(x))
        tuned = {name: np.array(release[name], copy=True) for name in self.names}
        try:
            for _ in range(self.settings.steps):
                pick = self._rng.choice(len(x), size=batch, replace=False)
                self.model.set_weights({**release, **tuned})  # refuses non-finite weights: a diverged step
                self.model.train_step(x[pick], y[pick], self.settings.lr)
                after = self.model.get_weights()
                tuned = {name: after[name] for name in self.names}
            personal = {**release, **tuned}
            self.model.set_weights(personal)
            loss = self.model.evaluate(x, y)[0]
        except ValueError as exc:
            self.model.set_weights(release)
            raise NotBetter(f"the tuning diverged ({exc})") from exc
        self.model.set_weights(release)
        base = self.model.evaluate(x, y)[0]
        if not (math.isfinite(loss) and loss < base):
            raise NotBetter(f"the tuned model's loss on the device's windows is {loss:.4g}, the release's {base:.4g}")
        self.model.set_weights(personal)
        return personal
