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
    assert PROFILES[name].train_options["model"] in REGISTRY


def test_unknown_profile():
    with pytest.raises(FerError, match=r"unknown profile 'huge' \(expected one of default, fast"):
        get_profile("huge")
