"""Training options checked before any data is read or Keras loads.

`fer train`, the retrain flow and `fer deploy` (a deployment's parameters, checked without
loading TensorFlow) refuse the same impossible values in the same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fer.config import MAX_BATCH_SIZE, VAL_FRACTION_RANGE, TrainConfig
from fer.data import check_val_fraction
from fer.errors import FerError
from fer.precision import check_precision

# fer.models.REGISTRY's names, in its order, for code that must not load Keras to know them
# (tests/test_models.py keeps the two equal).
MODEL_NAMES = ("default", "default-pca", "default-48", "wide", "wide-full-res",
               "default-full-res", "default-full-res-single", "seed", "mini-xception")
MAX_SEED = 2**32 - 1  # numpy.random.seed, which Keras' set_random_seed calls, takes no more


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise FerError(f"unknown model '{name}' (expected one of {', '.join(MODEL_NAMES)})")


def cli_flag(field: str) -> str:
    """A TrainConfig field as the CLI spells it: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def parameter_name(field: str) -> str:
    """A TrainConfig field as a flow's parameters (a deployment's YAML) spell it."""
    return f"{field}:"


def check_config(config: TrainConfig, *, spell: Callable[[str], str] = cli_flag,
                 new_run: bool = True) -> None:
    """Refuse impossible options (numbers, model or precision names) before any data is read.
    ``spell`` names a field in the messages: the CLI's flags, or the flow's parameters.
    A resumed run (``new_run`` False) keeps the validation fraction it began with."""
    if config.epochs < 1:
        raise FerError(f"{spell('epochs')} {config.epochs}: expected at least 1")
    if not 1 <= config.batch_size <= MAX_BATCH_SIZE:
        raise FerError(f"{spell('batch_size')} {config.batch_size}: expected 1 to "
                       f"{MAX_BATCH_SIZE}")
    if config.ensemble < 1:
        raise FerError(f"{spell('ensemble')} {config.ensemble}: expected at least 1")
    last_seed = config.seed + config.ensemble - 1  # member i trains from seed + i - 1
    if config.seed < 0 or last_seed > MAX_SEED:
        raise FerError(f"{spell('seed')} {config.seed}"
                       + (f" with {spell('ensemble')} {config.ensemble}"
                          if config.ensemble > 1 else "")
                       + f": expected seeds from 0 to {MAX_SEED} (NumPy's range)")
    if not 0 <= config.split_seed <= MAX_SEED:
        raise FerError(f"{spell('split_seed')} {config.split_seed}: expected a seed from 0 to "
                       f"{MAX_SEED} (NumPy's range)")
    low, high = VAL_FRACTION_RANGE
    if new_run and not low <= config.val_fraction <= high:
        raise FerError(f"{spell('val_fraction')} {config.val_fraction}: expected a fraction "
                       f"from {low} to {high}")
    check_val_fraction(config.val_fraction, what=spell("val_fraction"))
    if config.learning_rate is not None and not 0 < config.learning_rate < math.inf:
        raise FerError(f"{spell('learning_rate')} {config.learning_rate}: expected a finite "
                       "number above 0")
    check_model_name(config.model)
    check_precision(config.precision, what=spell("precision"))


def endpoint_left_unused(endpoint_url: str | None, *, storage: str, data: str | None) -> str | None:
    """Why a given endpoint (None: not given) reaches nothing where the store is ``storage``
    (resolved: a command's or flow's own, else FER_STORAGE, else ./artifacts) and the data
    ``data``: a folder store and no s3:// data. Accepted, it was ignored, and the folder was
    read or written instead of the S3 store meant. None where it is used."""
    from fer.fetch import is_s3_source
    from fer.storage import is_folder_store

    if endpoint_url is None or not is_folder_store(storage):
        return None
    if data is not None and is_s3_source(data):
        return None
    return f"the store, {storage}, is a folder; the endpoint is used only for an s3:// store or data"

