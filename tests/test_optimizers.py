"""fer.optimizers: what each kind updates, and the schedule the non-seed models share."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fer.models import REGISTRY
from fer.optimizers import OPTIMIZERS, ConvMuon, build_optimizer, warmup_cosine


def skewed_gradient(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """A gradient whose singular values span 1 to 100: one direction dominates it."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.normal(size=(rows, columns)))
    right, _ = np.linalg.qr(rng.normal(size=(columns, columns)))
    return (left * np.geomspace(100, 1, columns)) @ right.T


@pytest.mark.parametrize("newton_schulz_dtype", ["float32", "bfloat16"])
def test_conv_muon_moves_every_direction_of_a_kernel_alike(newton_schulz_dtype):
    """A 4-D kernel's update is the orthogonalised gradient: its singular values are close to
    each other although the gradient's span two orders of magnitude (in bfloat16 too, as
    mixed_bfloat16 runs it)."""
    kernel = keras.Variable(np.zeros((3, 3, 4, 8), "float32"))
    gradient = skewed_gradient(36, 8).reshape(3, 3, 4, 8).astype("float32")
    optimizer = ConvMuon(learning_rate=1.0, weight_decay=None, rms_rate=None,
                         newton_schulz_dtype=newton_schulz_dtype)
    optimizer.apply_gradients([(gradient, kernel)])
    singular = np.linalg.svd(-kernel.numpy().reshape(36, 8), compute_uv=False)
    assert singular.max() / singular.min() < 2 and 0.5 < singular.min() < singular.max() < 1.5
    assert np.sum(-kernel.numpy() * gradient) > 0  # a descent direction


def test_conv_muon_leaves_dense_kernels_and_biases_to_adamw():
    """Non-convolution variables take Adam's first step: every element moves by the learning
    rate against its gradient's sign, whatever the gradient's size."""
    dense, bias = keras.Variable(np.zeros((36, 8), "float32")), keras.Variable(np.zeros(8, "float32"))
    dense_gradient = skewed_gradient(36, 8).astype("float32")
    bias_gradient = np.linspace(-5, 5, 8).astype("float32")
    optimizer = ConvMuon(learning_rate=0.01, weight_decay=None, adam_weight_decay=None)
    optimizer.apply_gradients([(dense_gradient, dense), (bias_gradient, bias)])
    np.testing.assert_allclose(dense.numpy(), -0.01 * np.sign(dense_gradient), rtol=1e-3)
    np.testing.assert_allclose(bias.numpy(), -0.01 * np.sign(bias_gradient), rtol=1e-3)


def test_conv_muon_update_is_scaled_to_adamw_size():
    """With Moonlight's scaling (rms 0.2) a kernel's update has an RMS of about 0.2 x the
    learning rate, Adam's order, so a learning rate tuned for AdamW carries over."""
    kernel = keras.Variable(np.zeros((3, 3, 96, 192), "float32"))
    gradient = skewed_gradient(864, 192).reshape(3, 3, 96, 192).astype("float32")
    ConvMuon(learning_rate=1.0, weight_decay=None).apply_gradients([(gradient, kernel)])
    assert 0.1 < np.sqrt(np.mean(kernel.numpy() ** 2)) < 0.3


@pytest.mark.parametrize("kind, expected", [("adam", keras.optimizers.Adam),
                                            ("adamw", keras.optimizers.AdamW),
                                            ("muon", ConvMuon)])
def test_build_optimizer_makes_each_kind(kind, expected):
    """Each optimiser name a ModelSpec may carry builds that optimiser, with its weight decay
    and rate: AdamW and Muon on the warm-up and cosine schedule over the run's steps (a
    tenth of the peak first, a hundredth at the last step), the seed's Adam at a constant
    rate, as the original script trained."""
    optimizer = build_optimizer(kind, learning_rate=1e-3, weight_decay=0.05, total_steps=100)
    assert type(optimizer) is expected
    if kind == "muon":  # the spec's weight decay on both halves, not Keras' default 0.004
        assert optimizer.weight_decay == optimizer.adam_weight_decay == 0.05
    if kind == "adamw":
        assert optimizer.weight_decay == 0.05
    rate = optimizer._learning_rate
    if kind == "adam":
        assert not callable(rate) and float(rate.numpy()) == pytest.approx(1e-3)
    else:
        assert [float(rate(step)) for step in (0, 100)] == pytest.approx([1e-4, 1e-5], rel=1e-4)


@pytest.mark.parametrize("precision, newton_schulz_dtype", [
    ("float32", "float32"), ("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float32")])
def test_muon_runs_newton_schulz_in_bfloat16_only_under_mixed_bfloat16(
        precision, newton_schulz_dtype):
    optimizer = build_optimizer("muon", learning_rate=1e-3, weight_decay=0.05,
                                total_steps=100, precision=precision)
    assert optimizer.newton_schulz_dtype == newton_schulz_dtype
    assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)
                                        ).newton_schulz_dtype == newton_schulz_dtype


def test_build_optimizer_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer("sgd", learning_rate=1e-3, weight_decay=0.0, total_steps=10)


def test_every_registry_model_names_a_known_optimizer():
    assert {spec.optimizer for spec in REGISTRY.values()} <= set(OPTIMIZERS)


def test_warmup_cosine_rises_from_a_tenth_to_the_peak_then_decays_to_a_hundredth():
    schedule = warmup_cosine(2e-3, total_steps=1000)  # warm-up: 100 steps
    rates = {step: float(schedule(step)) for step in (0, 100, 1000)}
    assert rates == pytest.approx({0: 2e-4, 100: 2e-3, 1000: 2e-5}, rel=1e-4)
    assert float(schedule(50)) == pytest.approx(1.1e-3, rel=1e-4)
    assert warmup_cosine(2e-3, total_steps=100_000).warmup_steps == 500
