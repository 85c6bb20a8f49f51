"""Model registry: each entry builds a Keras model that takes raw 48x48x1 pixels (0-255).

Preprocessing (scaling, augmentation) lives inside the model, and the last layer records
the class order, so a saved ``model.keras`` needs no side information to be used
correctly. Augmentation layers are active only in training.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from fer.data import spread_sample
from fer.errors import FerError
from fer.labels import CLASS_NAMES, IMAGE_SIZE
from fer.options import check_model_name
from fer.precision import choose_precision

INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)


@keras.saving.register_keras_serializable(package="fer")
class ClassNames(layers.Layer):
    """Identity layer whose config carries the class order of the output vector."""

    def __init__(self, class_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.class_names = list(class_names)

    def call(self, inputs):
        return inputs

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names}


@keras.saving.register_keras_serializable(package="fer")
class PixelUnshuffle(layers.Layer):
    """Space-to-depth: (48, 48, c) -> (24, 24, 4c) without losing a pixel.

    Convolutions then start at 24x24, a quarter of the full-resolution cost on a CPU.
    """

    def __init__(self, factor: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        f = self.factor
        _, height, width, channels = inputs.shape
        x = keras.ops.reshape(inputs, (-1, height // f, f, width // f, f, channels))
        x = keras.ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return keras.ops.reshape(x, (-1, height // f, width // f, f * f * channels))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        f = self.factor
        return (batch, height // f, width // f, f * f * channels)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="fer")
class RandomAffine(layers.Layer):
    """Random flip, rotation, zoom and shift as one resampling op, in training only.

    Keras' RandomFlip/RandomRotation/RandomZoom/RandomTranslation each resample the batch;
    on a 2-core CPU those passes cost a fifth of a small model's training step.
    ``rotation`` is in radians, ``zoom`` and ``shift`` are fractions of the image size.
    """

    def __init__(self, *, rotation: float = 0.0, zoom: float = 0.0, shift: float = 0.0,
                 flip: bool = True, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rotation, self.zoom, self.shift, self.flip, self.seed = rotation, zoom, shift, flip, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # Keras' own RandomRotation/RandomZoom/RandomTranslation, built on the same affine
        # transform op, opt out of XLA; so does this one, or `jit_compile="auto"` would
        # XLA-compile the training step on a GPU (CPUs never get it).
        self.supports_jit = False

    def call(self, images, training=None):
        if not training:
            return images
        ops = keras.ops
        batch = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]

        def uniform(low, high):
            return keras.random.uniform((batch,), low, high, seed=self.seed_generator)

        angle = uniform(-self.rotation, self.rotation)
        scale = uniform(1.0 - self.zoom, 1.0 + self.zoom)
        mirror = ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if self.flip else ops.ones((batch,))
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        # Output pixel (x, y) samples input point A (x - cx, y - cy) + centre + shift.
        a0, a1 = ops.cos(angle) * mirror / scale, -ops.sin(angle) / scale
        b0, b1 = ops.sin(angle) * mirror / scale, ops.cos(angle) / scale
        a2 = cx - a0 * cx - a1 * cy + uniform(-self.shift, self.shift) * width
        b2 = cy - b0 * cx - b1 * cy + uniform(-self.shift, self.shift) * height
        zeros = ops.zeros((batch,))
        transform = ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return ops.image.affine_transform(images, transform, interpolation="bilinear",
                                          fill_mode="nearest")

    def get_config(self):
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "shift": self.shift, "flip": self.flip, "seed": self.seed}


@keras.saving.register_keras_serializable(package="fer")
class FusedBatchNorm(layers.BatchNormalization):
    """BatchNormalization whose training pass is TensorFlow's fused kernel.

    Keras 3 normalises a training batch with separate moment, subtract, scale and cast ops
    (and as many in the gradient). On a 2-core CPU in bfloat16 those made a 48-96-192 CNN's
    training step 1.6x slower than the single FusedBatchNormV3 op, which oneDNN runs in
    bfloat16 directly. At inference the same op normalises with the moving statistics,
    which lets TensorFlow's graph optimiser fold it into the preceding convolution.
    One difference: the moving variance is updated with the unbiased batch variance
    (n/(n-1) times Keras'). Channels-last 4-D float inputs with scale and centre, no renorm,
    no sync, no mask; anything else takes Keras' path.
    """

    FUSABLE_DTYPES = frozenset({"float16", "bfloat16", "float32"})

    def call(self, inputs, training=None, mask=None):
        fusable = (len(inputs.shape) == 4 and self.axis in (-1, 3) and self.center and self.scale
                   and not self.renorm and not self.synchronized and mask is None
                   and keras.backend.standardize_dtype(inputs.dtype) in self.FUSABLE_DTYPES)
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        training = bool(training) and self.trainable  # frozen layers use moving statistics

        outputs, batch_mean, batch_variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=tf.cast(self.gamma, "float32"), offset=tf.cast(self.beta, "float32"),
            mean=tf.constant([], "float32") if training else tf.cast(self.moving_mean, "float32"),
            variance=(tf.constant([], "float32") if training
                      else tf.cast(self.moving_variance, "float32")),
            epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC",
            is_training=training)
        if training:
            for moving, batch in ((self.moving_mean, batch_mean),
                                  (self.moving_variance, batch_variance)):
                moving.assign(moving * self.momentum
                              + tf.cast(batch, moving.dtype) * (1.0 - self.momentum))
        return outputs


@keras.saving.register_keras_serializable(package="fer")
class PerImageStandardize(layers.Layer):
    """Each image to zero mean and unit variance: removes its brightness and contrast.

    The default model's input scaling; BENCHMARKS.md (session 10) has the runs that chose it.
    It computes in float32 whatever dtype it is given, so that ``with_precision``, which
    hands the inference policy to every layer, cannot recast it: bfloat16 statistics of
    0-255 pixels lose precision (and accuracy).
    """

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "dtype": "float32"})

    def call(self, inputs):
        mean = keras.ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
        std = keras.ops.std(inputs, axis=(1, 2, 3), keepdims=True)
        return (inputs - mean) / keras.ops.maximum(std, 1e-3)


@keras.saving.register_keras_serializable(package="fer")
class HorizontalFlip(layers.Layer):
    """Mirror images left to right (the second view of flip test-time augmentation)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=2)


