"""The tf.data pipelines that feed Keras: what they yield, and that autotuning stays off."""

from __future__ import annotations

import numpy as np

from fer.data import Split
from fer.labels import NUM_CLASSES
from fer.pipeline import image_batches, training_batches


def _split(count: int = 10) -> Split:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 48, 48), dtype=np.uint8)
    return Split(images=images, labels=np.arange(count) % NUM_CLASSES)


def _epoch(data) -> list[tuple[np.ndarray, ...]]:
    return [tuple(np.asarray(part) for part in batch) for batch in data]


def test_autotuning_is_off_in_every_pipeline():
    """tf.data's autotuning thread stalled training for 25-40 s at some epoch starts."""
    split = _split()
    for data in (training_batches(split, batch_size=4, shuffle_seed=1),
                 training_batches(split, batch_size=4).repeat(),
                 image_batches(split.images, batch_size=4)):
        assert data.options().autotune.enabled is False


def test_training_batches_yield_float_pixels_one_hot_labels_and_weights():
    """Pixels keep their raw values as float32; labels are one-hot; weights follow labels."""
    split = _split()
    weights = np.linspace(0.5, 2.0, NUM_CLASSES).astype("float32")
    batches = _epoch(training_batches(split, batch_size=4, class_weights=weights))
    assert [len(b[0]) for b in batches] == [4, 4, 2]  # the last batch is short, not dropped
    pixels = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert pixels.dtype == np.float32 and pixels.shape == (10, 48, 48, 1)
    np.testing.assert_array_equal(pixels[..., 0], split.images)
    np.testing.assert_array_equal(labels.argmax(axis=1), split.labels)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]),
                                  weights[split.labels])


def test_training_batches_reshuffle_every_epoch_and_repeat_from_the_seed():
    """Each epoch sees a new order; the same seed gives the same sequence of orders."""
    split = _split(40)

    def two_epochs(seed):
        data = training_batches(split, batch_size=40, shuffle_seed=seed)
        return [_epoch(data)[0][1].argmax(axis=1) for _ in range(2)]

    first, second = two_epochs(7)
    assert not np.array_equal(first, second)
    assert sorted(first) == sorted(second) == sorted(split.labels)
    for a, b in zip(two_epochs(7), (first, second), strict=True):
        np.testing.assert_array_equal(a, b)


def test_image_batches_keep_order_and_add_a_channel():
    """Scoring needs the images back in their order, as float32 with one channel."""
    images = _split(5).images
    batches = [np.asarray(batch) for batch in image_batches(images, batch_size=2)]
    assert [b.shape for b in batches] == [(2, 48, 48, 1), (2, 48, 48, 1), (1, 48, 48, 1)]
    assert batches[0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(batches)[..., 0], images)
