"""fer.models: the registry, the faithful seed model, and self-describing saved models."""

from __future__ import annotations

import zipfile

import keras
import numpy as np
import pytest
from conftest import ramp_faces, sharpened_defaults

from fer.errors import FerError
from fer.labels import CLASS_NAMES
from fer.models import REGISTRY, ClassNames, build_default, class_names_of, get_spec, load_model
from fer.options import MODEL_NAMES


def test_seed_model_is_the_original_layer_for_layer():
    """The seed CNN has the original's 4,496,903 parameters and conv stack."""
    model = get_spec("seed").build()
    assert model.count_params() == 4_496_903
    convs = [(c.filters, c.kernel_size) for c in model.layers if isinstance(c, keras.layers.Conv2D)]
    assert convs == [(32, (3, 3)), (64, (3, 3)), (128, (5, 5)), (512, (3, 3)), (512, (3, 3))]
    dense = [d.units for d in model.layers if isinstance(d, keras.layers.Dense)]
    assert dense == [256, 512, 7]
    assert get_spec("seed").learning_rate == 1e-4 and get_spec("seed").optimizer == "adam"


def test_default_model_is_32_96_192_and_default_48_keeps_the_previous_widths():
    """The default's first stage has 32 channels (cheaper than 48 at equal validation
    accuracy, BENCHMARKS.md); the previous 48-96-192 model stays registered, because the
    `best` profile's measured members are that model."""
    def conv_widths(model):
        return [c.filters for c in model.layers if isinstance(c, keras.layers.Conv2D)]

    assert conv_widths(get_spec("default").build()) == [32, 32, 96, 96, 192, 192]
    assert conv_widths(get_spec("default-48").build()) == [48, 48, 96, 96, 192, 192]


@pytest.mark.parametrize("head_grid, features", [(1, 192), (3, 3 * 3 * 192), (6, 6 * 6 * 192)])
def test_default_head_sees_the_last_stage_on_the_grid_asked_for(head_grid, features):
    """head_grid 1 is global average pooling (the registry's default); a larger grid keeps
    where on the face a feature was (the `head-grid-3` and `flat` variants)."""
    model = build_default(head_grid=head_grid)
    head = next(layer for layer in model.layers if isinstance(layer, keras.layers.Dense))
    assert head.input.shape[-1] == features


@pytest.mark.parametrize("name, first_input, last_output", [
    ("default", (24, 24, 4), (6, 6, 192)), ("default-full-res", (48, 48, 1), (6, 6, 192)),
    ("default-full-res-single", (48, 48, 1), (6, 6, 192)),
    ("wide", (24, 24, 4), (6, 6, 256)), ("wide-full-res", (48, 48, 1), (6, 6, 256))])
def test_fold_models_fold_the_image_and_full_res_models_convolve_it_at_full_resolution(
        name, first_input, last_output):
    """`default` and `wide` fold each image to 24x24x4 before their first convolution
    (space-to-depth, cheap on CPUs); their `-full-res` versions (`wide-full-res` is `best`'s
    model) convolve the 48x48 image itself, as the published 72-73% networks do, and end on
    the same last stage as the model they extend."""
    model = get_spec(name).build()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs[0].input.shape[1:] == first_input
    assert convs[-1].output.shape[1:] == last_output


@pytest.mark.parametrize("name, convolutions", [
    ("default-full-res", 2), ("default-full-res-single", 1), ("default", 0)])
def test_full_res_stage_sizes(name, convolutions):
    """`default-full-res-single` halves `default-full-res`'s 48x48 stage to one 16-channel
    convolution (its cost is what session 30 measured), and `default` has none there."""
    model = get_spec(name).build()
    full_res = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
                and layer.output.shape[1] == 48]
    assert len(full_res) == convolutions
    assert all(layer.filters == 16 for layer in full_res)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_models_take_raw_pixels_and_return_probabilities(name):
    """Every model maps raw 0-255 48x48 pixels to 7 probabilities in the canonical order."""
    model = get_spec(name).build()
    pixels = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1)).astype("float32")
    probabilities = np.asarray(model(pixels, training=False))
    assert probabilities.shape == (4, 7)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert class_names_of(model) == list(CLASS_NAMES)


