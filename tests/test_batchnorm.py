"""fer.batchnorm: statistics from clean images, in layer order, kept only if validation agrees."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from fer.batchnorm import recalibrate, recalibrate_if_better
from fer.data import Split
from fer.evaluate import predict_labels
from fer.labels import CLASS_NAMES
from fer.models import ClassNames, FusedBatchNorm, RandomAffine


def small_model(seed: int = 0) -> keras.Model:
    """Augmentation and dropout (both off at inference), then two normalised convolutions:
    a FusedBatchNorm (the default's) and Keras' own layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((48, 48, 1))
    x = RandomAffine(rotation=0.3, shift=0.1)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=4)(x)
    x = keras.layers.Activation("relu")(FusedBatchNorm()(x))
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
    x = keras.layers.Dense(len(CLASS_NAMES))(keras.layers.GlobalAveragePooling2D()(x))
    outputs = ClassNames(CLASS_NAMES, name="class_names")(keras.layers.Softmax()(x))
    return keras.Model(inputs, outputs)


def faces(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 48, 48)).astype(np.uint8)


def norms(model):
    return [x for x in model.layers if isinstance(x, keras.layers.BatchNormalization)]


def moving(layer) -> tuple[np.ndarray, np.ndarray]:
    return (keras.ops.convert_to_numpy(layer.moving_mean),
            keras.ops.convert_to_numpy(layer.moving_variance))


def test_each_layer_gets_the_moments_of_its_clean_inputs_in_graph_order():
    """Layer 2's statistics are those of its inputs as normalised by layer 1's new ones, and
    neither augmentation nor dropout touches the images the statistics come from."""
    model, images = small_model(), faces(40)

    assert recalibrate(model, images, batch_size=16) == 2

    for layer in norms(model):  # checked after both were set: layer 2's input uses layer 1's
        inputs = keras.Model(model.inputs, layer.input)(images[..., None].astype("float32"),
                                                        training=False)
        inputs = keras.ops.convert_to_numpy(inputs).reshape(-1, layer.moving_mean.shape[0])
        mean, variance = moving(layer)
        np.testing.assert_allclose(mean, inputs.mean(axis=0), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(variance, inputs.var(axis=0), rtol=1e-3, atol=1e-3)


def test_a_sample_is_spread_over_the_images_not_taken_from_the_front():
    """Sources list images class by class: a sample of the first rows would see one class."""
    images = np.concatenate([np.zeros((50, 48, 48)), np.full((50, 48, 48), 255)]).astype(np.uint8)
    model = small_model()
    recalibrate(model, images, sample=10)
    sampled_mean = moving(norms(model)[0])[0]
    recalibrate(model, images[:10])
    front_mean = moving(norms(model)[0])[0]
    assert not np.allclose(sampled_mean, front_mean, atol=1e-3)


def overflow(model: keras.Model) -> None:
    """Statistics that send every activation past float32's range: NaN scores."""
    for layer in norms(model):
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, -3e38, np.float32))
        layer.moving_variance.assign(np.zeros(layer.moving_variance.shape, np.float32))


def assert_statistics_are(model: keras.Model, expected: list) -> None:
    for layer, (mean, variance) in zip(norms(model), expected, strict=True):
        np.testing.assert_array_equal(moving(layer)[0], mean)
        np.testing.assert_array_equal(moving(layer)[1], variance)


def validation_labelled_by(model: keras.Model, images: np.ndarray) -> Split:
    return Split(images=images, labels=predict_labels(model, images))


