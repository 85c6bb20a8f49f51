"""fer.selection: a network keeps the candidate weights that score best on validation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tiny_models import faces, moving, norms, small_model

from fer.batchnorm import recalibrate
from fer.data import Dataset, Split
from fer.evaluate import predict_labels
from fer.models import get_spec
from fer.selection import (
    AVERAGE_RECALIBRATED,
    BEST_EPOCH,
    BEST_EPOCH_RECALIBRATED,
    AverageOfLastEpochs,
    KeepBestWeights,
    averaged_epochs,
    best_candidate,
    choose_final_weights,
)


def shifted(weights: list[np.ndarray], amount: float) -> list[np.ndarray]:
    return [w + amount if np.issubdtype(w.dtype, np.floating) else w for w in weights]


def fed(model: keras.Model, epochs: list[list[np.ndarray]], count: int) -> AverageOfLastEpochs:
    """An AverageOfLastEpochs that saw ``epochs`` (each a model's weights) end in turn."""
    average = AverageOfLastEpochs(count, epochs=len(epochs))
    average.set_model(model)
    for number, weights in enumerate(epochs):
        model.set_weights(weights)
        average.on_epoch_end(number)
    return average


def test_the_average_spans_exactly_the_last_epochs():
    model = small_model()
    start = model.get_weights()
    epochs = [shifted(start, float(n)) for n in range(5)]

    average = fed(model, epochs, count=2)

    assert average.count == 2
    for got, third, fourth in zip(average.weights(), epochs[3], epochs[4], strict=True):
        np.testing.assert_allclose(got, (third + fourth) / 2, rtol=1e-6)


@pytest.mark.parametrize("epochs, averaged", [(20, 5), (60, 15), (8, 2), (3, 1), (1, 1)])
def test_the_last_quarter_of_the_epochs_is_averaged(epochs, averaged):
    assert averaged_epochs(epochs) == averaged


@pytest.mark.parametrize("scores, winner", [
    ({BEST_EPOCH: 0.5, BEST_EPOCH_RECALIBRATED: 0.6, AVERAGE_RECALIBRATED: 0.55},
     BEST_EPOCH_RECALIBRATED),
    ({BEST_EPOCH: 0.7, BEST_EPOCH_RECALIBRATED: 0.6, AVERAGE_RECALIBRATED: 0.6}, BEST_EPOCH),
    ({BEST_EPOCH: 0.6, BEST_EPOCH_RECALIBRATED: 0.6, AVERAGE_RECALIBRATED: 0.6},
     AVERAGE_RECALIBRATED),
    ({BEST_EPOCH: 0.6, BEST_EPOCH_RECALIBRATED: 0.6, AVERAGE_RECALIBRATED: 0.5},
     BEST_EPOCH_RECALIBRATED),
])
def test_the_highest_validation_score_wins_and_a_tie_goes_to_the_later(scores, winner):
    assert best_candidate(scores) == winner


def candidates(seed: int = 0):
    """A model, its 'best epoch' (its initial weights, with the default moving statistics,
    far from its inputs' real ones) and an average of two later, different epochs."""
    model = small_model(seed)
    best = KeepBestWeights()
    best.weights = model.get_weights()
    later = [shifted(best.weights, 0.02), shifted(best.weights, -0.05)]
    average = fed(model, [best.weights, *later], count=2)
    model.set_weights(best.weights)
    return model, best, average


def labelled_by(model: keras.Model, train: np.ndarray, images: np.ndarray) -> Dataset:
    """A dataset whose validation labels are ``model``'s own predictions: it scores 1.0."""
    validation = Split(images=images, labels=predict_labels(model, images))
    empty = Split(images=images[:0], labels=validation.labels[:0])
    return Dataset(source="generated", sha256="0" * 64, test=empty,
                   train=Split(images=train, labels=np.zeros(len(train), int)),
                   validation=validation)


def score(model: keras.Model, dataset: Dataset) -> float:
    predicted = predict_labels(model, dataset.validation.images)
    return float(np.mean(predicted == dataset.validation.labels))


def test_the_best_epoch_stays_as_it_was_when_it_scores_highest():
    model, best, average = candidates()
    dataset = labelled_by(model, faces(60, seed=3) // 8, faces(60, seed=2))
    best.best_value = score(model, dataset)  # as Keras measured it at that epoch: 1.0
    before = [moving(layer) for layer in norms(model)]

    record = choose_final_weights(model, dataset, best=best, average=average)

    assert record["chosen"] == BEST_EPOCH
    assert record["val_accuracy"][BEST_EPOCH] == 1.0
    assert max(record["val_accuracy"][BEST_EPOCH_RECALIBRATED],
               record["val_accuracy"][AVERAGE_RECALIBRATED]) < 1.0
    for layer, (mean, variance) in zip(norms(model), before, strict=True):
        np.testing.assert_array_equal(moving(layer)[0], mean)
        np.testing.assert_array_equal(moving(layer)[1], variance)
    for got, kept in zip(model.get_weights(), best.weights, strict=True):
        np.testing.assert_array_equal(got, kept)


def test_the_recalibrated_average_is_kept_when_it_scores_highest():
    train = faces(60, seed=3)
    model, best, average = candidates()
    reference, _, _ = candidates()
    reference.set_weights(average.weights())
    recalibrate(reference, train)
    dataset = labelled_by(reference, train, faces(60, seed=2))
    best.best_value = score(model, dataset)

    record = choose_final_weights(model, dataset, best=best, average=average)

    assert record["chosen"] == AVERAGE_RECALIBRATED and record["averaged_epochs"] == 2
    assert record["val_accuracy"][AVERAGE_RECALIBRATED] == 1.0 > record["val_accuracy"][BEST_EPOCH]
    assert score(model, dataset) == 1.0
    for got, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, chooses", [("default", True), ("default-pca", True),
                                            ("wide-full-res", True), ("seed", False),
                                            ("mini-xception", False)])
def test_the_projects_recipes_choose_and_the_published_ones_keep_the_best_epoch(name, chooses):
    assert get_spec(name).recalibrate_and_average is chooses
