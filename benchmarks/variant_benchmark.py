"""Recipe experiments on the default model: train a variant, or time its training steps.

The variants are the ones BENCHMARKS.md reports as tried ("Where the time goes"); each
changes one thing about the `default` model. Variants are chosen on validation accuracy,
never on test. Usage:

    python benchmarks/variant_benchmark.py --data ../shared/data/fer2013.zip --variant flat
    python benchmarks/variant_benchmark.py --steps-only --variant default --variant keras-bn
    python benchmarks/variant_benchmark.py --data ../shared/data/fer2013.zip \
        --variant default-pca --epochs 8 --batch-size 128 --learning-rate 3e-3  # fast's schedule
    python benchmarks/variant_benchmark.py --data ../shared/data/fer2013.zip \
        --variant widths-64-adamw --epochs 60 --refit  # train + validation, the last epoch kept
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import BENCH_CACHE, machine_line

from fer.precision import PRECISIONS, choose_precision, prefer_onednn


def _keras_bn_block(x, filters: int):
    """conv-BN-ReLU with Keras' own BatchNormalization (what FusedBatchNorm replaced)."""
    from keras import layers

    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    return layers.Activation("relu")(layers.BatchNormalization()(x))


def _no_bn_block(x, filters: int):
    """conv-ReLU without normalisation (the lower bound of normalisation's cost)."""
    from keras import layers

    return layers.Conv2D(filters, 3, padding="same", activation="relu")(x)


# name -> (fer.models.build_default options, registry spec options)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "keras-bn": ({"conv_block": _keras_bn_block}, {}),
    "no-bn": ({"conv_block": _no_bn_block}, {}),
    "low-regularisation": ({"dropout": 0.1}, {"weight_decay": 0.01}),
    "flat": ({"head_grid": 6}, {}),
    "head-grid-3": ({"head_grid": 3}, {}),
    "deep-last": ({"convs_per_stage": (2, 2, 3)}, {}),
    "peak-lr-4e-3": ({}, {"learning_rate": 4e-3}),
    "peak-lr-1e-3": ({}, {"learning_rate": 1e-3}),
    "widths-32": ({"widths": (32, 64, 128)}, {}),
    "widths-40": ({"widths": (40, 80, 160)}, {}),
    "widths-48": ({"widths": (48, 96, 192)}, {}),  # `default-48`'s widths, standardised input
    "single-first-conv": ({"convs_per_stage": (1, 2, 2)}, {}),
    "light-augmentation": ({"rotation": 0.1, "zoom": 0.05, "shift": 0.05}, {}),
    "no-label-smoothing": ({}, {"label_smoothing": 0.0}),
    "label-smoothing-0.2": ({}, {"label_smoothing": 0.2}),
    "dropout-0.5": ({"dropout": 0.5}, {}),
    "rescale-255": ({"standardize": False}, {}),  # the input scaling before session 10
    # the `default-pca` model (fer.models) as sessions 13-16 measured it, with AdamW
    "pca-first-conv": ({}, {"first_conv": "pca", "optimizer": "adamw"}),
    # `default-pca` as session 17 ran it: Muon, the default's augmentation and dropout 0.3
    "pca-first-conv-muon": ({}, {"first_conv": "pca", "optimizer": "muon"}),
    # short schedules underfit (training accuracy ~ validation's): `default-pca` regularised
    # less, lighter augmentation and dropout 0.1
    "pca-muon-light": ({"rotation": 0.1, "zoom": 0.05, "shift": 0.05, "dropout": 0.1},
                       {"first_conv": "pca", "optimizer": "muon"}),
    # lighter still: flips and shifts of up to 5% only (no rotation or zoom), as airbench's
    # short CIFAR-10 schedules augment; `default-pca` since session 18
    "pca-muon-flip-shift": ({"rotation": 0.0, "zoom": 0.0, "shift": 0.05, "dropout": 0.1},
                            {"first_conv": "pca", "optimizer": "muon"}),
    # `default` trains with Muon since session 16: the variants above change that recipe,
    # so figures measured before it (BENCHMARKS.md) are AdamW's; `adamw` is that default
    "adamw": ({}, {"optimizer": "adamw"}),
    "muon": ({}, {"optimizer": "muon"}),  # the same as `default` now, as session 16 ran it
    # does the 20-epoch default underfit too (training accuracy 0.689 against validation
    # 0.6675, session 16)? `pca-muon-light`'s augmentation and dropout on `default`
    "muon-light": ({"rotation": 0.1, "zoom": 0.05, "shift": 0.05, "dropout": 0.1}, {}),
    # more capacity for `best`'s 60-epoch members (session 22): a fourth stage at 3x3,
    # wider stages, or a third convolution in every stage
    "four-stage": ({"widths": (32, 96, 192, 384), "convs_per_stage": (2, 2, 2, 2)}, {}),
    "wide-four-stage": ({"widths": (64, 128, 256, 512), "convs_per_stage": (2, 2, 2, 2)}, {}),
    "widths-64": ({"widths": (64, 128, 256)}, {}),
    # Muon's Newton-Schulz steps halved widths-64's training images/s on the AMX machine
    "widths-64-adamw": ({"widths": (64, 128, 256)}, {"optimizer": "adamw"}),
    # wider still for `best` (session 24): about 2.2x widths-64-adamw's multiply-adds
    "widths-96-adamw": ({"widths": (96, 192, 384)}, {"optimizer": "adamw"}),
    "four-stage-adamw": ({"widths": (32, 96, 192, 384), "convs_per_stage": (2, 2, 2, 2)},
                         {"optimizer": "adamw"}),
    "deep-333": ({"convs_per_stage": (3, 3, 3)}, {}),
    # session 26: `wide` with a fourth stage at 3x3 (the literature's VGG widths on the fold),
    # timed beside `full-res-wide-adamw` below, ~1.35x wide's multiply-adds each
    "wide-four-stage-adamw": ({"widths": (64, 128, 256, 512), "convs_per_stage": (2, 2, 2, 2)},
                              {"optimizer": "adamw"}),
    # session 30: a cheaper full-resolution stage than `default-full-res` (two 16-channel
    # convolutions at 48x48, ~1.2x the default's multiply-adds): 8 channels, ~1.05x, ran its
    # training steps at half the default's images/s (probably oneDNN's 8-channel
    # convolutions); one 16-channel convolution is `full-res-single-16` below
    "full-res-8": ({"widths": (8, 32, 96, 192), "convs_per_stage": (2, 2, 2, 2),
                    "space_to_depth": False}, {}),
}


