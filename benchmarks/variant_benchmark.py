"""Recipe experiments on the default model: train a variant, or time its training steps.

The variants are the ones BENCHMARKS.md reports as tried ("Where the time goes"); each
changes one thing about the `default` model. Variants are chosen on validation accuracy,
never on test. Usage:

    python benchmarks/variant_benchmark.py --data ../shared/data/fer2013.zip --variant flat
    python benchmarks/variant_benchmark.py --steps-only --variant default --variant keras-bn
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import machine_line

# name -> (builder options, optimiser/spec options)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "keras-bn": ({"keras_batch_norm": True}, {}),
    "no-bn": ({"batch_norm": False}, {}),
    "low-regularisation": ({"dropout": 0.1}, {"weight_decay": 0.01}),
    "flat": ({"flatten_head": True}, {}),
    "deep-last": ({"last_stage_convs": 3}, {}),
    "peak-lr-4e-3": ({}, {"learning_rate": 4e-3}),
}


def build_variant(*, keras_batch_norm: bool = False, batch_norm: bool = True,
                  dropout: float = 0.3, flatten_head: bool = False, last_stage_convs: int = 2):
    """The default model's builder with the experiment's knobs (defaults = `default`)."""
    import keras
    from keras import layers

    from fer import models

    def conv(x, filters):
        if not batch_norm:
            return layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        norm = layers.BatchNormalization() if keras_batch_norm else models.FusedBatchNorm()
        return layers.Activation("relu")(norm(x))

    inputs = keras.Input(models.INPUT_SHAPE, name="pixels")
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = models.RandomAffine(rotation=0.25, zoom=0.1, shift=0.1, dtype="float32")(x)
    x = models.PixelUnshuffle(2)(x)
    widths = (48, 96, 192)
    for stage, filters in enumerate(widths):
        if stage:
            x = layers.MaxPooling2D(2)(x)
        for _ in range(last_stage_convs if stage == len(widths) - 1 else 2):
            x = conv(x, filters)
    x = layers.Flatten()(x) if flatten_head else layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    return models._finish(inputs, layers.Dense(7)(x), name="default")


def register(name: str):
    """Add the variant to fer's registry (in this process only) under its own name."""
    import functools

    from fer.models import REGISTRY

    build_options, spec_options = VARIANTS[name]
    REGISTRY[name] = dataclasses.replace(
        REGISTRY["default"], name=name, build=functools.partial(build_variant, **build_options),
        **spec_options)
    return REGISTRY[name]


def steps_per_second(name: str, *, batch_size: int, steps: int) -> float:
    """Training images/s of the variant on random pixels (model compute only, no data)."""
    import keras
    import numpy as np

    from fer.precision import choose_precision, dtype_policy

    with dtype_policy(choose_precision("auto")):
        model = register(name).build()
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size * steps, 48, 48, 1)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 7, batch_size * steps), 7)
    model.fit(pixels[:batch_size * 5], labels[:batch_size * 5], batch_size=batch_size, verbose=0)
    started = time.perf_counter()
    model.fit(pixels, labels, batch_size=batch_size, epochs=1, verbose=0)
    return batch_size * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--data", type=Path, help="needed unless --steps-only")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps-only", action="store_true",
                        help="time 60 training steps per variant instead of training")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fer-variants")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    if args.steps_only:
        for name in args.variant:
            ips = steps_per_second(name, batch_size=args.batch_size, steps=60)
            print(f"{name}: {ips:.0f} training images/s (batch {args.batch_size})", flush=True)
        return
    if args.data is None:
        parser.error("--data is required to train")

    from fer.config import TrainConfig
    from fer.data import load_dataset
    from fer.train import train

    dataset = load_dataset(args.data, cache_dir=Path(tempfile.gettempdir()) / "fer-bench-cache")
    for name in args.variant:
        register(name)
        result = train(dataset, TrainConfig(model=name, epochs=args.epochs,
                                            batch_size=args.batch_size, out_dir=args.out),
                       verbose=2)
        keys = ("best_epoch", "best_val_accuracy", "accuracy", "macro_f1",
                "train_images_per_second", "wall_seconds")
        print(f"{name}: " + json.dumps({k: result.metrics[k] for k in keys}), flush=True)


if __name__ == "__main__":
    main()
