"""The optimisers a registry model trains with, built from its ``ModelSpec``.

Three kinds: constant Adam (the seed and the peer, as published), AdamW, and Muon on the
convolution kernels with AdamW on the rest; the last two follow the same warm-up + cosine
schedule and decoupled weight decay.
"""

from __future__ import annotations

import keras
from keras import ops

OPTIMIZERS = ("adam", "adamw", "muon")


def build_optimizer(kind: str, *, learning_rate: float, weight_decay: float,
                    total_steps: int, precision: str = "float32") -> keras.optimizers.Optimizer:
    """An optimiser of ``kind`` (one of OPTIMIZERS) for a run of ``total_steps`` steps at
    ``precision`` (fer.precision's names): Muon's Newton-Schulz steps run in bfloat16 under
    mixed_bfloat16, as in Muon's reference implementation, and in float32 otherwise."""
    if kind == "adam":
        return keras.optimizers.Adam(learning_rate)
    schedule = warmup_cosine(learning_rate, total_steps)
    if kind == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    if kind == "muon":
        return ConvMuon(learning_rate=schedule, weight_decay=weight_decay,
                        adam_weight_decay=weight_decay,
                        newton_schulz_dtype="bfloat16" if precision == "mixed_bfloat16"
                        else "float32")
    raise ValueError(f"unknown optimizer '{kind}' (expected one of {', '.join(OPTIMIZERS)})")


def warmup_cosine(peak: float, total_steps: int) -> keras.optimizers.schedules.CosineDecay:
    """A tenth of ``peak`` rising linearly to it over 10% of the steps (500 at most), then
    cosine decay to 1% of it."""
    warmup = max(1, min(total_steps // 10, 500))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / 10, decay_steps=max(1, total_steps - warmup),
        warmup_target=peak, warmup_steps=warmup, alpha=0.01)


@keras.saving.register_keras_serializable(package="fer")
class ConvMuon(keras.optimizers.Muon):
    """Muon (Jordan et al. 2024) on convolution kernels; AdamW on everything else.

    Each kernel's Nesterov momentum, read as a (height * width * inputs, outputs) matrix, is
    orthogonalised by five Newton-Schulz steps before the update, so every direction of the
    filter bank moves at the same rate instead of the few that dominate the gradient; the
    update is scaled to AdamW's size (Liu et al. 2025), so AdamW's learning rate and weight
    decay carry over. Keras' own Muon leaves 4-D kernels to AdamW and takes 2-D dense kernels;
    this one takes convolutions only (the dense head stays on AdamW), as measured: on the
    20-epoch default it fits faster per epoch than AdamW (BENCHMARKS.md, session 16).
    ``newton_schulz_dtype`` is the precision of those steps: bfloat16 under mixed_bfloat16,
    as Muon's reference implementation runs them (their cost on a bf16 CPU is not measured
    yet), float32 elsewhere (bf16 arithmetic trained 10x slower on the AVX2-only CPU).
    """

    def __init__(self, *args, newton_schulz_dtype: str = "float32", **kwargs):
        super().__init__(*args, **kwargs)
        self.newton_schulz_dtype = newton_schulz_dtype

    def _should_use_adamw(self, variable) -> bool:
        return len(variable.shape) != 4

    def _muon_update_step(self, gradient, variable, lr, m):
        self.assign_add(m, ops.add(gradient, m * (self.momentum - 1)))
        g = ops.add(gradient, self.momentum * m) if self.nesterov else m
        matrix = ops.cast(ops.reshape(g, (-1, g.shape[-1])), self.newton_schulz_dtype)
        update = ops.cast(self.zeropower_via_newtonschulz5(matrix, self.ns_steps), variable.dtype)
        self.assign_sub(variable, lr * ops.reshape(self.lr_adjust(update), variable.shape))

    def get_config(self) -> dict:
        return {**super().get_config(), "newton_schulz_dtype": self.newton_schulz_dtype}
