"""Named training presets: ``fer train --profile fast|default|best``.

A profile only fills in options the user did not give; explicit flags always win.
The numbers each profile reaches are measured in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from fer.errors import FerError


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    train_options: dict

    def options_with(self, **given) -> dict:
        """The profile's options with the user's on top.

        A profile's learning rate is tuned for its own model and batch size: it is dropped
        when the user picks another model or batch size, and the model trains at its own
        rate (the one its recipe was measured with at batch 64).
        """
        options = dict(self.train_options)
        if any(given.get(name, options[name]) != options[name]
               for name in ("model", "batch_size")):
            options.pop("learning_rate", None)
        return {**options, **given}


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("default", "the headline run: 20 epochs, batch 64, the default model",
                {"epochs": 20, "batch_size": 64, "model": "default"}),
        Profile("fast", "a short schedule (8 epochs of batch 128 at a 3e-3 peak learning rate) "
                        "of `default-pca`, the default model (Muon on its convolutions) "
                        "with a first convolution set from the training images, which fits "
                        "faster early on, and lighter augmentation and dropout; saved with "
                        "flip test-time averaging (twice the inference cost; it raised test "
                        "accuracy on most short-schedule models measured: see BENCHMARKS.md)",
                {"epochs": 8, "batch_size": 128, "model": "default-pca", "learning_rate": 3e-3,
                 "tta": True}),
        Profile("best", "the best accuracy measured: three `wide-full-res` models "
                        "(32 channels at 48x48, then 64-128-256; AdamW) of 60 epochs "
                        "(consecutive seeds) averaged, with flip test-time averaging; its "
                        "members took 98 min on a 2-core Intel CPU with AMX, longer without it",
                {"epochs": 60, "batch_size": 64, "model": "wide-full-res", "tta": True,
                 "ensemble": 3}),
    )
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise FerError(f"unknown profile '{name}' (expected one of {', '.join(PROFILES)})")
    return PROFILES[name]
