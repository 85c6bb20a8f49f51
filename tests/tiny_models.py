"""A small normalised CNN and random faces, for the tests of fer.batchnorm and fer.selection."""

from __future__ import annotations

import keras
import numpy as np

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