def test_new_statistics_are_put_back_when_validation_accuracy_falls():
    """Validation labelled with the model's own predictions scores 1.0 before; recalibrating
    from very different images changes predictions, so the old statistics must return."""
    model = small_model()
    validation = validation_labelled_by(model, faces(60, seed=2))
    before = [moving(layer) for layer in norms(model)]

    result = recalibrate_if_better(model, faces(60, seed=3) // 8, validation=validation)

    assert result.val_accuracy_before == 1.0 and result.val_accuracy_after < 1.0
    assert not result.kept
    assert_statistics_are(model, before)
    assert result.as_record()["kept"] is False


def test_new_statistics_are_kept_when_validation_accuracy_does_not_fall():
    """Validation labelled with the recalibrated model's predictions: accuracy rises, so the
    new statistics stay."""
    images = faces(60, seed=3)
    recalibrated = small_model()
    recalibrate(recalibrated, images)
    validation = validation_labelled_by(recalibrated, faces(60, seed=2))
    model = small_model()

    result = recalibrate_if_better(model, images, validation=validation)

    assert result.kept and result.val_accuracy_after == 1.0 > result.val_accuracy_before
    for layer, expected in zip(norms(model), norms(recalibrated), strict=True):
        np.testing.assert_allclose(moving(layer)[0], moving(expected)[0], rtol=1e-6)


def test_new_statistics_that_give_non_finite_scores_are_put_back(monkeypatch):
    """New statistics that overflow (a mixed-precision run's extreme activations) make every
    validation score NaN: they are put back like ones that lower accuracy, instead of failing
    a finished training in the scoring step, which a resume would only repeat."""
    import fer.batchnorm

    def overflowing(model, images, **options):
        overflow(model)

    model = small_model()
    validation = validation_labelled_by(model, faces(60, seed=2))
    before = [moving(layer) for layer in norms(model)]
    monkeypatch.setattr(fer.batchnorm, "recalibrate", overflowing)

    result = recalibrate_if_better(model, faces(60, seed=3), validation=validation)

    assert not result.kept and result.val_accuracy_after is None
    assert result.outcome == "not kept (non-finite scores with the new statistics)"
    assert result.as_record()["val_accuracy_after"] is None
    assert_statistics_are(model, before)


def test_a_model_whose_scores_are_not_finite_is_left_as_trained():
    """A model that overflows in its training precision scores validation NaN before any
    recalibration (float16 on a GPU): there is nothing to compare with, so its statistics
    stay as trained and the training goes on to save it, instead of failing after the last
    epoch, which a resume would repeat."""
    model = small_model()
    validation = validation_labelled_by(model, faces(60, seed=2))
    overflow(model)
    before = [moving(layer) for layer in norms(model)]

    result = recalibrate_if_better(model, faces(60, seed=3), validation=validation)

    assert not result.kept and result.val_accuracy_before is None
    assert result.outcome == "not tried (non-finite scores in the training precision)"
    assert result.as_record()["val_accuracy_before"] is None
    assert_statistics_are(model, before)


@pytest.mark.parametrize("name, recalibrates", [("default", True), ("default-pca", True),
                                                 ("wide-full-res", True), ("seed", False),
                                                 ("mini-xception", False)])
def test_the_projects_recipes_recalibrate_and_the_published_ones_do_not(name, recalibrates):
    from fer.models import get_spec

    assert get_spec(name).recalibrate_batch_norm is recalibrates


def deep_model(layers: int) -> keras.Model:
    """``layers`` normalised convolutions in a row: one new moments model each."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Conv2D(4, 3, strides=4)(inputs)
    for _ in range(layers):
        x = FusedBatchNorm()(keras.layers.Conv2D(4, 3, padding="same")(x))
    x = keras.layers.Dense(len(CLASS_NAMES))(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, keras.layers.Softmax()(x))


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_small_split_recalibrates_without_tensorflows_retracing_warning():
    """One new model per layer traces once by design; with one batch per layer TensorFlow
    would call that excessive retracing, and `fer train` would print it on a small dataset."""
    tensorflow_log, records = logging.getLogger("tensorflow"), Records()
    tensorflow_log.addHandler(records)
    try:
        assert recalibrate(deep_model(8), faces(16), batch_size=16) == 8
    finally:
        tensorflow_log.removeHandler(records)
    assert not [m for m in records.messages if "retracing" in m]
