import numpy as np
from conftest import python_random_drawn_meanwhile

from fer.models import get_spec
from fer.seeding import seeded


def _weights_built_from(seed: int) -> list[np.ndarray]:
    with seeded(seed):
        return get_spec("default").build().get_weights()


def test_a_thread_drawing_from_pythons_random_leaves_a_seeds_initial_weights_alone():
    """Keras seeds each layer from Python's shared random module: a thread drawing from it
    during the build (websockets' keep-alive pings in the same process) changed the weights
    a seed gave."""
    quiet = _weights_built_from(7)
    with python_random_drawn_meanwhile():
        busy = _weights_built_from(7)
    assert quiet and all(np.array_equal(a, b) for a, b in zip(quiet, busy, strict=True))
    assert not np.array_equal(_weights_built_from(8)[0], quiet[0])


def test_draws_from_pythons_random_inside_the_build_leave_a_seeds_weights_alone(monkeypatch):
    """The test above depends on the thread being scheduled during the build; here every
    layer's build draws from the shared module first, as another thread might, every time.
    Keras' own seeding alone gives other weights then (the control): fer's does not."""
    import random

    import keras

    quiet = _weights_built_from(7)
    layer_init = keras.layers.Layer.__init__

    def drawing_first(self, *args, **kwargs):
        random.random()
        layer_init(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__init__", drawing_first)
    disturbed = _weights_built_from(7)
    assert all(np.array_equal(a, b) for a, b in zip(quiet, disturbed, strict=True))
    keras.utils.set_random_seed(7)
    unprotected = get_spec("default").build().get_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(quiet, unprotected, strict=True))


def test_seeding_gives_keras_the_shared_generator_back_afterwards():
    from keras.src.random import seed_generator

    shared = seed_generator.python_random
    with seeded(1):
        assert seed_generator.python_random is not shared
    assert seed_generator.python_random is shared


def test_an_undisturbed_build_gets_the_weights_keras_seeding_gave_before():
    """Runs recorded in BENCHMARKS.md before fer.seeding (keras.utils.set_random_seed, then
    the build) start from the same weights now."""
    import keras

    keras.utils.set_random_seed(11)
    before = get_spec("default").build().get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, _weights_built_from(11), strict=True))


def test_a_keras_that_draws_seeds_elsewhere_is_warned_of(monkeypatch, caplog):
    """keras.src is private: where a release moves the generator, seeding goes on as
    set_random_seed alone did, and the log says the weights may then vary."""
    from keras.src.random import seed_generator

    monkeypatch.delattr(seed_generator, "python_random")
    with caplog.at_level("WARNING", logger="fer"), seeded(3):
        assert not hasattr(seed_generator, "python_random")  # nothing planted in its place
    assert "draws layer seeds elsewhere" in caplog.text


def test_two_builds_at_once_each_get_their_own_seeds_weights():
    """Two threads building models at once (no fer path does, but a library user may):
    each gets its seed's weights, and Keras gets the shared generator back after both."""
    import threading

    from keras.src.random import seed_generator

    shared, alone = seed_generator.python_random, {s: _weights_built_from(s) for s in (7, 8)}
    built: dict[int, list[np.ndarray]] = {}
    threads = [threading.Thread(target=lambda s=s: built.__setitem__(s, _weights_built_from(s)))
               for s in (7, 8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (7, 8):
        assert all(np.array_equal(a, b) for a, b in zip(alone[seed], built[seed], strict=True))
    assert seed_generator.python_random is shared
