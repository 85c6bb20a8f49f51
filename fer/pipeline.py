"""The tf.data pipelines that feed Keras: training and validation batches, and images to score.

Every pipeline here runs with tf.data's autotuning off and fixed, small parallelism. With
autotuning on, each iterator starts a thread that re-optimises the pipeline on a timer that
backs off towards a minute. Keras makes a new iterator every epoch and destroys the old one,
and in TensorFlow 2.21 that destruction sometimes waits out the thread's timer instead of
waking it: the training process then sat at 0% CPU for 25-40 s at the start of an epoch
(gdb: the main thread in ``~LogicalThreadWrapper`` waiting for ``Model::OptimizeLoop``; 14
of 80 full-resolution epochs in session 27 took 69-89 s instead of ~40; BENCHMARKS.md,
session 28). Nothing here needs tuning: the map only casts and one-hot encodes, so a batch
is ready in well under a millisecond against a training step of ~100 ms.
"""

from __future__ import annotations

import numpy as np

from fer.data import Split
from fer.labels import NUM_CLASSES

PARALLEL_CALLS = 2  # the map is a cast and a one-hot: two calls keep ahead of any model
PREFETCH_BATCHES = 2


def training_batches(split: Split, *, batch_size: int, shuffle_seed: int | None = None,
                     class_weights: np.ndarray | None = None):
    """(raw float pixels, one-hot labels[, sample weights]) batches, reshuffled every epoch
    when ``shuffle_seed`` is given; the last batch may be short."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((split.images[..., None], split.labels))
    if shuffle_seed is not None:
        data = data.shuffle(len(split), seed=shuffle_seed, reshuffle_each_iteration=True)

    def to_model(x, y):
        batch = (tf.cast(x, tf.float32), tf.one_hot(y, NUM_CLASSES))
        return batch if class_weights is None else (*batch, tf.gather(class_weights, y))

    return _untuned(data.batch(batch_size).map(to_model, num_parallel_calls=PARALLEL_CALLS))


def image_batches(images: np.ndarray, *, batch_size: int):
    """Float32 (n, height, width, 1) batches of ``images`` (n, height, width), in order."""
    import tensorflow as tf

    pixels = images.reshape(-1, images.shape[1], images.shape[2], 1).astype("float32")
    return _untuned(tf.data.Dataset.from_tensor_slices(pixels).batch(batch_size))


def _untuned(data):
    """``data`` prefetched, with tf.data's autotuning (and its timer thread) off."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return data.prefetch(PREFETCH_BATCHES).with_options(options)