def _sam_train_step(model, data, *, rho: float):
    """One sharpness-aware minimisation step (Foret et al. 2021): the gradient is taken at
    the weights moved ``rho`` along the normalised gradient (the worst nearby point), then
    applied at the original weights by the model's own optimiser. Both passes see the same
    augmented images and dropout masks (the seed generators are rewound), and the batch-norm
    moving statistics are the first pass's (the second, at the moved weights, is undone);
    twice the forward and backward cost of a plain step."""
    import tensorflow as tf
    from keras.src.trainers.data_adapters import data_adapter_utils

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    weights = model.trainable_weights
    seeds = [v for v in model.non_trainable_variables if "seed_generator_state" in v.path]
    statistics = [v for v in model.non_trainable_variables
                  if "seed_generator_state" not in v.path]
    rewind = [tf.identity(v.value) for v in seeds]

    def loss_and_gradients():
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                       training=True)
        return y_pred, loss, tape.gradient(loss, weights)

    y_pred, loss, gradients = loss_and_gradients()
    model._loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])
    scale = rho / (tf.linalg.global_norm(gradients) + 1e-12)
    steps = [tf.cast(g, v.dtype) * scale for g, v in zip(gradients, weights, strict=True)]
    for variable, step in zip(weights, steps, strict=True):
        variable.assign_add(step)
    for variable, value in zip(seeds, rewind, strict=True):
        variable.assign(value)
    kept = [tf.identity(v.value) for v in statistics]
    _, _, sharp_gradients = loss_and_gradients()
    for variable, value in zip(statistics, kept, strict=True):
        variable.assign(value)
    for variable, step in zip(weights, steps, strict=True):
        variable.assign_sub(step)
    model.optimizer.apply_gradients(zip(sharp_gradients, weights, strict=True))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _sam_build(rho: float, build):
    """``build()``'s model, whose fit() takes SAM steps (the saved float32 copy is plain)."""
    import functools
    import types

    import keras

    if keras.config.dtype_policy().name == "mixed_float16":  # its loss scaling is not done here
        raise SystemExit("the sam-* variants take float32 or mixed_bfloat16, not mixed_float16")
    model = build()
    model.train_step = types.MethodType(functools.partial(_sam_train_step, rho=rho), model)
    return model


# session 45: sharpness-aware minimisation, rho as the paper's CIFAR runs (0.05) and larger;
# name -> (the registry model it trains, rho)
SAM_VARIANTS = {"sam-0.05": ("default", 0.05), "sam-0.1": ("default", 0.1),
                "wide-full-res-sam-0.05": ("wide-full-res", 0.05)}


# session 47: decoupled weight decay on the kernels only, not on batch norm's scale and
# offset or the dense layer's bias (AdamW as its paper and most recipes apply it; Keras'
# optimisers decay every trainable variable); session 15's `decay-kernels-only` (removed
# since) measured it on the AdamW default of then; name -> the registry model it trains
NO_DECAY_NORM_VARIANTS = {"no-decay-norm": "default", "wide-full-res-no-decay-norm": "wide-full-res"}
NOT_DECAYED = ["gamma", "beta", "bias"]  # Keras' variable names; kernels are "kernel"
NO_DECAY_SUFFIX = "-no-decay-norm"


