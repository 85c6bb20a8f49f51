"""fer.profiles: presets exist for every documented profile and unknown names are refused."""

import pytest

from fer.errors import FerError
from fer.models import REGISTRY
from fer.profiles import PROFILES, get_profile


def test_default_profile_is_the_original_interface():
    """`fer train` with no options is `-e 20 -b 64` on the default model, like the original."""
    assert get_profile("default").train_options == {"epochs": 20, "batch_size": 64,
                                                    "model": "default"}


@pytest.mark.parametrize("name", ["default", "fast", "best"])
def test_profiles_name_registered_models(name):
    """A profile cannot ship naming a model the registry does not have."""
    assert PROFILES[name].train_options["model"] in REGISTRY


def test_best_profile_saves_a_flip_averaging_ensemble():
    """`--profile best` is what README's Profiles table and BENCHMARKS.md measured: three
    60-epoch `wide-full-res` members averaged, with each image's mirror."""
    assert PROFILES["best"].train_options == {"epochs": 60, "batch_size": 64,
                                              "model": "wide-full-res", "tta": True,
                                              "ensemble": 3}


def test_fast_profile_saves_a_single_flip_averaging_model():
    """`--profile fast` trains one model and averages each image with its mirror: the
    short schedule's models gained on validation with it (BENCHMARKS.md, session 14); the
    schedule README's Profiles table quotes: 8 epochs of 128 at a peak of 3e-3."""
    assert PROFILES["fast"].train_options == {"epochs": 8, "batch_size": 128,
                                              "model": "default-pca", "learning_rate": 3e-3,
                                              "tta": True}


def test_default_profile_saves_a_single_single_view_model():
    """The headline model stays one network, one view: the inference target is its speed."""
    assert not PROFILES["default"].train_options.get("tta")
    assert PROFILES["default"].train_options.get("ensemble", 1) == 1


def test_profile_options_are_train_config_fields():
    """Every profile key is a TrainConfig field, so `fer train --profile X` can build its config."""
    from dataclasses import fields

    from fer.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    for profile in PROFILES.values():
        assert set(profile.train_options) <= names, profile.name


def test_user_options_win_over_the_profile():
    """--no-tta turns best's averaging off; another --model or --batch-size drops the
    profile's tuned rate (fast's 3e-3 is for batch 128: batch 32 trained at it unasked)."""
    assert PROFILES["best"].options_with(tta=False)["tta"] is False
    tuned = PROFILES["fast"].train_options["learning_rate"]
    assert PROFILES["fast"].options_with()["learning_rate"] == tuned
    assert PROFILES["fast"].options_with(learning_rate=tuned / 4)["learning_rate"] == tuned / 4
    assert "learning_rate" not in PROFILES["fast"].options_with(model="seed")
    assert PROFILES["fast"].options_with(model="default-pca")["learning_rate"] == tuned
    assert "learning_rate" not in PROFILES["fast"].options_with(model="default")
    assert "learning_rate" not in PROFILES["fast"].options_with(batch_size=32)
    assert PROFILES["fast"].options_with(batch_size=128)["learning_rate"] == tuned
    assert PROFILES["fast"].options_with(batch_size=32, learning_rate=1e-3)["learning_rate"] == 1e-3


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(FerError, match=r"unknown profile 'huge' \(expected one of default, fast"):
        get_profile("huge")
