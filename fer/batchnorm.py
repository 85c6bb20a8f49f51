"""Batch-normalisation statistics recomputed from clean images after training.

During training, each BatchNormalization layer's moving mean and variance average the
batches it normalised: augmented faces (rotated, zoomed, shifted) seen under weights that
kept changing. At inference the model sees clean faces under its final weights. Recomputing
the statistics once, layer by layer, from clean training images under the kept weights
removes that mismatch ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm"). On the 20-epoch default and `default-full-res` models (three training seeds
each) it raised validation accuracy every time and test accuracy by 0.4 points on average;
macro-F1 moved both ways on the default (BENCHMARKS.md, session 29). Whether a run keeps
the new statistics is decided on the validation split, like everything else a run chooses.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import keras
import numpy as np

from fer.data import Split, spread_sample
from fer.errors import NonFiniteScoresError
from fer.evaluate import predict_labels
from fer.pipeline import image_batches

SAMPLE_IMAGES = 4000  # spread over the training split: plenty for per-channel means


@dataclass(frozen=True)
class Recalibration:
    """What recalibrate_if_better measured and decided."""

    kept: bool
    val_accuracy_before: float | None  # None: non-finite scores in the training precision
    val_accuracy_after: float | None  # None: the new statistics gave non-finite scores
    seconds: float

    @property
    def outcome(self) -> str:
        if self.kept:
            return "kept"
        if self.val_accuracy_before is None:
            return "not tried (non-finite scores in the training precision)"
        if self.val_accuracy_after is None:
            return "not kept (non-finite scores with the new statistics)"
        return "not kept (validation fell)"

    def as_record(self) -> dict:
        before, after = self.val_accuracy_before, self.val_accuracy_after
        return {"kept": self.kept,
                "val_accuracy_before": None if before is None else round(before, 4),
                "val_accuracy_after": None if after is None else round(after, 4),
                "seconds": round(self.seconds, 1)}


def recalibrate(model: keras.Model, images: np.ndarray, *, sample: int = SAMPLE_IMAGES,
                batch_size: int = 256) -> int:
    """Set every top-level BatchNormalization layer's moving mean and variance to those of
    its inputs over ``sample`` of ``images`` (uint8, n x 48 x 48), spread evenly since a
    source may list them class by class. Returns how many layers were set.

    The model runs in inference mode (no augmentation, no dropout), one layer at a time in
    graph order, so each layer sees its inputs as normalised by the layers before it, with
    their new statistics.
    """
    spread = spread_sample(images, sample)
    norms = _batch_norms(model)
    with _expected_retracing():
        for norm in norms:
            mean, variance = _input_moments(model, norm, spread, batch_size=batch_size)
            norm.moving_mean.assign(mean.astype(norm.moving_mean.dtype))
            norm.moving_variance.assign(variance.astype(norm.moving_variance.dtype))
    return len(norms)


class _DropRetracingWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def _expected_retracing():
    """Silence TensorFlow's retracing warning while the per-layer models run.

    Each layer gets a new moments model, so each traces its predict function once by
    design. On a small training split (a batch or two per layer) every predict call is
    then a trace, and TensorFlow warns about "excessive" retracing that is not there.
    """
    logger, dropping = logging.getLogger("tensorflow"), _DropRetracingWarnings()
    logger.addFilter(dropping)
    try:
        yield
    finally:
        logger.removeFilter(dropping)


def _batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def _input_moments(model: keras.Model, norm: keras.layers.Layer, images: np.ndarray, *,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of ``norm``'s input over ``images``.

    The sub-model returns each image's spatial mean of x and x^2, so that only (n, channels)
    arrays leave TensorFlow; every image has the same number of positions, so their average
    is the population's.
    """
    ops = keras.ops
    features = ops.cast(norm.input, "float32")
    axes = tuple(range(1, len(features.shape) - 1))
    moments = keras.Model(model.inputs, [ops.mean(features, axis=axes),
                                         ops.mean(ops.square(features), axis=axes)])
    means, squares = moments.predict(image_batches(images, batch_size=batch_size), verbose=0)
    mean = np.asarray(means, dtype=np.float64).mean(axis=0)
    variance = np.asarray(squares, dtype=np.float64).mean(axis=0) - mean ** 2
    return mean, np.maximum(variance, 0.0)


def recalibrate_if_better(model: keras.Model, images: np.ndarray, *, validation: Split,
                          sample: int = SAMPLE_IMAGES) -> Recalibration:
    """Recalibrate ``model`` from ``images``; keep the new statistics only if validation
    accuracy does not fall, else put the old ones back."""
    started = time.perf_counter()
    # Scored here, not taken from Keras' history, so that before and after are measured alike.
    before = _accuracy_or_none(model, validation)
    if before is None:  # the model overflows in its training precision (float16 on a GPU):
        # nothing to compare with, so it is saved as trained (in float32, where it does not)
        return Recalibration(kept=False, val_accuracy_before=None, val_accuracy_after=None,
                             seconds=time.perf_counter() - started)
    norms = _batch_norms(model)
    saved = [(keras.ops.convert_to_numpy(layer.moving_mean),
              keras.ops.convert_to_numpy(layer.moving_variance)) for layer in norms]
    recalibrate(model, images, sample=sample)
    after = _accuracy_or_none(model, validation)  # None: the old statistics go back
    kept = after is not None and after >= before
    if not kept:
        for layer, (mean, variance) in zip(norms, saved, strict=True):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
    return Recalibration(kept=kept, val_accuracy_before=before, val_accuracy_after=after,
                         seconds=time.perf_counter() - started)


def _accuracy_or_none(model: keras.Model, split: Split) -> float | None:
    """``model``'s accuracy on ``split``; None where its scores are not finite."""
    try:
        return float(np.mean(predict_labels(model, split.images) == split.labels))
    except NonFiniteScoresError:
        return None
