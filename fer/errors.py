"""The error type for problems a user can fix (bad data, bad paths, bad settings).

The CLI prints a ``FerError`` as one line and exits non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class FerError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class DataError(FerError):
    """A dataset source that cannot be read: names the file, the entry and the rule."""


class NonFiniteScoresError(FerError):
    """A model that scores an image NaN or infinite (its training diverged, or it overflows
    in the precision it runs in): predict and evaluate refuse it; the batch-norm
    recalibration puts back the statistics that caused it."""


class RunStillGoing(FerError):
    """Following a remote run stopped while the run had not ended (no worker took it, its
    worker stopped polling, the API went away): the run's outcome is not known, so the CLI
    exits with its own code, not the one of a failed run."""


class StorageError(FerError):
    """Object storage, or a dataset's download server, that cannot be reached,
    authenticated against, or read.

    ``transient``: a failure that may pass by itself (a timeout, a refused connection, a 5xx),
    so retrying is worth it; denied access or a missing bucket is not.
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class NotFerObjectError(StorageError):
    """An object in a store that fer did not write as it reads it (a pointer or manifest
    that is not JSON, names no valid run, or is a run folder's, not a published run's):
    listings leave it out with a warning, where any other StorageError stops them."""


class MissingObjectError(StorageError):
    """An object a store was asked to download that it does not hold (deleted by a lifecycle
    rule, lost in a bucket copy): readers say what is missing and how to restore it."""


class FileWriteError(OSError):
    """A write of a run's or a report's file that failed (a full disk, a file limit), naming
    the file and the cause in one line: h5py's and numpy's errors name neither (h5py's is a
    multi-line dump), nor do Keras' and matplotlib's. An OSError, not a FerError, so that a
    Prefect retry of the training tries again; `fer train` resumes a run stopped by one."""

    def __repr__(self) -> str:  # OSError's leaves the file out, and Prefect logs the repr
        return f"FileWriteError({self.filename!r}: {self.strerror})"


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while ``path`` is written into a FileWriteError naming it."""
    try:
        yield
    except FileWriteError:
        raise
    except OSError as exc:
        cause = (os.strerror(exc.errno) if exc.errno
                 else (str(exc).splitlines() or [type(exc).__name__])[0])
        raise FileWriteError(exc.errno, cause, str(path)) from None


class TrainingDiverged(FerError):
    """The training loss became NaN or infinite: the run cannot go on at its learning rate
    (fer.checkpoint.mark_diverged records it, so that no resume or publish suggests it)."""


class CheckpointError(FerError):
    """A stopped run's checkpoint that cannot be continued: damaged (a crash mid-write), or
    written for another model (fer was upgraded). ``member_folder``: the ensemble member's
    checkpoint folder at fault, which a Prefect retry deletes to train that member again
    (the members that finished are kept); None: the retry trains the run anew."""

    def __init__(self, problem: str, *, member_folder: Path | None = None):
        remedy = f"; delete {member_folder} to train this member again" if member_folder else ""
        super().__init__(problem + remedy)
        self.problem = problem  # without the remedy, for a retry that applies it itself
        self.member_folder = member_folder


def expand_home(value: str | Path, *, what: str) -> Path:
    """``value`` with a leading ``~`` or ``~user`` expanded, as a shell would have; a FerError
    naming ``what`` where it cannot be (a ``~user`` typo, which the shell leaves as it is,
    or no home folder at all) instead of Python's RuntimeError traceback."""
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:
        raise FerError(f"{what} {str(value)!r}: cannot expand its ~ ({exc}); expected an "
                       "existing user's ~ or a path without one") from None


# 4xx answers that may pass by themselves (a request timeout, too many requests); the other
# 4xx (not found, forbidden, ...) will not, and retrying them only delays the failure.
PASSING_HTTP_ERRORS = frozenset({408, 429})
# 5xx answers that say the server cannot serve this request at all (not implemented, HTTP
# version not supported, no storage left): asking again gets the same answer. Other 5xx
# are outages.
LASTING_SERVER_ERRORS = frozenset({501, 505, 507})


def http_status_passes(status: object) -> bool:
    """Whether an HTTP answer of ``status`` may pass by itself (worth trying again later):
    the rule downloads and the S3 store share."""
    return isinstance(status, int) and (status in PASSING_HTTP_ERRORS or (
        500 <= status < 600 and status not in LASTING_SERVER_ERRORS))