def build_optimizer_sparing_norms(kind: str, **options):
    """fer.optimizers.build_optimizer, with ``kind`` + NO_DECAY_SUFFIX building ``kind``'s
    optimiser that leaves NOT_DECAYED variables out of the weight decay."""
    from fer.optimizers import build_optimizer

    if not kind.endswith(NO_DECAY_SUFFIX):
        return build_optimizer(kind, **options)
    optimizer = build_optimizer(kind.removesuffix(NO_DECAY_SUFFIX), **options)
    optimizer.exclude_from_weight_decay(var_names=NOT_DECAYED)
    return optimizer


# Variants the registry has since taken in under another name, measured under these names
# (BENCHMARKS.md): session 26's 32-channel stage at 48x48 ahead of `wide`'s stages is
# `wide-full-res`, session 30's single 16-channel convolution at 48x48 ahead of the
# default's stages is `default-full-res-single`. Registry models can be given by their own
# names too (session 27's `default-full-res`).
REGISTERED_AS = {"full-res-wide-adamw": "wide-full-res",
                 "full-res-single-16": "default-full-res-single"}


def register(name: str):
    """Add the variant to fer's registry and model names (in this process only) under its
    own name; a registry model that is not a variant is used as it is."""
    spec = _registered(name)
    import fer.options

    if name not in fer.options.MODEL_NAMES:  # fer.train checks names against this tuple
        fer.options.MODEL_NAMES += (name,)
    return spec


def _registered(name: str):
    import functools

    from fer.models import REGISTRY, build_default

    if name in REGISTERED_AS:
        REGISTRY[name] = dataclasses.replace(REGISTRY[REGISTERED_AS[name]], name=name)
        return REGISTRY[name]
    if name in NO_DECAY_NORM_VARIANTS:
        import fer.train

        base = REGISTRY[NO_DECAY_NORM_VARIANTS[name]]
        fer.train.build_optimizer = build_optimizer_sparing_norms  # in this process only
        REGISTRY[name] = dataclasses.replace(base, name=name,
                                             optimizer=base.optimizer + NO_DECAY_SUFFIX)
        return REGISTRY[name]
    if name in SAM_VARIANTS:
        base, rho = SAM_VARIANTS[name]
        REGISTRY[name] = dataclasses.replace(
            REGISTRY[base], name=name,
            build=functools.partial(_sam_build, rho, REGISTRY[base].build))
        return REGISTRY[name]
    if name not in VARIANTS:
        return REGISTRY[name]
    build_options, spec_options = VARIANTS[name]
    REGISTRY[name] = dataclasses.replace(
        REGISTRY["default"], name=name, build=functools.partial(build_default, **build_options),
        **spec_options)
    return REGISTRY[name]


def steps_per_second(name: str, *, batch_size: int, steps: int, precision: str) -> float:
    """Training images/s of the variant on random pixels (model compute only, no data)."""
    import keras
    import numpy as np

    from fer.precision import dtype_policy

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size * steps, 48, 48, 1)).astype("float32")
    spec = register(name)
    with dtype_policy(precision):
        model = spec.build()
    spec.prepare(model, pixels[..., 0])  # as in training (a frozen first conv has no gradient)
    optimizer = build_optimizer_sparing_norms(spec.optimizer, learning_rate=spec.learning_rate,
                                              weight_decay=spec.weight_decay,
                                              total_steps=steps + 5, precision=precision)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    labels = keras.utils.to_categorical(rng.integers(0, 7, batch_size * steps), 7)
    model.fit(pixels[:batch_size * 5], labels[:batch_size * 5], batch_size=batch_size, verbose=0)
    started = time.perf_counter()
    model.fit(pixels, labels, batch_size=batch_size, epochs=1, verbose=0)
    return batch_size * steps / (time.perf_counter() - started)


