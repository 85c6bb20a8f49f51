"""Where an unfinished training run stands, kept in its run folder so it can be resumed.

A `best` run trains three 60-epoch networks: hours on two CPU cores, all lost to a reboot,
an out-of-memory kill or Ctrl-C. After every epoch the run folder's ``checkpoint/`` gets
the network's weights with its optimizer state (Keras' weights file holds both), the best
epoch's weights so far, and a small JSON record of the member's history and clocks; a
finished member keeps its final weights there. ``fer train --resume runs/<id>`` continues
from the last finished epoch, and a resumed ensemble trains only the members left. The
folder is removed once the run is complete: its model, history and manifest written and
the test split scored.

The random streams of augmentation and dropout continue where they stopped (their states
are saved with each epoch); the shuffling starts a stream of its own at the resumed epoch
(tf.data's cannot be wound forward), so a resumed run sees its training images in other
batches than an uninterrupted one would, and ends close to it but not bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import shlex
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fer.config import TrainConfig
from fer.errors import CheckpointError, FerError, writing
from fer.files import fsync_folder, fsync_path
from fer.manifest import read_json, write_json

if TYPE_CHECKING:  # importing Keras would load TensorFlow, which fer.runs does not need
    import keras

FOLDER = "checkpoint"
log = logging.getLogger(__name__)
RUN_RECORD = "run.json"
DIVERGED = "diverged.txt"  # why the run's training diverged: it is not to be resumed
FORMAT = 1


@dataclass(frozen=True)
class RunRecord:
    """What a run records when it starts: enough to train the rest of it after a stop."""

    run_dir: Path
    config: TrainConfig
    precision: str  # as resolved when the run started, not re-resolved on another machine
    learning_rate: float
    data_source: str
    data_sha256: str
    git_commit: str | None
    started_by: str | None = None  # e.g. "prefect flow run <id>": a retry of it resumes the run
    precision_reason: str | None = None  # why that precision (None in an older fer's record)
    data_origin: str | None = None  # the source as the user named it (a URL, an s3:// key)
    recipe: dict | None = None  # fer.models.ModelSpec.recipe (None in an older fer's record)
    # The decoded data and the process that began the run; each resume's process. The
    # manifest reports them, not only the process that happened to finish the run. None /
    # empty in an older fer's record.
    pixels_sha256: str | None = None
    started: str | None = None
    versions: dict | None = None
    machine: dict | None = None
    resumes: tuple[dict, ...] = ()


def start_run(run: RunRecord) -> None:
    """Record a new run's settings before its first epoch (its folder is its out_dir's)."""
    folder = run.run_dir / FOLDER
    folder.mkdir()
    options = {k: v for k, v in dataclasses.asdict(run.config).items() if k != "out_dir"}
    record = {"format": FORMAT, "config": options,
              "precision": run.precision, "learning_rate": run.learning_rate,
              "data": {"source": run.data_source, "sha256": run.data_sha256,
                       "origin": run.data_origin, "pixels_sha256": run.pixels_sha256},
              "git_commit": run.git_commit, "started_by": run.started_by,
              "precision_reason": run.precision_reason, "recipe": run.recipe,
              "started": run.started, "versions": run.versions, "machine": run.machine,
              "resumes": list(run.resumes)}
    write_json(folder / RUN_RECORD, record)


def record_resume(run: RunRecord, process: dict) -> RunRecord:
    """Add ``process`` (when, commit, versions, machine) to the run's resumes, in its record
    too, so that a later resume keeps it; the run as it stands now."""
    path = run.run_dir / FOLDER / RUN_RECORD
    try:  # read again: a resume that died after read_run's read may have added its own
        record = json.loads(path.read_text())
        resumes = (*_resumes(record.get("resumes")), process)
        write_json(path, {**record, "resumes": list(resumes)})
    except (OSError, ValueError) as exc:
        raise FerError(f"{path}: cannot record this resume in it "
                       f"({getattr(exc, 'strerror', None) or exc})") from None
    return dataclasses.replace(run, resumes=resumes)


def read_run(run_dir: Path) -> RunRecord:
    """The run ``run_dir`` was training, for ``fer train --resume``."""
    run_dir = Path(run_dir).resolve()  # `--resume .` from inside it: its name is the run id
    path = run_dir / FOLDER / RUN_RECORD
    if not path.is_file():
        raise FerError(f"{run_dir}: nothing to resume: {_why_not_resumable(run_dir)}")
    diverged = diverged_reason(run_dir)
    if diverged is not None:
        raise FerError(f"{run_dir}: cannot be resumed: {diverged}")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError(f"{type(record).__name__}, expected an object")
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {FORMAT}")
        # a run begun before split_seed existed carved its validation with its seed
        options = {"split_seed": record["config"]["seed"], **record["config"]}
        config = TrainConfig(**{**options, "out_dir": run_dir.parent})
        return RunRecord(run_dir=run_dir, config=config, precision=record["precision"],
                         learning_rate=float(record["learning_rate"]),
                         data_source=record["data"]["source"],
                         data_sha256=record["data"]["sha256"],
                         git_commit=record.get("git_commit"),
                         started_by=record.get("started_by"),
                         precision_reason=record.get("precision_reason"),
                         data_origin=record["data"].get("origin"),
                         recipe=_recipe(record.get("recipe")),
                         pixels_sha256=record["data"].get("pixels_sha256"),
                         started=record.get("started"), versions=record.get("versions"),
                         machine=record.get("machine"),
                         resumes=_resumes(record.get("resumes")))
    except (ValueError, KeyError, TypeError) as exc:
        raise FerError(f"{path}: not a run record this version can resume ({exc})") from None
    except OSError as exc:  # another user's run, say
        raise FerError(f"{path}: cannot read it ({exc.strerror})") from None


def _resumes(value) -> tuple[dict, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"resumes {value!r}, expected a list of objects")
    return tuple(value)


def _recipe(value) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"recipe {value!r}, expected an object")
    return value


def find_started(out_dir: Path, *, started_by: str) -> Path | None:
    """The run folder in ``out_dir`` that ``started_by`` began, finished or not (its
    checkpoint's record or its manifest names it); None if there is none.

    A retried Prefect flow run keeps its id: with it, the retry continues its own stopped
    run, or takes the run it already completed, instead of training again; it never picks
    up another run's.
    """
    for folder in sorted(Path(out_dir).glob("*/"), reverse=True):  # run ids sort by time
        for record in (folder / FOLDER / RUN_RECORD, folder / "manifest.json"):
            if read_json(record).get("started_by") == started_by:  # {} for none
                return folder
    return None


def mark_diverged(run_dir: Path, reason: str) -> None:
    """Record that the run's training diverged, and why (the error's words, with the
    learning rate and what to do): its checkpoint stays, but neither `fer train --resume`
    nor `fer publish` offers to finish it at the same learning rate."""
    path = Path(run_dir) / FOLDER / DIVERGED
    with writing(path):
        path.write_text(reason + "\n")


def diverged_reason(run_dir: Path) -> str | None:
    """Why the run's training diverged (mark_diverged); None where it did not. A record that
    is there but empty (a stop or a power loss as it was written) or not UTF-8 (garbage
    where the reason was) still says it did."""
    try:
        recorded = (Path(run_dir) / FOLDER / DIVERGED).read_bytes()
    except OSError:  # none written (or unreadable: the record's own checks name problems)
        return None
    try:
        return recorded.decode().strip() or _UNREADABLE_DIVERGENCE
    except ValueError:
        return _UNREADABLE_DIVERGENCE


_UNREADABLE_DIVERGENCE = ("training diverged (its recorded reason is unreadable); train "
                          "again with a lower --learning-rate")


def is_complete(run_dir: Path) -> bool:
    """Trained and scored: the checkpoint goes once the test reports are written."""
    run_dir = Path(run_dir)
    return (all((run_dir / name).is_file() for name in ("manifest.json", "classification_report.txt"))
            and not (run_dir / FOLDER).exists())


def _why_not_resumable(run_dir: Path) -> str:
    if not (run_dir / "manifest.json").is_file():
        return (f"no {FOLDER}/{RUN_RECORD} (expected the folder of a `fer train` run that "
                "stopped before its end)")
    if not (run_dir / "classification_report.txt").is_file():  # an older fer, stopped scoring
        return ("its training finished but its test split was never scored, and it kept no "
                "checkpoint to finish from (a run of an older fer); train it again")
    return (f"its training finished (the manifest is written); "
            f"`fer publish {shlex.quote(str(run_dir))}` publishes it")


LOCK = "training.lock"


@contextlib.contextmanager
def training_lock(run_dir: Path):
    """Hold the run's checkpoint while training it: a second process resuming the same run
    (`fer train --resume` in another terminal, a Prefect retry of a run still training)
    would overwrite its epochs' files and delete the other's, so it is refused, naming the
    holder. The kernel releases the lock when the holder exits, however it exits."""
    import socket

    path = Path(run_dir) / FOLDER / LOCK
    gone = FerError(f"{run_dir}: nothing to resume: its checkpoint is gone (another process "
                    "finished the run meanwhile?)")
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held until the training ends
    except FileNotFoundError:  # another process finished the run meanwhile
        raise gone from None
    except PermissionError as exc:  # another user's run: its checkpoint is not ours
        raise FerError(f"{path}: cannot open it to resume the run ({exc.strerror}); resume "
                       "it as the user who began it") from None
    except OSError as exc:  # a read-only or full filesystem, say
        raise FerError(f"{path}: cannot open it to resume the run ({exc.strerror})") from None
    try:
        _lock_unless_held(handle)
        if not (path.parent / RUN_RECORD).exists():  # finished between our open and lock:
            handle.close()  # the lock is on a removed file, and training would start anew
            raise gone
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FerError(f"{run_dir} is being trained by {holder}; wait for it to end, or stop "
                       "it, before resuming") from None
    except OSError as exc:  # a filesystem without locks (some NFS, CIFS, FUSE mounts)
        handle.close()
        unlocked = exc
    else:
        unlocked = None
    if unlocked is not None:  # trained outside the except: the training's own errors are
        log.warning("%s: cannot lock the run (%s); nothing stops a second process resuming "
                    "it at the same time", run_dir, unlocked.strerror)  # not chained to it
        yield
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def _lock_unless_held(handle) -> None:
    """An exclusive flock on ``handle``, or BlockingIOError where a process holds the run.
    Tries for half a second: `fer publish` asking who trains the run (trainer_of) holds a
    shared lock for a moment, which is no training."""
    import fcntl

    for attempt in range(10):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == 9:
                raise
            time.sleep(0.05)


def trainer_of(run_dir: Path) -> str | None:
    """Who holds the run's training lock now ("process N on HOST"); None where no one does
    (or it cannot be told): then the run stopped, or was never begun here."""
    import fcntl

    try:
        handle = open(Path(run_dir) / FOLDER / LOCK)  # noqa: SIM115 - closed below
    except OSError:  # never trained by this fer, or not ours to read
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        except OSError:  # a filesystem without locks
            return None
    return None


def finish_run(run_dir: Path) -> None:
    """The run's files are written: its checkpoint is no longer needed. It is renamed away
    first, in one step: a stop while deleting could otherwise leave a checkpoint without its
    record, which neither a resume nor `fer publish` accepts.

    The run's files are flushed to disk before: the removal, a change to the folder alone,
    could reach the disk before their bytes (Keras writes model.keras without an fsync),
    and a power loss then left an empty model.keras, which `fer publish` uploads, and no
    checkpoint to rebuild it from."""
    folder = Path(run_dir) / FOLDER
    removing = folder.with_name(f".{FOLDER}-removed")
    for path in sorted(Path(run_dir).iterdir()):  # its files; the checkpoint is a folder
        if path.is_file() and not path.is_symlink():
            with writing(path):
                fsync_path(path)
    fsync_folder(Path(run_dir))
    shutil.rmtree(removing, ignore_errors=True)  # one left by a stop during the removal
    if folder.exists():
        os.replace(folder, removing)
    shutil.rmtree(removing, ignore_errors=True)


@dataclass
class MemberProgress:
    """One member's training so far; ``epochs_done`` 0 is a member not yet begun."""

    epochs_done: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    elapsed: list[float] = field(default_factory=list)  # wall clock at each epoch's end
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # this member's, over every process that trained it
    best_value: float = -math.inf
    best_epoch: int = 0
    weights_file: str | None = None  # the last epoch's weights and optimizer state
    random_states: list[list[int]] = field(default_factory=list)  # augmentation's, dropout's
    best_file: str | None = None
    finished: bool = False  # trained, its best epoch restored, its recalibration decided
    batch_norm_recalibration: dict | None = None
    resumed_at: list[int] = field(default_factory=list)  # epochs after which it was resumed
    optimizer_steps: int | None = None  # after the last epoch (None in an older fer's record)