def test_saved_model_carries_class_order_and_preprocessing(tmp_path):
    """A saved model reloads with its class order and gives the same outputs on raw pixels."""
    model = get_spec("default").build()
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    pixels = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 1)).astype("float32")
    assert class_names_of(loaded) == list(CLASS_NAMES)
    assert np.allclose(model(pixels, training=False), loaded(pixels, training=False), atol=1e-5)


def test_unknown_model_name_lists_the_registry():
    """A typo in --model names the valid choices."""
    with pytest.raises(FerError, match=r"unknown model 'vgg' \(expected one of "
                                       r"default, default-pca, default-48, wide, "
                                       r"wide-full-res, default-full-res, "
                                       r"default-full-res-single, seed"):
        get_spec("vgg")


def test_the_names_checked_without_keras_are_the_registrys():
    """fer.options checks --model (and a deployment's model) without loading Keras, from a
    list of its own: a model added to or renamed in the registry must be added there too,
    or fer train would refuse it (or accept a name the registry lost) before any data."""
    assert MODEL_NAMES == tuple(REGISTRY)


def test_load_model_errors_are_one_line(tmp_path):
    """Missing and corrupt model files name the path."""
    with pytest.raises(FerError, match=r"missing\.keras: model file not found"):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")  # Keras said "File not found"
    with pytest.raises(FerError, match=r"junk\.keras: not a zip archive, as a \.keras model "
                                       r"is \(legacy \.h5 models are not read\); expected"):
        load_model(tmp_path / "junk.keras")
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as handle:  # a zip, but no model in it
        handle.writestr("metadata.json", "{}")
    with pytest.raises(FerError, match=r"empty\.keras: not a loadable Keras model \(.*config"):
        load_model(tmp_path / "empty.keras")


def test_a_model_saved_in_mixed_precision_computes_as_asked_when_loaded(tmp_path):
    """fer saves float32 models, but a model.keras saved while computing in bf16 (built
    under a mixed policy elsewhere) computed in bf16 when loaded with --precision float32,
    while the report said float32; loaded so, it computes in float32."""
    from fer.models import computes_mixed
    from fer.precision import dtype_policy

    with dtype_policy("mixed_bfloat16"):
        model = get_spec("seed").build()
    assert computes_mixed(model)
    model.save(tmp_path / "mixed.keras")
    loaded = load_model(tmp_path / "mixed.keras", precision="float32")
    assert not computes_mixed(loaded)


def test_a_model_naming_a_class_twice_is_refused(tmp_path):
    """A stored class order with a name twice (edited by hand, another tool's): scores put
    in CLASS_NAMES order overwrote one column and scored the missing class 0, silently."""
    order = [*CLASS_NAMES[:-1], "happy"]  # no neutral, happy twice
    inputs = keras.Input((48, 48, 1))
    scores = keras.layers.Dense(len(order))(keras.layers.Flatten()(inputs))
    outputs = ClassNames(order, name="class_names")(keras.layers.Softmax()(scores))
    keras.Model(inputs, outputs).save(tmp_path / "twice.keras")
    with pytest.raises(FerError, match=r"twice\.keras: its stored class order names happy more "
                                       r"than once"):
        load_model(tmp_path / "twice.keras")


def test_a_model_with_a_layer_fer_does_not_know_names_the_layer(tmp_path):
    """Another project's custom layer (or one an older fer had): the error names the class
    Keras could not find, not only that the model 'could not be deserialized properly'."""
    @keras.saving.register_keras_serializable(package="other")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return x * 2

    inputs = keras.Input((48, 48, 1))
    keras.Model(inputs, Twice()(inputs)).save(tmp_path / "other.keras")
    keras.saving.get_custom_objects().pop("other>Twice")  # as in a process that lacks it
    with pytest.raises(FerError, match=r"other\.keras: not a loadable Keras model \(.*"
                                       r"Could not locate class 'Twice'"):
        load_model(tmp_path / "other.keras")


def test_a_layer_that_fails_on_loading_is_named(tmp_path):
    """A layer whose call fails when Keras rebuilds the model: Keras names the layer in an
    error raised `from None`, which the search for the innermost cause must not skip."""
    @keras.saving.register_keras_serializable(package="other")
    class Fragile(keras.layers.Layer):
        broken = False

        def call(self, x):
            if Fragile.broken:
                raise TypeError("unsupported operand")
            return x

    inputs = keras.Input((48, 48, 1))
    keras.Model(inputs, Fragile(name="fragile")(inputs)).save(tmp_path / "fragile.keras")
    Fragile.broken = True
    try:
        with pytest.raises(FerError, match=r"fragile\.keras: not a loadable Keras model \(.*"
                                           r"Fragile"):
            load_model(tmp_path / "fragile.keras")
    finally:
        keras.saving.get_custom_objects().pop("other>Fragile")