def main() -> None:
    prefer_onednn()  # as `fer train` does, before TensorFlow loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from fer.models import REGISTRY  # after prefer_onednn: it loads TensorFlow

    parser.add_argument("--variant", action="append",
                        choices=sorted({*VARIANTS, *SAM_VARIANTS, *NO_DECAY_NORM_VARIANTS,
                                        *REGISTERED_AS, *REGISTRY}),
                        required=True)
    parser.add_argument("--data", type=Path, help="needed unless --steps-only")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float,
                        help="peak learning rate (default: the variant's own; the fast profile: 3e-3)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="training seed (weights, augmentation, order); the split stays seed 1337")
    parser.add_argument("--steps-only", action="store_true",
                        help="time 60 training steps per variant instead of training")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: from the CPU flags, as fer train picks it")
    parser.add_argument("--refit", action="store_true",
                        help="train on train + validation for --epochs and keep the last epoch "
                             "(the count chosen on validation beforehand); validation figures "
                             "are then in-sample, only test counts")
    parser.add_argument("--tail-average", type=int, metavar="K",
                        help="keep the average of the last K epochs' weights instead of the "
                             "best epoch's (stochastic weight averaging over the cosine "
                             "schedule's tail; the batch-norm statistics recalibrated after, "
                             "as fer.train does, where validation does not fall)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fer-variants")
    args = parser.parse_args()
    if args.tail_average is not None and not 1 <= args.tail_average <= args.epochs:
        parser.error(f"--tail-average {args.tail_average}: expected 1 to --epochs "
                     f"({args.epochs})")
    if args.tail_average and args.refit:
        parser.error("--tail-average and --refit each choose the kept weights: give one")
    print(machine_line(), flush=True)
    precision = choose_precision(args.precision)
    if args.steps_only:
        for name in args.variant:
            ips = steps_per_second(name, batch_size=args.batch_size, steps=60,
                                   precision=precision)
            print(f"{name}: {ips:.0f} training images/s (batch {args.batch_size}, {precision})",
                  flush=True)
        return
    if args.data is None:
        parser.error("--data is required to train")

    from fer.config import TrainConfig
    from fer.data import load_dataset
    from fer.train import fit, score

    dataset = load_dataset(args.data, cache_dir=BENCH_CACHE)
    if args.refit:
        dataset = fold_validation_into_train(dataset)
        keep_last_epoch()
    if args.tail_average:
        keep_tail_average(args.tail_average)
    # Each variant is fitted; the test split is scored for the one chosen alone (the others'
    # run folders keep their checkpoint: `fer train --resume` would score them)
    fitted = {}  # variant -> its fitted run
    for name in args.variant:
        register(name)
        fitted[name] = fit(dataset, TrainConfig(model=name, epochs=args.epochs,
                                                batch_size=args.batch_size, out_dir=args.out,
                                                seed=args.seed, learning_rate=args.learning_rate,
                                                precision=precision),
                           verbose=2)
        keys = ("best_epoch", "best_val_accuracy", "saved_model_val_accuracy",
                "train_images_per_second", "wall_seconds")
        print(f"{name}: " + json.dumps({k: fitted[name].metrics[k] for k in keys}), flush=True)
    if args.refit:  # validation was trained on: nothing to choose by, each its test figures
        for name, result in fitted.items():
            print(f"refit, validation in-sample: {name}: "
                  f"{scored_on_test(score(result.run_dir, dataset.test))}")
        return
    chosen = max(fitted, key=lambda name: fitted[name].metrics["saved_model_val_accuracy"])
    print(f"chosen on validation (saved model): {chosen}: "
          f"{scored_on_test(score(fitted[chosen].run_dir, dataset.test))}")


def scored_on_test(metrics: dict) -> str:
    return f"test accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}"


def fold_validation_into_train(dataset):
    """The dataset with its validation images added to train (validation stays, in-sample)."""
    import numpy as np

    from fer.data import Split

    train, validation = dataset.train, dataset.validation
    merged = Split(images=np.concatenate([train.images, validation.images]),
                   labels=np.concatenate([train.labels, validation.labels]))
    return dataclasses.replace(dataset, train=merged,
                               validation_origin=dataset.validation_origin + ", folded into train")


def keep_last_epoch() -> None:
    """Make `fer.train` keep the last epoch's weights (in this process only): with validation
    inside train, its accuracy cannot choose the epoch."""
    import fer.train

    class KeepLastWeights(fer.train.KeepBestWeights):
        def on_epoch_end(self, epoch, logs=None):
            self.best_value, self.best_epoch = float((logs or {}).get("val_accuracy", 0)), epoch + 1

    fer.train.KeepBestWeights = KeepLastWeights


def keep_tail_average(epochs: int) -> None:
    """Make `fer.train` keep the running average of the weights of the last ``epochs``
    epochs (in this process only), its validation accuracy and last epoch reported as the
    kept ones (the average's own validation is the saved model's figure)."""
    import fer.train

    class KeepTailAverage(fer.train.KeepBestWeights):
        def on_epoch_end(self, epoch, logs=None):
            first = self.params["epochs"] - epochs + 1  # 1-based, the first epoch averaged
            if epoch + 1 < first:
                return
            weights, count = self.model.get_weights(), epoch + 2 - first
            self.weights = weights if count == 1 else [
                (kept + (new - kept) / count).astype(new.dtype)
                for kept, new in zip(self.weights, weights, strict=True)]
            self.best_value = float((logs or {}).get("val_accuracy", 0))
            self.best_epoch = epoch + 1

    fer.train.KeepBestWeights = KeepTailAverage


if __name__ == "__main__":
    main()
