"""Seeding a member's model: the same seed gives the same initial weights and random draws.

Keras seeds every initializer, dropout layer and ``SeedGenerator(None)`` it builds from
Python's global ``random`` module, which every thread in the process shares. Where another
thread draws from it while a model is built (websockets' keep-alive pings in a flow run,
any library's retry jitter), the layers' seeds shift and ``--seed`` no longer fixes the
initial weights: a member of an ensemble then differed from the single run of its seed
once in a CI run of the whole suite (tests/test_train.py) and never in that file alone.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_SWAPPING = threading.Lock()  # one build at a time swaps Keras' generator, and puts it back


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python, NumPy, TensorFlow and Keras seeded with ``seed``; inside the block Keras
    draws its default layer seeds from a generator of its own, seeded alike, which other
    threads' use of the ``random`` module does not advance (Keras layers built in another
    thread meanwhile would draw from it: fer builds one model at a time). Outside the block
    Keras draws from the shared module again.

    The private generator starts where ``random.seed(seed)`` starts the shared one, so a
    build that no thread disturbed gets the same weights as before this existed. Where a
    Keras release no longer draws through ``keras.src.random.seed_generator.python_random``
    (a private name), the build falls back to the shared module, with a warning."""
    import keras
    from keras.src.random import seed_generator  # make_default_seed() reads its python_random

    keras.utils.set_random_seed(seed)
    if not hasattr(seed_generator, "python_random"):
        log.warning("this Keras (%s) draws layer seeds elsewhere: another thread drawing "
                    "from Python's random module meanwhile could change the initial weights "
                    "of seed %d", keras.__version__, seed)
        yield
        return
    with _SWAPPING:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared
