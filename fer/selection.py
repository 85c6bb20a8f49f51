"""Which weights a trained network keeps: candidates scored on the validation split.

The best epoch is one candidate. The others finish training the way the project's recipes
do (BENCHMARKS.md, session 29): the same weights with batch-normalisation statistics
recomputed from clean training images (fer.batchnorm), and the mean of the weights at the
end of each of the last quarter's epochs (stochastic weight averaging over the cosine
schedule's low-learning-rate tail, Izmailov et al. 2018), with statistics recomputed too,
since averaged moving statistics describe no network. The test split is never read here.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from fer.batchnorm import recalibrate
from fer.data import Dataset
from fer.evaluate import predict_labels

BEST_EPOCH = "best_epoch"
BEST_EPOCH_RECALIBRATED = "best_epoch_recalibrated"
AVERAGE_RECALIBRATED = "last_epochs_average_recalibrated"


class KeepBestWeights(keras.callbacks.Callback):
    """Remember the weights of the epoch with the best validation accuracy."""

    def __init__(self, monitor: str = "val_accuracy"):
        super().__init__()
        self.monitor = monitor
        self.best_value = -np.inf
        self.best_epoch = 0
        self.weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best_value:
            self.best_value, self.best_epoch = float(value), epoch + 1
            self.weights = self.model.get_weights()

    def restore(self, model: keras.Model) -> None:
        if self.weights is not None:
            model.set_weights(self.weights)


class AverageOfLastEpochs(keras.callbacks.Callback):
    """The mean of the weights at the end of each of the last ``count`` of ``epochs`` epochs.

    Only floating-point weights are averaged; any other (a random generator's state) is the
    last epoch's.
    """

    def __init__(self, count: int, *, epochs: int):
        super().__init__()
        self.first_epoch = max(0, epochs - count)  # 0-based
        self.count = 0
        self._sums: list[np.ndarray] | None = None
        self._last: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.first_epoch:
            return
        self._last = self.model.get_weights()
        floats = [w.astype(np.float64) if np.issubdtype(w.dtype, np.floating) else None
                  for w in self._last]
        self._sums = floats if self._sums is None else [
            None if s is None else s + w for s, w in zip(self._sums, floats, strict=True)]
        self.count += 1

    def weights(self) -> list[np.ndarray]:
        if self._sums is None:
            raise ValueError("no epoch has been averaged yet")
        return [last if total is None else (total / self.count).astype(last.dtype)
                for total, last in zip(self._sums, self._last, strict=True)]


def averaged_epochs(epochs: int) -> int:
    """How many final epochs the average spans: the last quarter, at least one."""
    return max(1, epochs // 4)


def best_candidate(scores: dict[str, float]) -> str:
    """The name with the highest score; a tie goes to the one listed later."""
    return max(reversed(list(scores)), key=scores.get)


def choose_final_weights(model: keras.Model, dataset: Dataset, *, best: KeepBestWeights,
                         average: AverageOfLastEpochs) -> dict:
    """Score the candidates on validation and leave ``model`` with the winner's weights.

    The best epoch's own validation accuracy is the one Keras measured when it was chosen.
    The highest score wins; a tie goes to the later candidate in the order best epoch,
    best epoch recalibrated, average recalibrated (the later ones did better on test on
    average in session 29's measurements). Returns metrics.json's record of the choice.
    """
    started = time.perf_counter()
    scores, weights = {BEST_EPOCH: best.best_value}, {BEST_EPOCH: best.weights}
    for name, start in ((BEST_EPOCH_RECALIBRATED, best.weights),
                        (AVERAGE_RECALIBRATED, average.weights())):
        model.set_weights(start)
        recalibrate(model, dataset.train.images)
        predicted = predict_labels(model, dataset.validation.images)
        scores[name] = float(np.mean(predicted == dataset.validation.labels))
        weights[name] = model.get_weights()
    chosen = best_candidate(scores)
    model.set_weights(weights[chosen])
    return {"chosen": chosen, "val_accuracy": {k: round(v, 4) for k, v in scores.items()},
            "averaged_epochs": average.count, "seconds": round(time.perf_counter() - started, 1)}
