"""Typed settings: built once at the edge (CLI, flow) and passed into core functions.

Environment variables are read here and nowhere else in the package, but for
FER_GIT_COMMIT (fer.manifest: the image's commit, which no user sets for a run); the one
write is fer.precision.prefer_onednn, which the edges call to set TensorFlow's oneDNN switch
before TensorFlow is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fer.errors import FerError, expand_home

DEFAULT_SOURCE_URL = "https://www.dropbox.com/s/zi48lkarsg4kbry/fer2013.csv?dl=1"
"""The public ``fer2013.csv`` the original script's README told users to download."""

DEFAULT_STORAGE = "./artifacts"

DEFAULT_SEED = 1337
DEFAULT_VAL_FRACTION = 0.1  # of train, carved out (stratified) where the source has no validation
# One range for the CLI's --val-fraction and a flow's val_fraction (they had differed):
# under 1% of FER2013's train is some 40 faces a class to choose an epoch on, over 90%
# leaves less than a tenth to train on.
VAL_FRACTION_RANGE = (0.01, 0.9)


def default_data_dir(env: Mapping[str, str]) -> Path:
    """``FER_DATA_DIR``, else the user's cache folder (XDG on Linux); absolute, since the
    current dataset's pointer records paths inside it (a relative FER_DATA_DIR had it name
    a path that a command run from another folder read against that folder). A relative
    or blank XDG_CACHE_HOME is ignored, as the XDG spec asks (made absolute, each folder
    a command ran in had held a cache of its own)."""
    if env.get("FER_DATA_DIR", "").strip():  # whitespace alone: unset, as for FER_STORAGE
        return expand_home(env["FER_DATA_DIR"], what="FER_DATA_DIR").absolute()
    if env.get("XDG_CACHE_HOME", "").strip():
        cache = expand_home(env["XDG_CACHE_HOME"], what="XDG_CACHE_HOME")
        if cache.is_absolute():
            return cache / "fer"
    try:
        return Path.home() / ".cache" / "fer"
    except RuntimeError:  # no HOME and no passwd entry: a bare container user
        raise FerError("no home folder to keep fer's data in (~/.cache/fer); set "
                       "FER_DATA_DIR") from None


def endpoint_from_env(env: Mapping[str, str]) -> str | None:
    """The S3 endpoint the environment names, in botocore's order: AWS_ENDPOINT_URL_S3,
    then AWS_ENDPOINT_URL, neither where AWS_IGNORE_CONFIGURED_ENDPOINT_URLS is true. fer
    passes it to boto3 as the client's own endpoint, which wins over all of them: read
    as AWS_ENDPOINT_URL alone, it had sent an S3 publish to the endpoint meant for
    other services."""
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


# The variables default_data_dir reads (Path.home() reads HOME itself).
_DATA_DIR_VARIABLES = ("FER_DATA_DIR", "XDG_CACHE_HOME")


@dataclass(frozen=True)
class Settings:
    """Where data is cached and where runs are published; from the environment."""

    storage: str = DEFAULT_STORAGE
    endpoint_url: str | None = None
    # (name, value) of FER_DATA_DIR and XDG_CACHE_HOME as the environment gave them (a tuple:
    # the settings stay hashable); see data_dir
    data_dir_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        storage = env.get("FER_STORAGE", "")
        return cls(
            # empty or whitespace alone reads as unset, not as a folder named " "
            storage=storage if storage.strip() else DEFAULT_STORAGE,
            endpoint_url=endpoint_from_env(env),
            data_dir_env=tuple((name, env[name]) for name in _DATA_DIR_VARIABLES if name in env),
        )

    @property
    def data_dir(self) -> Path:
        """The data folder, resolved when a command reads data: a mistyped FER_DATA_DIR
        stops `fer train` and `fer fetch-data`, not `fer reports list` or `fer publish`."""
        return default_data_dir(dict(self.data_dir_env))

    def with_options(self, *, storage: str | None = None,
                     endpoint_url: str | None = None) -> Settings:
        """These settings with a command's or a flow's own options on top (None: keep); an
        empty one is refused (check_store_named)."""
        check_store_named(storage=storage, endpoint_url=endpoint_url)
        return replace(self, storage=storage or self.storage,
                       endpoint_url=endpoint_url or self.endpoint_url)


def check_store_named(*, storage: str | None = None, endpoint_url: str | None = None) -> None:
    """An empty store or endpoint (None: not given) is refused, as an empty data source is:
    ``--storage "$STORE"`` with the variable unset had published to FER_STORAGE or
    ./artifacts and exited 0."""
    for name, value, expected in (
            ("storage", storage, "a folder path, file://PATH or s3://BUCKET/PREFIX (`.` names "
                                 "the current folder)"),
            ("endpoint URL", endpoint_url, "an http(s) URL such as http://localhost:9000")):
        if value is not None and not value.strip():
            raise FerError(f"{name} {value!r} is empty: expected {expected}")


# A bound on --batch-size for training and prediction: 48x48 images gain nothing from
# larger batches, and a mistyped huge one would exhaust memory or overflow TensorFlow's int64.
MAX_BATCH_SIZE = 8192


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; recorded in its manifest."""

    epochs: int = 20
    batch_size: int = 64
    model: str = "default"
    seed: int = DEFAULT_SEED  # weights, augmentation and shuffling
    val_fraction: float = DEFAULT_VAL_FRACTION
    # Carves validation from train. Apart from ``seed`` so that runs of different seeds are
    # scored on one split: the champion is only ever chosen among runs of the same split.
    split_seed: int = DEFAULT_SEED
    learning_rate: float | None = None  # None: the model's own default
    precision: str = "auto"  # auto | float32 | mixed_bfloat16 | mixed_float16
    tta: bool = False  # save a model that averages each image with its mirror (2x inference)
    ensemble: int = 1  # members trained from seeds seed, seed+1, ...; the saved model averages them
    out_dir: Path = Path("runs")


def folder_named(value: str | Path) -> Path:
    """A folder as a user or a deployment named it. An empty one (`--out "$OUT"` with the
    variable unset, a deployment's `out_dir: ""`) is refused, where Path("") would have
    named the current folder; blank too: " " is a typo sooner than a folder."""
    if not str(value).strip():
        raise FerError(f"{str(value)!r} is empty: expected a folder path (`.` names the "
                       "current folder)")
    return Path(value)


def check_writable(folder: Path, what: str) -> Path:
    """``folder`` (a run or data folder), checked to be a folder this user can write or
    create (nothing is created here): a one-line error naming ``what`` set it, before any
    download, decoding or training rather than after."""
    existing = folder
    # os.path's tests, not Path's: they say False where a folder above may not be entered
    # (Path.exists raises PermissionError), and the walk goes on up to that folder
    while not os.path.exists(existing) and existing != existing.parent:
        if os.path.islink(existing):  # nothing can be created there: mkdir finds it taken
            raise FerError(f"{what} {folder}: {existing} is a link to "
                           f"{os.readlink(existing)}, which does not exist (a disk not mounted?)")
        existing = existing.parent
    if not os.path.isdir(existing):
        raise FerError(f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FerError(f"{what} {folder}: {existing} is not writable by this user")
    return folder