class MemberCheckpoint:
    """``checkpoint/member-K/``: one member's progress and weights."""

    def __init__(self, run_dir: Path, number: int):
        self.folder = Path(run_dir) / FOLDER / f"member-{number}"
        with writing(self.folder):  # a full disk, for member 2's folder say
            self.folder.mkdir(exist_ok=True)  # never the checkpoint itself: finished runs lose it
        self._state = self.folder / "state.json"

    def progress(self) -> MemberProgress:
        """What the member reached before a stop; a new member's is empty."""
        if not self._state.is_file():
            return MemberProgress()
        with self._readable(self._state.name):  # bytes that are not UTF-8 are damage too
            try:
                return MemberProgress(**json.loads(self._state.read_bytes()))
            except TypeError as exc:  # JSON of other fields: as damaged as unparsable JSON
                raise ValueError(exc) from None

    def restore(self, model: keras.Model, progress: MemberProgress) -> None:
        """The last finished epoch's weights and optimizer state (the model is compiled)."""
        if progress.weights_file is None:
            return
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        with self._readable(progress.weights_file):
            model.load_weights(self.folder / progress.weights_file)
            for variable, state in zip(_random_states(model), progress.random_states, strict=True):
                variable.assign(np.asarray(state, dtype=variable.dtype))
        steps = int(model.optimizer.iterations)
        if progress.optimizer_steps is not None and steps != progress.optimizer_steps:
            # Keras only warns where an optimizer's variables do not match its file (another
            # Keras, say): the rest would train from step 0 of the schedule, moments zeroed
            raise CheckpointError(
                f"{self.folder / progress.weights_file}: the optimizer's state did not load "
                f"(step {steps}, expected {progress.optimizer_steps}; another Keras than the "
                "run began with?)", member_folder=self.folder)

    def best_weights(self, progress: MemberProgress) -> list[np.ndarray] | None:
        """The best epoch's weights so far; None before any epoch improved."""
        return None if progress.best_file is None else self._arrays(progress.best_file)

    def restore_final(self, model: keras.Model) -> None:
        """A finished member's weights (its best epoch's, with the statistics it kept) into
        ``model``; weights that do not fit it (the model changed since) as one line."""
        weights = self._arrays("final.npz")
        with self._readable("final.npz"):
            model.set_weights(weights)

    def save_epoch(self, model: keras.Model, progress: MemberProgress, *,
                   best_weights: list[np.ndarray] | None) -> None:
        """After an epoch: its weights (and the best epoch's, when it is the best), then the
        record that names them, so a stop between two writes leaves the last epoch whole."""
        progress.weights_file = f"epoch-{progress.epochs_done}.weights.h5"
        with writing(self.folder / progress.weights_file):
            model.save_weights(self.folder / progress.weights_file)
            fsync_path(self.folder / progress.weights_file)
        progress.random_states = [np.asarray(v).tolist() for v in _random_states(model)]
        progress.optimizer_steps = int(model.optimizer.iterations)
        if best_weights is not None and progress.best_epoch == progress.epochs_done:
            progress.best_file = f"best-{progress.best_epoch}.npz"
            _save_arrays(self.folder / progress.best_file, best_weights)
        self._commit(progress)

    def save_final(self, model: keras.Model, progress: MemberProgress) -> None:
        """The finished member's weights; its epoch files are no longer needed."""
        _save_arrays(self.folder / "final.npz", model.get_weights())
        progress.finished, progress.weights_file, progress.best_file = True, None, None
        self._commit(progress)

    def _commit(self, progress: MemberProgress) -> None:
        # flushed with its rename (fer.files) before the files it retires go
        write_json(self._state, dataclasses.asdict(progress))
        keep = {self._state.name, "final.npz", progress.weights_file, progress.best_file}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink()

    def _arrays(self, name: str) -> list[np.ndarray]:
        with self._readable(name), np.load(self.folder / name) as arrays:
            return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]

    @contextlib.contextmanager
    def _readable(self, name: str):
        """A damaged checkpoint file (a crash mid-write, another model) as one line that
        names the member folder to delete; a system error reading it as one line without
        that remedy (see _unreadable_here)."""
        try:
            yield
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # .h5, .npz
            # h5py's "file signature not found" has no errno: damage, as a missing file is
            if isinstance(exc, OSError) and exc.errno not in (None, errno.ENOENT):
                raise _unreadable_here(self.folder / name, exc) from None
            raise CheckpointError(f"{self.folder / name}: unreadable checkpoint ({exc})",
                                  member_folder=self.folder) from None


def _unreadable_here(path: Path, exc: OSError) -> FerError:
    """A checkpoint file the system could not read (an I/O error, a stale NFS handle, too
    many open files, no permission): the file may well be whole, since a stop never leaves a
    half-written file recorded, so the error is not a CheckpointError, whose member folder a
    Prefect retry deletes (a finished member: hours of training)."""
    return FerError(f"{path}: cannot read it ({exc.strerror}); fix the cause, then resume "
                    "the run")


def _random_states(model: keras.Model) -> list:
    """The states of the model's random layers (augmentation, dropout), which Keras' weights
    file leaves out: without them a resumed run would replay its first epochs' draws."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def _save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    with writing(path):
        np.savez(path, *arrays)
        fsync_path(path)