# "flip_average" is the averaging layer's name in flip-TTA models saved before ensembles.
FLOAT32_OUTPUT_LAYERS = frozenset({"probabilities", "class_names", "average", "flip_average"})


def with_precision(model: keras.Model, *, policy: str) -> keras.Model:
    """A copy of ``model`` (same weights) that computes in the Keras dtype policy ``policy``.

    Models are saved in float32, which runs everywhere; on a CPU with bf16 instructions the
    default model predicts 3.1-3.6x faster in mixed_bfloat16 with the same test accuracy
    (BENCHMARKS.md, inference). The softmax and what follows it stay float32, named in
    FLOAT32_OUTPUT_LAYERS; fer's own layers that must stay float32 (PerImageStandardize)
    pin their dtype themselves.
    """
    def rebuild(layer):
        dtype = "float32" if layer.name in FLOAT32_OUTPUT_LAYERS else policy
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    copy = keras.models.clone_model(model, clone_function=rebuild, recursive=True)
    copy.set_weights(model.get_weights())
    # Keras compiles the clone of a compiled (training) model, optimizer variables and all;
    # the same layers as a new model are not, so a saved copy carries no optimizer.
    return keras.Model(copy.input, copy.output, name=copy.name)


def averaging(models: Sequence[keras.Model], *, flip: bool = False) -> keras.Model:
    """One model predicting the mean of ``models``' probabilities (with ``flip``: over each
    image and its mirror too), still taking raw pixels and carrying the class order.

    Flip test-time augmentation: training already flips faces at random, so the mirror is
    an equally valid view, and the average is a cheap ensemble (+0.3 points validation,
    +0.9 test on a 20-epoch default run) for twice the inference cost. Several models
    (an ensemble, trained from different seeds) cost their number times as much.
    """
    if not models:
        raise ValueError("averaging needs at least one model")
    class_names = class_names_of(models[0])
    if any(class_names_of(m) != class_names for m in models):
        raise FerError("the models to average disagree on the class order")
    if len(models) == 1 and not flip:
        return models[0]
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    views = [inputs, HorizontalFlip()(inputs)] if flip else [inputs]
    predictions = []
    for number, model in enumerate(models, start=1):
        name = model.name if len(models) == 1 else f"{model.name}_{number}"
        core = keras.Model(model.inputs, model.get_layer("probabilities").output, name=name)
        predictions += [core(view) for view in views]
    averaged = layers.Average(name="average", dtype="float32")(predictions)
    outputs = ClassNames(class_names, name="class_names", dtype="float32")(averaged)
    suffix = ("_ensemble" if len(models) > 1 else "") + ("_flip_tta" if flip else "")
    return keras.Model(inputs, outputs, name=f"{models[0].name}{suffix}")


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the builder and the optimiser settings it was tuned with."""

    name: str
    build: Callable[[], keras.Model]
    learning_rate: float
    optimizer: str  # "adam" | "adamw" | "muon" (fer.optimizers.OPTIMIZERS)
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    class_weighting: str = "none"  # "none" | "sqrt": loss weight sqrt(mean count / class count)
    first_conv: str = "random"  # "random" | "pca": set from the training images (pca_first_conv)
    # After training, batch-norm statistics from clean training images, kept if validation
    # accuracy does not fall (fer.batchnorm). Off for the seed and the peer: their published
    # recipes.
    recalibrate_batch_norm: bool = False
    description: str = ""

    def prepare(self, model: keras.Model, train_images: np.ndarray) -> None:
        """Set what this recipe takes from the training images before fitting (first_conv)."""
        if self.first_conv == "pca":
            pca_first_conv(model, train_images)

    def recipe(self) -> dict:
        """How this entry builds and trains its model, as JSON values (the builder's options
        with their defaults; the optimiser settings but the learning rate, which a run records
        itself). A run records it, so that a resume under a fer whose entry has changed since
        (dropout, augmentation, weight decay...) is refused instead of training the rest of
        the run another way."""
        options = {name: parameter.default
                   for name, parameter in inspect.signature(self.build).parameters.items()
                   if parameter.default is not inspect.Parameter.empty}
        recipe = {"build": options, "optimizer": self.optimizer,
                  "label_smoothing": self.label_smoothing, "weight_decay": self.weight_decay,
                  "class_weighting": self.class_weighting, "first_conv": self.first_conv,
                  "recalibrate_batch_norm": self.recalibrate_batch_norm}
        return json.loads(json.dumps(
            recipe, default=lambda value: getattr(value, "__qualname__", type(value).__qualname__)))


def _finish(inputs, logits, *, name: str) -> keras.Model:
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    outputs = ClassNames(CLASS_NAMES, name="class_names", dtype="float32")(probabilities)
    return keras.Model(inputs, outputs, name=name)


def _augmentation(*, rotation: float, shift: float, zoom: float) -> list[layers.Layer]:
    """Flip, small shifts, rotation and zoom; inactive at inference time."""
    return [
        layers.RandomFlip("horizontal"),
        layers.RandomRotation(rotation, fill_mode="nearest"),
        layers.RandomTranslation(shift, shift, fill_mode="nearest"),
        layers.RandomZoom(zoom, fill_mode="nearest"),
    ]


def build_seed() -> keras.Model:
    """The original script's CNN, layer for layer (unscaled pixels, no augmentation)."""
    l2 = keras.regularizers.L2(0.01)
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    for filters, kernel, reg in ((None, None, None), (128, 5, None), (512, 3, l2), (512, 3, l2)):
        if filters:
            x = layers.Conv2D(filters, kernel, padding="same", activation="relu",
                              kernel_regularizer=reg)(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    for units in (256, 512):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Dropout(0.25)(x)
    return _finish(inputs, layers.Dense(len(CLASS_NAMES))(x), name="seed")


def build_mini_xception() -> keras.Model:
    """Arriaga et al. 2017 mini-Xception (the model in the `fer` PyPI package), for comparison."""
    l2 = keras.regularizers.L2(0.01)
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = layers.Rescaling(2 / 255.0, offset=-1.0)(inputs)
    for layer in _augmentation(rotation=10 / 360, shift=0.1, zoom=0.1):
        x = layer(x)
    for _ in range(2):
        x = layers.Conv2D(8, 3, use_bias=False, kernel_regularizer=l2)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
    for filters in (16, 32, 64, 128):
        residual = layers.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x)
        residual = layers.BatchNormalization()(residual)
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False,
                                   depthwise_regularizer=l2, pointwise_regularizer=l2)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False,
                                   depthwise_regularizer=l2, pointwise_regularizer=l2)(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = layers.add([x, residual])
    x = layers.Conv2D(len(CLASS_NAMES), 3, padding="same")(x)
    logits = layers.GlobalAveragePooling2D()(x)
    return _finish(inputs, logits, name="mini_xception")


def _conv_bn_relu(x, filters: int):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = FusedBatchNorm()(x)
    return layers.Activation("relu")(x)


def build_default(widths: Sequence[int] = (32, 96, 192), *,
                  convs_per_stage: Sequence[int] = (2, 2, 2), dropout: float = 0.3,
                  head_grid: int = 1, rotation: float = 0.25, zoom: float = 0.1,
                  shift: float = 0.1, standardize: bool = True, space_to_depth: bool = True,
                  conv_block: Callable[[keras.KerasTensor, int], keras.KerasTensor] | None = None,
                  ) -> keras.Model:
    """fer's default: a VGG-style CNN on a space-to-depth stem.

    Each image is standardised to zero mean and unit variance (``standardize=False``:
    divided by 255), then folded into 24x24x4 (no pixel lost; ``space_to_depth=False`` keeps
    48x48x1), so no convolution runs at full resolution, where a CPU spends most of its
    time for little accuracy. Two 3x3 conv-BN-ReLU blocks per stage at 24, 12 and 6 pixels;
    global average pooling; a small dense head. 32 channels in the first stage, not 48 (the
    previous default, kept as `default-48`): 18% fewer multiply-adds, ~1.1x the training
    and ~1.2x the inference images/s on a 2-core CPU, at equal validation accuracy
    (BENCHMARKS.md). The keyword options exist for the recipe experiments of
    benchmarks/variant_benchmark.py; the registry's entries set a few of them (other widths,
    /255 input for the 48-96-192 model, the lighter augmentation and dropout of
    `default-pca`, a full-resolution first stage), each as REGISTRY says.
    """
    conv_block = conv_block or _conv_bn_relu
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = PerImageStandardize()(inputs) if standardize else layers.Rescaling(1 / 255.0)(inputs)
    x = RandomAffine(rotation=rotation, zoom=zoom, shift=shift, dtype="float32")(x)
    if space_to_depth:
        x = PixelUnshuffle(2)(x)
    for stage, (filters, convs) in enumerate(zip(widths, convs_per_stage, strict=True)):
        if stage:
            x = layers.MaxPooling2D(2)(x)
        for _ in range(convs):
            x = conv_block(x, filters)
    # The head sees the last stage (6x6 with three stages) averaged to a head_grid x head_grid
    # grid (a divisor of its side; 1: global average pooling), so a grid > 1 keeps where a
    # feature was.
    if head_grid == 1:
        x = layers.GlobalAveragePooling2D()(x)
    else:
        x = layers.Flatten()(layers.AveragePooling2D(x.shape[1] // head_grid)(x))
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    return _finish(inputs, layers.Dense(len(CLASS_NAMES))(x), name="default")


def pca_first_conv(model: keras.Model, images: np.ndarray, *, sample: int = 2000) -> None:
    """Set the first convolution after the space-to-depth stem from ``images``, and freeze it.

    Its filters become the principal directions of the 3x3 patches it sees (in ``sample``
    images spread evenly over ``images``, since a source may list them class by class;
    standardised and folded as the model does), each scaled to unit
    variance, half of them as they are and half negated so that the ReLU keeps both
    signs: the whitening layer of Keller Jordan's airbench. The network then starts from a
    decorrelated view of the faces instead of random filters and fits faster early on, which
    pays in the `fast` profile's short schedule; after 20 epochs random filters have caught up
    (BENCHMARKS.md, session 13).
    """
    unshuffle = next((layer for layer in model.layers if isinstance(layer, PixelUnshuffle)), None)
    convs = [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]
    if unshuffle is None or not convs:
        raise ValueError(f"model '{model.name}' has no space-to-depth stem and convolution")
    first = convs[0]
    height, width, channels, filters = first.kernel.shape
    if filters % 2:
        raise ValueError(f"{first.name}: pca_first_conv needs an even number of filters")
    spread = spread_sample(images, sample)
    front = keras.Model(model.inputs, unshuffle.output)  # augmentation is off in predict
    folded = front.predict(spread[:, :, :, None].astype("float32"), verbose=0)
    windows = np.lib.stride_tricks.sliding_window_view(
        folded.astype("float32"), (height, width), axis=(1, 2))  # (n, rows, cols, c, h, w)
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, height * width * channels)
    patches = patches - patches.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(patches.T @ patches / len(patches))
    order = np.argsort(eigenvalues)[::-1][: filters // 2]
    top = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + 1e-2)
    kernel = np.concatenate([top, -top], axis=1).reshape(first.kernel.shape)
    first.kernel.assign(kernel.astype("float32"))
    first.trainable = False


def _default_recipe(name: str, widths: Sequence[int], description: str, *,
                    first_conv: str = "random", optimizer: str = "adamw",
                    **build_options) -> ModelSpec:
    """The default CNN at the given widths with the recipe it was tuned with. Measured on
    20-epoch runs (BENCHMARKS.md): without label smoothing validation fell 1.4 points, at 0.2
    it equalled 0.1; full inverse-frequency class weights cost 3.7 points."""
    return ModelSpec(name, functools.partial(build_default, widths=widths, **build_options),
                     learning_rate=2e-3, optimizer=optimizer, label_smoothing=0.1,
                     weight_decay=0.05, class_weighting="sqrt", first_conv=first_conv,
                     recalibrate_batch_norm=True, description=description)


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _default_recipe("default", (32, 96, 192),
                        "fer's CPU-efficient CNN, 32-96-192 channels, trained with Muon on "
                        "its convolutions (the CLI default)", optimizer="muon"),
        # A short schedule underfits (training accuracy about validation's after 8 epochs),
        # so the `fast` profile's model is regularised less: flips and 5% shifts only,
        # dropout 0.1 (BENCHMARKS.md, session 18).
        _default_recipe("default-pca", (32, 96, 192),
                        "the default (Muon too) with its first convolution set from the "
                        "training images' patch statistics and frozen, regularised less "
                        "(flips and small shifts only, dropout 0.1): the `fast` profile's "
                        "model",
                        first_conv="pca", optimizer="muon", rotation=0.0, zoom=0.0,
                        shift=0.05, dropout=0.1),
        _default_recipe("default-48", (48, 96, 192),
                        "48-96-192 channels, /255 input, AdamW (the previous default; "
                        "the `best` profile's members until session 20)", standardize=False),
        # Muon's Newton-Schulz steps halved this width's training images/s on a 2-core
        # Intel CPU (session 22), so it keeps AdamW.
        _default_recipe("wide", (64, 128, 256),
                        "the default at 64-128-256 channels (2.2x its multiply-adds), "
                        "AdamW: the `best` profile's members until session 26"),
        # The published 72-73% networks convolve at 48x48 first. Here that raised
        # validation accuracy by 0.7-1.6 points per member at 60 epochs on three seeds, for
        # 1-2x `wide`'s training time (session 26; not measured side by side).
        _default_recipe("wide-full-res", (32, 64, 128, 256),
                        "`wide` behind a stage of 32 channels at full resolution (48x48, "
                        "no space-to-depth fold), AdamW, 1-2x `wide`'s training time: "
                        "the `best` profile's members",
                        convs_per_stage=(2, 2, 2, 2), space_to_depth=False),
        # The same lever for the 20-epoch default: a 16-channel stage at 48x48 in place of
        # the fold raised validation on three seeds (+0.3 to +1.0 points) and test accuracy
        # by 0.9 points on average (+1.5, +1.7, -0.4), for ~1.2x the multiply-adds
        # (session 27, AMD Zen 4). Not the default: see BENCHMARKS.md.
        _default_recipe("default-full-res", (16, 32, 96, 192),
                        "the default (Muon) behind a stage of 16 channels at full resolution "
                        "(48x48, no space-to-depth fold), ~1.2x its multiply-adds",
                        optimizer="muon", convs_per_stage=(2, 2, 2, 2), space_to_depth=False),
        # Half that stage: one 16-channel convolution at 48x48, ~1.05x the default's
        # multiply-adds. Validation rose on four seeds (+0.2 to +1.5 points), test accuracy
        # by 0.9 points on average (+2.1, +0.1, -0.6, +2.1), at about the default's
        # training speed, but at ~0.8x its inference images/s, under the peer's in two of
        # three runs (session 30, AMD Zen 4): opt-in.
        _default_recipe("default-full-res-single", (16, 32, 96, 192),
                        "the default (Muon) behind one 16-channel convolution at full "
                        "resolution (48x48, no space-to-depth fold), ~1.05x its multiply-adds",
                        optimizer="muon", convs_per_stage=(1, 2, 2, 2), space_to_depth=False),
        ModelSpec("seed", build_seed, learning_rate=1e-4, optimizer="adam",
                  description="the original script's CNN, faithful (Adam 1e-4)"),
        ModelSpec("mini-xception", build_mini_xception, learning_rate=1e-3, optimizer="adam",
                  description="Arriaga et al. 2017 mini-Xception, the `fer` package's model"),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry called ``name``, or a FerError listing the valid names."""
    check_model_name(name)  # MODEL_NAMES are REGISTRY's (tests/test_models.py)
    return REGISTRY[name]


def load_model(path: Path, *, precision: str = "float32") -> keras.Model:
    """Load a saved fer model; the registered ClassNames layer makes this self-contained.

    ``precision`` is what it computes in: a Keras policy or ``auto`` (fer.precision).
    """
    precision = choose_precision(precision)
    path = Path(path)
    if not path.is_file():
        raise FerError(f"{path}: model file not found (expected a model.keras from `fer train`)")
    try:
        with path.open("rb") as handle:
            is_zip = zipfile.is_zipfile(handle)
    except OSError as exc:
        raise FerError(f"{path}: cannot read it ({exc.strerror})") from None
    if not is_zip:  # Keras would say "File not found", or blame the suffix
        raise FerError(f"{path}: not a zip archive, as a .keras model is (legacy .h5 models "
                       "are not read); expected a model.keras from `fer train`")
    try:
        with _keras_named(path) as named:  # Keras goes by the suffix: model.keras.bak, say
            model = keras.models.load_model(named, compile=False)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        # Keras 3 says KeyError for a zip without config.json, TypeError for unknown layers.
        raise FerError(f"{path}: not a loadable Keras model ({_load_failure(exc)}); expected "
                       "a model.keras from `fer train`") from None
    _check_fer_model(model, path)
    if precision == "float32" and not computes_mixed(model):  # as fer saves its models
        return model
    return with_precision(model, policy=precision)  # a file saved mixed is computed as asked


def computes_mixed(model, prefix: str = "mixed") -> bool:
    """Whether any layer computes in a policy whose name starts with ``prefix``: any mixed
    (16-bit) one, or "mixed_float16", whose activations overflow sooner than float32's
    (bfloat16 has float32's range)."""
    return any(str(getattr(getattr(layer, "dtype_policy", None), "name", "")).startswith(prefix)
               or computes_mixed(layer, prefix)  # an ensemble's members are models in the model
               for layer in getattr(model, "layers", []))


@contextlib.contextmanager
def _keras_named(path: Path) -> Iterator[Path]:
    """``path`` under a name ending in .keras, which Keras requires: itself, or a link to
    it in a temporary folder."""
    if path.suffix == ".keras":
        yield path
        return
    with tempfile.TemporaryDirectory() as folder:
        named = Path(folder) / "model.keras"
        named.symlink_to(path.resolve())
        yield named


def _load_failure(exc: BaseException) -> str:
    """Why Keras could not load a model, in a line: the innermost cause, which names the
    layer class it could not find (its outer error only says the model "could not be
    deserialized properly")."""
    while True:  # down the chain Python shows, not through what Keras hid `from None`
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if not isinstance(inner, (TypeError, ValueError, KeyError)):
            break
        exc = inner
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return reason.split(" Make sure custom")[0].split(" Full object config")[0].strip()


def _check_fer_model(model: keras.Model, path: Path) -> None:
    """Refuse, naming the file, a Keras model fer cannot feed or read (another project's,
    say), before any image is scored: fer sends raw 48x48x1 pixels and reads one score per
    class of the class order the model stores."""
    try:
        names = model.get_layer("class_names").class_names
    except (ValueError, AttributeError):
        names = None
    try:
        takes, gives = model.input_shape, model.output_shape
    except (AttributeError, ValueError):
        takes = gives = None
    twice = sorted(name for name, count in Counter(map(str, names or [])).items() if count > 1)
    if twice:  # a column would be overwritten when scores are put in CLASS_NAMES order
        raise FerError(f"{path}: its stored class order names {', '.join(twice)} more than "
                       f"once ({list(names)}); expected each class once, as `fer train` "
                       "saves it")
    if names is not None and takes == (None, *INPUT_SHAPE) and gives == (None, len(names)):
        return
    found = (f"it takes {takes} and gives {gives}" if takes is not None
             else "its input and output shapes are unknown")
    raise FerError(f"{path}: not a fer model ({found}{'' if names else ', with no class order'}); "
                   f"expected raw {IMAGE_SIZE}x{IMAGE_SIZE}x1 pixels in and one score per "
                   "stored class out, a model.keras from `fer train`")


def class_names_of(model: keras.Model) -> list[str]:
    """The class order stored in a model saved by fer."""
    try:
        return list(model.get_layer("class_names").class_names)
    except ValueError:
        raise FerError(f"model '{model.name}' has no class order; was it saved by fer?") from None
