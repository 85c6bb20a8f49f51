"""fer.batchnorm: statistics from clean images, layer by layer in graph order."""

from __future__ import annotations

import keras
import numpy as np
from tiny_models import faces, moving, norms, small_model

from fer.batchnorm import recalibrate


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
