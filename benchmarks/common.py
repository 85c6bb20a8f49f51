"""Shared pieces of the benchmark scripts: the machine record, the data cache and the seed
reference."""

from __future__ import annotations

import datetime as dt
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fer.data import Split
from fer.manifest import machine
from fer.precision import ONEDNN_SWITCH

# The decoded dataset, shared by all benchmark scripts (decoding FER2013 takes a while).
BENCH_CACHE = Path(tempfile.gettempdir()) / "fer-bench-cache"


def refuse_below_one(parser, args, options: tuple[str, ...]) -> None:
    """A usage error (exit 2) for any of ``options`` (argparse dests) given below 1: a count
    of 0 steps, epochs or members measures nothing, or falls back to something else."""
    for option in options:
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: "
                         "expected at least 1")


def machine_line() -> str:
    info = machine()
    flags = ",".join(info["bf16_flags"]) or "no bf16 flags"
    return (f"machine: {info['cpu']} | {info['cores']} cores | {flags} | "
            f"{dt.date.today().isoformat()} | TF_NUM_INTRAOP_THREADS="
            f"{os.environ.get('TF_NUM_INTRAOP_THREADS', 'default')} | oneDNN "
            f"{ {True: 'on', False: 'off'}.get(info['onednn'], 'unknown')} ({ONEDNN_SWITCH}="
            f"{os.environ.get(ONEDNN_SWITCH, 'unset')})")


def compiled_model(model_name: str, precision: str, images, *, metrics: tuple[str, ...] = ()):
    """The registered model, built in ``precision``, prepared from the training ``images`` as
    training prepares it (`default-pca`'s first convolution set and frozen: no gradient for
    it), and compiled for timing with the optimiser it trains with (Adam for the seed, Muon
    for the default: its Newton-Schulz steps are part of the training step's cost)."""
    import keras

    from fer.models import get_spec
    from fer.optimizers import build_optimizer
    from fer.precision import dtype_policy

    spec = get_spec(model_name)
    with dtype_policy(precision):
        model = spec.build()
    spec.prepare(model, images)
    # total_steps only shapes the learning-rate schedule, which does not change a step's cost
    optimizer = build_optimizer(spec.optimizer, learning_rate=spec.learning_rate,
                                weight_decay=spec.weight_decay, total_steps=100_000,
                                precision=precision)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(), metrics=list(metrics))
    return model


def batch_throughput(model, images: np.ndarray, *, batch_size: int) -> float:
    """Images/s of one pass over the whole uint8 array through fer's own scoring call (its
    input pipeline, as `fer predict` and `fer evaluate` run it; Keras' numpy input would
    time another pipeline, with tf.data's autotuning on)."""
    from fer.evaluate import predict_probabilities

    started = time.perf_counter()
    predict_probabilities(model, images, batch_size=batch_size)
    return len(images) / (time.perf_counter() - started)


def full_training_batches(train: Split, *, batch_size: int):
    """fer's training batches of ``train``, repeated, each of exactly ``batch_size`` images:
    each epoch's short last batch is left out of the timing streams, so that steps x
    batch_size is the images trained (404 steps of 64 had counted 25,856 images, one
    epoch's 25,837 with its batch of 45)."""
    import tensorflow as tf

    from fer.pipeline import training_batches

    return training_batches(train, batch_size=batch_size, shuffle_seed=0).filter(
        lambda images, *rest: tf.shape(images)[0] == batch_size).repeat()


def fit_images_per_second(model, batches, *, steps: int, batch_size: int) -> float:
    """Images/s of one `fit` over ``steps`` batches of ``batches`` (a repeating tf.data of
    full batches: full_training_batches)."""
    started = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - started)


def measure_training_throughput(model_name: str, train: Split, *, batch_size: int, steps: int,
                                precision: str) -> float:
    """Images/s of ``steps`` training steps (after 3 warm-up steps) on real training images."""
    model = compiled_model(model_name, precision, train.images, metrics=("accuracy",))
    batches = full_training_batches(train, batch_size=batch_size)
    model.fit(batches, steps_per_epoch=3, epochs=1, verbose=0)
    return fit_images_per_second(model, batches, steps=steps, batch_size=batch_size)


def one_epoch_of_steps(train: Split, batch_size: int) -> int:
    return math.ceil(len(train) / batch_size)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "never"
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"