def test_a_saved_model_loads_whatever_its_file_is_called(tmp_path):
    """A copy kept as `model.keras.bak`: Keras goes by the suffix and refused it as a legacy
    format ('File format not supported')."""
    get_spec("default").build().save(tmp_path / "model.keras")
    (tmp_path / "model.keras").rename(tmp_path / "model.keras.bak")
    assert class_names_of(load_model(tmp_path / "model.keras.bak")) == list(CLASS_NAMES)


def another_projects_model(input_shape, outputs: int, *, class_names: bool) -> keras.Model:
    inputs = keras.Input(input_shape)
    x = keras.layers.Dense(outputs)(keras.layers.GlobalAveragePooling2D()(inputs))
    if class_names:
        x = ClassNames(CLASS_NAMES, name="class_names")(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize(("input_shape", "outputs", "class_names", "found"), [
    ((224, 224, 3), 1000, False, r"it takes \(None, 224, 224, 3\) and gives \(None, 1000\), "
                                 r"with no class order"),
    ((48, 48, 1), 7, False, r"it takes \(None, 48, 48, 1\) and gives \(None, 7\), with no class"),
    ((48, 48, 3), 7, True, r"it takes \(None, 48, 48, 3\) and gives \(None, 7\)\)"),
    ((48, 48, 1), 5, True, r"it takes \(None, 48, 48, 1\) and gives \(None, 5\)\)"),
], ids=["imagenet", "no-class-order", "colour-input", "five-outputs"])
def test_a_keras_model_fer_cannot_feed_or_read_is_refused_on_loading(
        tmp_path, input_shape, outputs, class_names, found, precision):
    """Another project's Keras model is refused naming its file and what it takes and gives,
    before any image is scored (it failed inside predict with a traceback, or after scoring
    named the model instead of the file); a model with fer's input, output and class order
    still loads."""
    another_projects_model(input_shape, outputs, class_names=class_names).save(tmp_path / "m.keras")
    with pytest.raises(FerError, match=r"m\.keras: not a fer model \(" + found):
        load_model(tmp_path / "m.keras", precision=precision)
    another_projects_model((48, 48, 1), 7, class_names=True).save(tmp_path / "fine.keras")
    assert load_model(tmp_path / "fine.keras", precision=precision).output_shape == (None, 7)


def test_random_affine_is_identity_at_inference_and_varies_in_training():
    """Augmentation never touches inference inputs; in training it moves pixels."""
    from fer.models import RandomAffine

    images = np.zeros((4, 48, 48, 1), "float32")
    images[:, 10:20, 5:15] = 1.0
    layer = RandomAffine(rotation=0.25, zoom=0.1, shift=0.1, seed=1)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    augmented = np.asarray(layer(images, training=True))
    assert all(not np.allclose(augmented[i], images[i]) for i in range(4))


@pytest.mark.parametrize("name", ["default", "default-pca", "wide-full-res"])
def test_augmenting_models_opt_out_of_xla_as_keras_own_augmentation_does(name):
    """Keras' jit_compile="auto" XLA-compiles the training step on a GPU when every layer
    supports it; the affine transform op behind the augmentation is one Keras' own
    RandomRotation opts out for, so the models that augment do too."""
    from keras.src.trainers.trainer import model_supports_jit

    model = get_spec(name).build()
    assert not model_supports_jit(model)
    assert not keras.layers.RandomRotation(0.1).supports_jit  # the precedent still holds


def test_flip_only_affine_mirrors_or_keeps_each_image():
    """With no rotation/zoom/shift, each image is either itself or its mirror, exactly."""
    from fer.models import RandomAffine

    images = np.random.default_rng(0).random((16, 48, 48, 1)).astype("float32")
    out = np.asarray(RandomAffine(flip=True, seed=3)(images, training=True))
    mirrored = [np.allclose(out[i], images[i, :, ::-1], atol=1e-5) for i in range(16)]
    kept = [np.allclose(out[i], images[i], atol=1e-5) for i in range(16)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_pixel_unshuffle_keeps_every_pixel():
    """Space-to-depth is a permutation: the same values, a quarter of the positions."""
    from fer.models import PixelUnshuffle

    images = np.arange(2 * 48 * 48, dtype="float32").reshape(2, 48, 48, 1)
    folded = np.asarray(PixelUnshuffle(2)(images))
    assert folded.shape == (2, 24, 24, 4)
    assert np.array_equal(np.sort(folded.ravel()), np.sort(images.ravel()))
    assert folded[0, 0, 0].tolist() == [0.0, 1.0, 48.0, 49.0]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_trains_like_keras_batch_norm(policy):
    """The fused training pass gives Keras' outputs, gradients (to the input, the scale and
    the offset) and moving mean (a speed-up only)."""
    import tensorflow as tf

    from fer.models import FusedBatchNorm
    from fer.precision import dtype_policy

    images = tf.constant(np.random.default_rng(2).normal(1.0, 3.0, (16, 6, 6, 5)).astype("float32"))
    with dtype_policy(policy):
        reference, fused = keras.layers.BatchNormalization(), FusedBatchNorm()
    for layer in (reference, fused):
        layer.build(images.shape)
    weights = tf.range(5, dtype="float32")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(images)
        outputs = [layer(images, training=True) for layer in (reference, fused)]
        # the linear term gives the offset a gradient (a sum of normalised values is 0)
        losses = [tf.reduce_sum((tf.cast(y, "float32") ** 2 + tf.cast(y, "float32")) * weights)
                  for y in outputs]
    tolerance = 1e-5 if policy == "float32" else 2e-2
    assert outputs[1].dtype == outputs[0].dtype
    assert np.allclose(tf.cast(outputs[0], "float32"), tf.cast(outputs[1], "float32"), atol=tolerance)
    grads = [tape.gradient(loss, images) for loss in losses]
    assert np.allclose(grads[0], grads[1], atol=tolerance * 10, rtol=1e-2)
    for parameter in ("gamma", "beta"):
        reference_grad, fused_grad = (tape.gradient(loss, getattr(layer, parameter))
                                      for loss, layer in zip(losses, (reference, fused),
                                                             strict=True))
        assert not np.allclose(reference_grad, 0.0)
        assert np.allclose(reference_grad, fused_grad, rtol=tolerance * 5, atol=tolerance * 10)
    assert np.allclose(reference.moving_mean, fused.moving_mean, atol=1e-6)
    assert not np.allclose(fused.moving_mean, 0.0)
    # The moving variance is updated from the unbiased batch variance (n/(n-1) of Keras').
    n = 16 * 6 * 6
    expected = 0.99 + 0.01 * (np.asarray(reference.moving_variance) - 0.99) / 0.01 * n / (n - 1)
    assert np.allclose(fused.moving_variance, expected, rtol=1e-4)


def test_fused_batch_norm_uses_moving_statistics_at_inference():
    """At inference the layer normalises with the moving statistics, as Keras' layer does."""
    from fer.models import FusedBatchNorm

    layer = FusedBatchNorm()
    layer.build((None, 4, 4, 2))
    layer.moving_mean.assign([1.0, -1.0])
    layer.moving_variance.assign([4.0, 0.25])
    images = np.ones((1, 4, 4, 2), "float32")
    for out in (layer(images, training=False), layer(images)):
        out = np.asarray(out)
        assert np.allclose(out[..., 0], 0.0, atol=1e-3) and np.allclose(out[..., 1], 4.0, atol=1e-2)
    layer.trainable = False  # a frozen layer keeps its statistics, even in a training pass
    out = np.asarray(layer(images, training=True))
    assert np.allclose(out[..., 1], 4.0, atol=1e-2)
    assert np.allclose(layer.moving_mean, [1.0, -1.0])


def test_flip_averaging_is_the_mean_of_both_views_and_survives_saving(tmp_path):
    """The TTA model predicts the mean over image and mirror, keeps its class order, reloads."""
    from fer.models import HorizontalFlip, averaging

    model = get_spec("default").build()
    tta = averaging([model], flip=True)
    pixels = np.random.default_rng(4).integers(0, 256, (3, 48, 48, 1)).astype("float32")
    assert np.array_equal(HorizontalFlip()(pixels), pixels[:, :, ::-1])  # the second view
    expected = (model(pixels) + model(pixels[:, :, ::-1])) / 2
    assert np.allclose(tta(pixels), expected, atol=1e-6)
    tta.save(tmp_path / "tta.keras")
    loaded = load_model(tmp_path / "tta.keras")
    assert class_names_of(loaded) == list(CLASS_NAMES)
    assert np.allclose(loaded(pixels), expected, atol=1e-5)


def test_loading_in_bf16_computes_in_bf16_and_agrees_with_float32(tmp_path):
    """load_model(precision=...) recasts the layers, keeps the weights and a float32 softmax."""
    model, other = sharpened_defaults(2)  # other weights: told apart at 2e-2 below
    model.save(tmp_path / "model.keras")
    bf16 = load_model(tmp_path / "model.keras", precision="mixed_bfloat16")
    assert bf16.get_layer("probabilities").dtype_policy.name == "float32"
    assert {layer.dtype_policy.name for layer in bf16.layers if layer.weights} == {"mixed_bfloat16"}
    pixels = ramp_faces(8, seed=5)
    out = np.asarray(bf16(pixels, training=False))
    assert out.dtype == np.float32
    expected = np.asarray(model(pixels, training=False))
    assert np.allclose(out, expected, atol=2e-2)
    assert not np.allclose(other(pixels, training=False), expected, atol=2e-2)


def test_averaging_several_models_is_the_mean_of_each_and_survives_saving(tmp_path):
    """An ensemble predicts the mean over its members (and mirrors), reloads, keeps the order."""
    from fer.models import averaging

    members = sharpened_defaults(2)
    pixels = ramp_faces(3, seed=6)
    ensemble = averaging(members, flip=True)
    views = [m(p) for m in members for p in (pixels, pixels[:, :, ::-1])]
    expected = sum(np.asarray(v) for v in views) / 4
    assert np.allclose(ensemble(pixels), expected, atol=1e-6)
    assert [layer.name for layer in ensemble.layers if isinstance(layer, keras.Model)] == \
        ["default_1", "default_2"]
    ensemble.save(tmp_path / "ensemble.keras")
    loaded = load_model(tmp_path / "ensemble.keras", precision="mixed_bfloat16")
    assert class_names_of(loaded) == list(CLASS_NAMES)
    assert np.allclose(loaded(pixels), expected, atol=2e-2)
    for fewer in views[:2], views[::2]:  # one member, or no mirror: told apart at 2e-2
        assert not np.allclose(sum(np.asarray(v) for v in fewer) / 2, expected, atol=2e-2)
    assert averaging(members[:1]) is members[0]  # nothing to average: the model itself


def test_averaging_refuses_models_with_different_class_orders():
    """Averaging columns that mean different emotions would be silently wrong."""
    from fer.models import ClassNames, averaging

    model = get_spec("default").build()
    reordered = keras.Model(model.inputs, ClassNames(list(reversed(CLASS_NAMES)), name="class_names")(
        model.get_layer("probabilities").output))
    with pytest.raises(FerError, match="disagree on the class order"):
        averaging([model, reordered])


def test_flip_models_saved_before_ensembles_still_load_with_a_float32_average(tmp_path):
    """Models saved by earlier versions name their averaging layer "flip_average"; loading
    them in bf16 keeps it float32, like the softmax."""
    from keras import layers

    from fer.models import ClassNames, HorizontalFlip

    (model,) = sharpened_defaults(1)
    core = keras.Model(model.inputs, model.get_layer("probabilities").output, name="default")
    inputs = keras.Input((48, 48, 1), name="pixels")
    averaged = layers.Average(name="flip_average")([core(inputs), core(HorizontalFlip()(inputs))])
    old = keras.Model(inputs, ClassNames(CLASS_NAMES, name="class_names")(averaged))
    old.save(tmp_path / "old.keras")
    loaded = load_model(tmp_path / "old.keras", precision="mixed_bfloat16")
    assert loaded.get_layer("flip_average").dtype_policy.name == "float32"
    pixels = ramp_faces(2, seed=7)
    assert np.allclose(loaded(pixels), old(pixels), atol=2e-2)
    assert not np.allclose(core(pixels), old(pixels), atol=2e-2)  # the mirror view counts


def test_default_model_standardises_each_image_to_zero_mean_and_unit_variance():
    """The default model scales its input per image (not /255), in float32 whatever the
    policy (bfloat16 statistics of 0-255 pixels lost accuracy); so do `wide`, the `best`
    profile's model in sessions 23-25, `wide-full-res`, its model since session 26, and
    `default-full-res` (and `-single`); `default-48` keeps the /255 it was measured with."""
    from fer.models import PerImageStandardize
    from fer.precision import dtype_policy

    with dtype_policy("mixed_bfloat16"):
        model = get_spec("default").build()
    standardizers = [x for x in model.layers if isinstance(x, PerImageStandardize)]
    assert len(standardizers) == 1, "the default model should standardise its input once"
    layer = standardizers[0]
    assert layer.compute_dtype == "float32"
    rng = np.random.default_rng(0)
    contrast = np.array([0.2, 1.0, 0.6], "float32")[:, None, None, None]
    images = rng.uniform(0, 255, (3, 48, 48, 1)).astype("float32") * contrast
    standardized = keras.ops.convert_to_numpy(layer(images))
    np.testing.assert_allclose(standardized.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(standardized.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
    for name in ("wide", "wide-full-res", "default-full-res", "default-full-res-single"):
        wide = get_spec(name).build()
        assert sum(isinstance(x, PerImageStandardize) for x in wide.layers) == 1
    previous = get_spec("default-48").build()
    assert not any(isinstance(x, PerImageStandardize) for x in previous.layers)
    assert any(isinstance(x, keras.layers.Rescaling) for x in previous.layers)


def test_standardization_stays_float32_when_a_saved_model_is_loaded_in_bfloat16(tmp_path):
    """`fer predict`/`evaluate` in auto precision recast every layer to bf16; the per-image
    statistics must stay float32 there too, or predictions drift from the trained model's."""
    from fer.models import PerImageStandardize

    model = get_spec("default").build()
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras", precision="mixed_bfloat16")
    assert [x.compute_dtype for x in loaded.layers if isinstance(x, PerImageStandardize)] == \
        ["float32"]
    assert loaded.get_layer("probabilities").compute_dtype == "float32"
    assert any(x.compute_dtype == "bfloat16" for x in loaded.layers)  # the rest was recast


def test_fast_profiles_model_is_regularised_less_than_the_default():
    """`default-pca` trains for the `fast` profile's short schedule, where the default's
    augmentation and dropout held training accuracy down to validation's: it flips and
    shifts (no rotation or zoom) and drops less, while `default` keeps its full recipe."""
    from fer.models import RandomAffine

    def regularisation(name):
        model = get_spec(name).build()
        affine = next(x for x in model.layers if isinstance(x, RandomAffine))
        dropout = {x.rate for x in model.layers if isinstance(x, keras.layers.Dropout)}
        return (affine.rotation, affine.zoom, affine.shift, affine.flip), dropout

    assert regularisation("default-pca") == ((0.0, 0.0, 0.05, True), {0.1})
    assert regularisation("default") == ((0.25, 0.1, 0.1, True), {0.3})


def test_pca_first_conv_whitens_the_patches_it_sees_and_is_frozen():
    """The `fast` profile's model starts from a decorrelated view of its training images:
    the first convolution's responses to their patches have unit variance and no
    correlation, the second half of its filters are the first half negated (so the ReLU
    keeps both signs), and the layer is out of the trainable weights."""
    from fer.models import pca_first_conv

    rng = np.random.default_rng(0)
    noise = rng.normal(size=(300, 50, 50))
    images = (noise[:, 1:-1, 1:-1] + noise[:, :-2, 1:-1] + noise[:, 1:-1, :-2]) * 40 + 128
    images = np.clip(images, 0, 255).astype(np.uint8)  # neighbouring pixels correlated
    model = build_default()
    pca_first_conv(model, images)
    first = next(x for x in model.layers if isinstance(x, keras.layers.Conv2D))
    assert not first.trainable
    assert not any(w is first.kernel for w in model.trainable_weights)
    kernel = keras.ops.convert_to_numpy(first.kernel)
    np.testing.assert_allclose(kernel[..., 16:], -kernel[..., :16])
    responses = keras.ops.convert_to_numpy(keras.Model(model.inputs, first.output)(
        images[:, :, :, None].astype("float32")))[:, 1:-1, 1:-1, :16].reshape(-1, 16)
    covariance = np.cov(responses, rowvar=False)
    np.testing.assert_allclose(np.diag(covariance), 1.0, atol=0.1)
    off_diagonal = covariance - np.diag(np.diag(covariance))
    assert np.abs(off_diagonal).max() < 0.05
