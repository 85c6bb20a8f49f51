"""Publish training runs to a store (fer.storage) and read them back.

Both backends hold the same layout under their root or prefix::

    runs/<run-id>/<artifact>        each artifact the run's manifest lists (a run of a fer
                                    before the list: every file of the run folder but
                                    later additions, see _added_later)
    runs/<run-id>/manifest.json     the run's manifest + ``files`` + ``metrics``; written LAST
    latest.json, champion.json      pointers; written after the manifest they name

A run without a remote manifest is incomplete and invisible to every reader, so a publish
that dies halfway leaves nothing a reader can pick up and can simply be repeated.
The backends only move bytes; publishing, listing and verification live here, once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from fer.checkpoint import FOLDER as CHECKPOINT_FOLDER
from fer.checkpoint import diverged_reason, trainer_of
from fer.errors import FerError, MissingObjectError, NotFerObjectError, StorageError
from fer.files import written_whole
from fer.storage import LocalStore, Store, local_errors

MANIFEST = "manifest.json"
METRICS = "metrics.json"
REPORT = "classification_report.txt"
POINTERS = ("latest", "champion")
log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


# --- publishing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishResult:
    """What ``publish_run`` did: where the run went, whether this publishing made it the
    champion, and whether it is the champion now (also when it already was: a repeat, or a
    retry whose first attempt moved the pointer and lost the answer)."""

    run_id: str
    became_champion: bool
    location: str
    is_champion: bool
    not_champion_because: str | None = None  # why the champion stayed, where it did

    @property
    def champion_note(self) -> str:
        return self.note(override="--force-champion")

    def note(self, *, override: str) -> str:
        """:func:`champion_note` for this result, naming ``override`` (an option, or a
        flow's parameter) as what makes the run the champion."""
        return champion_note(became=self.became_champion, now=self.is_champion,
                             because=self.not_champion_because, override=override)


def champion_note(*, became: bool, now: bool, because: str | None = None,
                  override: str = "--force-champion") -> str:
    """What a publishing message adds about the champion: with ``because``, why this run
    is not it (a user whose better run stayed behind on other data or another split had
    no word of it, nor of ``override``, the option or a flow's parameter)."""
    if became:
        return " (new champion)"
    if now:
        return " (the champion already)"
    return f" (not champion: {because}; {override} makes it the champion)" if because else ""


@dataclass(frozen=True)
class _LocalRun:
    folder: Path
    run_id: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    names: list[str]  # the files to publish, relative to the folder

    @functools.cached_property
    def files(self) -> dict[str, dict[str, Any]]:
        """Size and sha256 of each file to publish, read when publishing first needs them:
        an older fer's run is read twice (its names then depend on the store's manifest)."""
        return _describe_files(self.folder, self.names)


def publish_run(run_dir: Path, store: Store, *, force_champion: bool = False) -> PublishResult:
    """Upload a run folder, then its manifest, then move the pointers; safe to repeat.

    Publishing a published run again uploads its files again (the same bytes: the local
    files match the published manifest's sha256), so one lost or damaged in the store since
    (a lifecycle rule, a cut-short bucket copy) is restored, as the errors of `fer reports`
    advise.

    ``latest`` moves to the newest run by ``created``; ``champion`` moves when the run was
    trained on the same data and validation split as the current champion and its saved
    model's validation accuracy is higher, or equal and the run newer (see _why_not_beaten);
    when the champion's run is gone from the store; or always with ``force_champion``. Choosing on test
    accuracy would be choosing the model on the test set; across different data neither
    figure compares.
    """
    run = _read_run_folder(Path(run_dir))
    try:
        published = _load_manifest(store, run.run_id)
    except NotFerObjectError as exc:  # not overwritten: it may be someone's run folder
        if isinstance(store, LocalStore):  # trained into the store's own runs/: say so, not
            _check_outside(store, Path(run_dir).resolve().parent)  # "delete the manifest"
        raise NotFerObjectError(
            f"{exc}; if it is this run's published manifest, damaged (a cut-short copy of "
            "the store), delete that one object and publish the run again") from None
    if published is not None and run.manifest.get("artifacts") is None:  # an older fer's run:
        run = _read_run_folder(Path(run_dir), published=published.get("files"))  # as published
    remote = {**run.manifest, "files": run.files, "metrics": run.metrics}
    if published is not None and published.get("files") != run.files:
        theirs = published.get("files") if isinstance(published.get("files"), dict) else {}
        other = sorted(name for name in theirs.keys() | run.files.keys()
                       if theirs.get(name) != run.files.get(name))
        raise StorageError(
            f"run '{run.run_id}' is already published at {store.url(_run_key(run.run_id, ''))} "
            f"with other files ({', '.join(other)}); published runs never change: to publish "
            "this folder as well, copy it and give the copy a new run_id in its manifest.json"
        )
    _upload(run, remote, store, manifest=published is None)
    became, now, because = _move_pointers(store, remote, force_champion=force_champion)
    return PublishResult(run.run_id, became, store.url(_run_key(run.run_id, "")),
                         is_champion=now, not_champion_because=None if now else because)


WRITE_CHECK = ".fer-write-check"
_WRITE_CHECK_TRIES = 6


def check_can_publish(store: Store, *, out_dir: Path | None = None) -> None:
    """Write a small object where publishing writes, so that a store fer may read but not
    write (a read-only folder, keys without PutObject) fails before the hours of training,
    not after them; then write it as pointers are written, conditionally: a store that
    refuses a write on the version it gave fails here too (every pointer move would), and
    one that lets writes that must fail through gets a warning (two runs published at the
    same moment could overwrite each other's pointer there). The object is overwritten each
    time and safe to delete. ``out_dir``, where training writes its run folders, must not
    be a folder store's runs/ (see _check_outside)."""
    if out_dir is not None and isinstance(store, LocalStore):
        _check_outside(store, Path(out_dir))
    store.put_bytes(WRITE_CHECK, _WRITE_CHECK_TEXT)
    # Other tries after a backoff: runs started together write the object too, and where
    # each write gets a new ETag (SSE-KMS buckets) their writes move its version between
    # our read and our write; a store that refuses its own version refuses every try.
    for attempt in range(_WRITE_CHECK_TRIES):
        _, version = store.get_versioned(WRITE_CHECK)
        if store.put_bytes_if(WRITE_CHECK, _WRITE_CHECK_TEXT, version=version):
            break
        if attempt + 1 < _WRITE_CHECK_TRIES:
            _back_off(attempt)
    else:
        raise StorageError(f"{store.url(WRITE_CHECK)}: the store refused a write conditional "
                           "on the version it had just given (If-Match on its ETag); "
                           "publishing could not move the latest and champion pointers")
    if (store.put_bytes_if(WRITE_CHECK, _WRITE_CHECK_TEXT, version=None)  # it exists
            or store.put_bytes_if(WRITE_CHECK, _WRITE_CHECK_TEXT, version=_NO_SUCH_VERSION)):
        log.warning("%s did not refuse a conditional write that had to fail (If-None-Match "
                    "or If-Match); two runs published at the same moment may overwrite each "
                    "other's pointer", store.location)


def _check_outside(store: LocalStore, out_dir: Path) -> None:
    """A run folder trained inside the store's runs/ is read there as a published run whose
    manifest lacks what publishing adds: its publishing fails, after the training."""
    runs, out_dir = Path(store.url("runs")), out_dir.expanduser()
    # os.path: False in a folder this user may not enter (Path.exists raised), where writing
    # the store's .fer-write-check then says what is wrong
    same = (os.path.samefile(out_dir, runs)  # mounts too
            if os.path.exists(out_dir) and os.path.exists(runs)
            else out_dir.resolve() == runs.resolve())
    if same:
        raise StorageError(f"{out_dir}: is where the store {store.location} keeps its "
                           "published runs; a run folder there cannot be published to it: keep "
                           "run folders outside the store (train with another --out, or a "
                           "flow's out_dir; move a stopped run's folder out to resume it)")


def _back_off(attempt: int) -> None:
    """A random wait, doubling with each attempt up to a second, before trying a write that
    another writer's got in the way of again (random: two that met do not meet again)."""
    time.sleep(_UNSEEDED.uniform(0, min(1.0, 0.05 * 2 ** attempt)))


# Not the shared `random`, which training seeds (keras.utils.set_random_seed) and leaves
# seeded: two runs of one --seed publishing at once had drawn the same waits, and met again.
_UNSEEDED = random.SystemRandom()


_NO_SUCH_VERSION = '"fer-no-such-version"'
_WRITE_CHECK_TEXT = (b"written by fer before training, to check that runs can be published "
                     b"here; safe to delete\n")


def _upload(run: _LocalRun, remote: dict[str, Any], store: Store, *, manifest: bool) -> None:
    # Artifacts first, manifest last: until the manifest lands the run does not exist.
    for name in run.files:
        store.put_file(_run_key(run.run_id, name), run.folder / name)
    if manifest:
        _write_manifest(run, remote, store)


def _write_manifest(run: _LocalRun, remote: dict[str, Any], store: Store) -> None:
    """The run's manifest, written only where none is: another publisher of this run id may
    have written its own since ours was read as missing. The same run (a flow's retry beside
    `fer publish`) goes on; another folder's is an error."""
    key = _run_key(run.run_id, MANIFEST)
    for attempt in range(POINTER_ATTEMPTS):
        if store.put_bytes_if(key, _dump(remote), version=None):
            return
        theirs = _load_manifest(store, run.run_id)
        if theirs is not None:
            if theirs.get("files") != run.files:
                raise StorageError(
                    f"run '{run.run_id}' was published at {store.url(_run_key(run.run_id, ''))} "
                    "meanwhile, by another publisher, with other files, and its files there "
                    "may now mix both: publish the run folder that manifest came from again to "
                    "restore them, and give this one a new run_id in its manifest.json")
            return
        _back_off(attempt)  # refused (S3's 409) before the other's write shows: try again
    raise StorageError(f"{store.url(key)}: the store refused writing the manifest "
                       f"{POINTER_ATTEMPTS} times though none was there; publish the run again",
                       transient=True)


def _move_pointers(store: Store, remote: dict[str, Any], *, force_champion: bool
                   ) -> tuple[bool, bool, str | None]:
    """Move ``latest`` and ``champion`` where the run beats them; whether ``champion`` moved,
    whether it names the run now, and why not where the champion stayed."""
    record = _pointer_record(remote)
    champion_already, because = False, None

    def newer_than(latest: dict[str, Any] | None) -> bool:
        return latest is None or _age(record) >= _age(latest) or _run_gone(store, latest, "latest")

    def beats(champion: dict[str, Any] | None) -> bool:
        nonlocal champion_already, because
        champion = _comparable_champion(store, champion)
        champion_already = champion is not None and champion.get("run_id") == record["run_id"]
        if champion_already:
            return False  # published again: it is the champion already, nothing moves
        because = None if force_champion or champion is None else _why_not_beaten(record,
                                                                                 champion)
        return because is None

    _move_pointer(store, "latest", record, when=newer_than)
    moved = _move_pointer(store, "champion", record, when=beats)
    return moved, moved or champion_already, because


POINTER_ATTEMPTS = 10


def _move_pointer(store: Store, name: str, record: dict[str, Any], *,
                  when: Callable[[dict[str, Any] | None], bool]) -> bool:
    """Point ``name`` at ``record`` if ``when`` holds for the pointer as it is; True when
    this call moved it. The write is conditional on the pointer not having changed since it
    was read: two runs published at the same moment (a scheduled retrain and a manual
    `fer publish`) would otherwise both compare against the old pointer, and the later
    write would win, a worse run's included. On a conflict the pointer is read and compared
    again."""
    key = f"{name}.json"
    tried = False
    for attempt in range(POINTER_ATTEMPTS):
        data, version = store.get_versioned(key)
        try:
            pointer = _parse_json(data, store=store, key=key)
            if tried and pointer is not None and pointer.get("run_id") == record["run_id"]:
                return True  # our write landed though its answer was lost, and a retry refused
            moves = when(pointer)
        except NotFerObjectError as exc:  # refused, it blocked every publish for good
            log.warning("%s; replacing it", exc)
            moves = True
        if not moves:
            return False
        tried = True
        if store.put_bytes_if(key, _dump(record), version=version):
            return True
        log.info("%s changed while publishing %s; comparing again", store.url(key),
                 record["run_id"])
        _back_off(attempt)  # let the other finish
    raise StorageError(f"{store.url(key)} changed {POINTER_ATTEMPTS} times while publishing "
                       f"run '{record['run_id']}'; its files are published, publish it again "
                       "to move the pointer", transient=True)


# 2: val_accuracy is the saved model's (after the batch-norm recalibration); pointers of an
# older fer held the best epoch's, before it, and are rebuilt from their run's manifest.
POINTER_FORMAT = 2


def _pointer_record(remote: dict[str, Any]) -> dict[str, Any]:
    """What a pointer holds: enough to compare runs without reading their manifests."""
    metrics, data = remote["metrics"], remote.get("data") or {}
    return {
        "format": POINTER_FORMAT,
        "run_id": remote["run_id"],
        "created": remote["created"],
        "model": remote.get("model"),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics.get("macro_f1"),
        "val_accuracy": _validation_accuracy(metrics),
        "data_sha256": data.get("sha256"),
        "validation": data.get("validation"),
    }


def _validation_accuracy(metrics: dict[str, Any]) -> float | None:
    """The saved model's validation accuracy, if known. Runs of an older fer recorded it
    only for averaged models: for theirs, the figure after a kept batch-norm recalibration
    (the saved weights), else the best epoch's."""
    recalibration = metrics.get("batch_norm_recalibration")
    recalibrated = (recalibration.get("val_accuracy_after")
                    if isinstance(recalibration, dict) and recalibration.get("kept") else None)
    for value in (metrics.get("saved_model_val_accuracy"), recalibrated,
                  metrics.get("best_val_accuracy")):
        if value is not None:  # a NaN is the saved model's unknown, not a cue for another's
            return float(value) if _is_number(value) else None
    return None


def _comparable_champion(store: Store, champion: dict[str, Any] | None
                         ) -> dict[str, Any] | None:
    """The champion pointer as read, None when its run is gone from the store (removed by
    hand or by a retention rule: a gone run would otherwise stay champion for ever, its
    model no longer there to fetch); one of an older format (without validation accuracy,
    or with the best epoch's instead of the saved model's) is rebuilt from its run's
    manifest, as is one whose figure is not a number."""
    if champion is None:
        return None
    if champion.get("format") == POINTER_FORMAT and (champion.get("val_accuracy") is None
                                                     or _is_number(champion["val_accuracy"])):
        return None if _run_gone(store, champion, "champion") else champion
    run_id = _checked_run_id(champion, "champion", store=store)
    try:
        manifest = _load_manifest(store, run_id)
    except NotFerObjectError as exc:  # as _run_gone: not the pointer's fault; no free crown
        log.warning("%s; comparing with %s as it is", exc, store.url("champion.json"))
        theirs = champion.get("val_accuracy")
        return {**champion, "val_accuracy": float(theirs) if _is_number(theirs) else None}
    return _pointer_record(manifest) if manifest is not None else None


def _run_gone(store: Store, pointer: dict[str, Any], name: str) -> bool:
    """Whether the run pointer ``name`` names has no manifest in the store. One whose
    manifest is not a published run's is there (the pointer is compared as it is): the
    pointer is not at fault, and replacing it would crown a run on no comparison."""
    run_id = _checked_run_id(pointer, name, store=store)  # a bad one: the pointer is at fault
    try:
        return _load_manifest(store, run_id) is None
    except NotFerObjectError as exc:
        log.warning("%s; comparing with %s as it is", exc, store.url(f"{name}.json"))
        return False


def _why_not_beaten(record: dict[str, Any], champion: dict[str, Any]) -> str | None:
    """None where the run beats the champion: same data, same validation split (fraction,
    seed, how it was made: the recorded origin) and a higher validation accuracy, or an
    equal one and a newer run; unknowns never win. Ties go by age, not by publishing order,
    so publishing an older run again cannot take the champion back. Else why not, in words."""
    theirs_id = champion.get("run_id")
    for key, what in (("data_sha256", "data"), ("validation", "validation split")):
        if record[key] is None:
            return f"its {what} is not recorded"
        if champion.get(key) is None:
            return f"the champion {theirs_id} records no {what} to compare with"
        if record[key] != champion.get(key):
            return f"trained on another {what} than the champion {theirs_id}"
    ours, theirs = record["val_accuracy"], champion.get("val_accuracy")
    if ours is None:
        return "its validation accuracy is not recorded"
    if theirs is None or ours > theirs:
        return None
    if ours < theirs:
        return (f"validation accuracy {ours:.4f}, under the champion {theirs_id}'s "
                f"{theirs:.4f}")
    if _age(record) > _age(champion):
        return None
    return (f"validation accuracy {ours:.4f}, tied with the champion {theirs_id}, which is "
            "the later run")


def _read_run_folder(folder: Path, *, published: Any = None) -> _LocalRun:
    """Check a run folder has what publishing needs; name the folder and file when not.
    ``published``: the files the store's manifest lists, for a run without an artifact list."""
    if not folder.is_dir():
        raise FerError(f"run folder {folder} does not exist; pass the folder `fer train` wrote")
    if (folder / CHECKPOINT_FOLDER).is_dir():  # removed once the test split is scored
        diverged = diverged_reason(folder)
        if diverged is not None:
            raise FerError(f"run folder {folder} is not complete: {diverged}")
        trainer = trainer_of(folder)
        if trainer is not None:
            raise FerError(f"run folder {folder} is not complete: it is being trained by "
                           f"{trainer}; publish it once that ends (`fer train --publish` "
                           "publishes a run at its end)")
        stage = "scoring" if (folder / MANIFEST).is_file() else "training"
        raise FerError(f"run folder {folder} is not complete: its {stage} stopped before the "
                       f"end; `fer train --resume {shlex.quote(str(folder))}` finishes it")
    manifest = _read_json_file(folder, MANIFEST)
    metrics = _read_json_file(folder, METRICS)
    run_id = _check_run_id(manifest.get("run_id"), source=folder / MANIFEST)
    _check_created(manifest.get("created"), source=folder / MANIFEST)
    _check_accuracy(metrics.get("accuracy"), source=folder / METRICS)
    for key in ("parameters", "data"):  # what the store's readers rely on (_is_published)
        if not isinstance(manifest.get(key), dict | None):
            raise FerError(f"{folder / MANIFEST}: {key} {manifest[key]!r} must be a JSON "
                           "object, as `fer train` writes it")
    names = _artifact_names(folder, manifest.get("artifacts"),
                            published=manifest.get("files") if published is None else published)
    return _LocalRun(folder, run_id, manifest, metrics, names)


def _read_json_file(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise FerError(
            f"run folder {folder} has no {name}; only complete runs written by `fer train` "
            "can be published"
        )
    try:
        with _reading(path):
            value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FerError(f"{path} is not valid JSON ({exc}); re-run training to rewrite it") from exc
    if not isinstance(value, dict):
        raise FerError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _check_run_id(value: Any, *, source: Path | str) -> str:
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value) or value in POINTERS:
        raise FerError(
            f"{source}: run_id {value!r} is not a valid run id; expected letters, digits, "
            "'.', '_', '+' or '-' (at most 128), and not 'latest' or 'champion'"
        )
    return value


def _check_created(value: Any, *, source: Path) -> str:
    try:
        _parse_time(value)
    except (TypeError, ValueError):
        raise FerError(
            f"{source}: created {value!r} is not an ISO-8601 time such as "
            "'2024-05-01T12:00:00+00:00'"
        ) from None
    return value


def _check_accuracy(value: Any, *, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise FerError(f"{source}: accuracy {value!r} must be a number between 0 and 1")
    return float(value)


def _artifact_names(folder: Path, listed: Any, *, published: Any = None) -> list[str]:
    """The files to publish: those the manifest lists as artifacts; for a run of a fer
    before the list, those it was ``published`` with (the store's manifest, or a downloaded
    copy's own: publishing again stays harmless), else every file but later additions, as
    the list would.

    Listing keeps later additions out of the published run, e.g. the `evaluation/` folder
    `fer evaluate` writes beside the model by default.
    """
    if listed is None and isinstance(published, dict):  # one missing here is named as other
        return sorted(name for name in published
                      if not _escapes_run_folder(name) and (folder / name).is_file())
    if listed is None:
        return sorted(name for name in (p.relative_to(folder).as_posix()
                                         for p in folder.rglob("*") if p.is_file())
                      if not _added_later(name))
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise FerError(f"{folder / MANIFEST}: artifacts {listed!r} must be a list of file names")
    outside = [name for name in listed if _escapes_run_folder(name)]
    if outside:
        raise FerError(f"{folder / MANIFEST}: artifacts {outside} point outside the run folder")
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise FerError(f"run folder {folder} has no {', '.join(missing)} (listed in {MANIFEST}); "
                       "only complete runs written by `fer train` can be published")
    return sorted(listed)


def _added_later(name: str) -> bool:
    """A file no `fer train` wrote into its run folder: `fer evaluate`'s default reports,
    hidden files (a desktop's .DS_Store), partial downloads of `fer reports get`, and
    names whose bytes are not UTF-8 (which an S3 key cannot hold)."""
    parts = PurePosixPath(name).parts
    return (parts[0] == "evaluation" or any(part.startswith(".") for part in parts)
            or name.endswith(".part") or not _is_utf8(name))


def _is_utf8(name: str) -> bool:
    """False for a name Python read with surrogate escapes: bytes that are not UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named artifact (the manifest is not one), by relative name."""
    described = {}
    for name in names:
        if name != MANIFEST:
            with _reading(folder / name):
                described[name] = {"size": (folder / name).stat().st_size,
                                   "sha256": _sha256(folder / name)}
    return described


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A run folder's file the system will not let fer read (a run written by another
    account, a disk error) as one error line naming it."""
    try:
        yield
    except OSError as exc:
        raise FerError(f"cannot read {path} ({exc.strerror or type(exc).__name__}); check the "
                       "run folder's permissions") from None


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """One row of a run listing: what a user needs to pick a run."""

    run_id: str
    created: str
    model: str | None
    epochs: int | None
    accuracy: float
    macro_f1: float | None
    val_accuracy: float | None  # what the champion is chosen on
    is_champion: bool
    is_latest: bool


@dataclass(frozen=True)
class PublishedRun:
    """A complete published run: its remote manifest (local manifest + files + metrics)."""

    run_id: str
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


@dataclass(frozen=True)
class RunReport:
    """The classification report of a published run, with its metrics."""

    run_id: str
    text: str
    metrics: dict[str, Any]


def list_runs(store: Store) -> list[RunSummary]:
    """Every complete run, newest first; one manifest read per run."""
    latest, champion = (_marked_run(store, name) for name in POINTERS)
    manifests = (_listed_manifest(store, run_id) for run_id in store.run_ids())
    summaries = [
        _summary(manifest, latest=latest, champion=champion)
        for manifest in manifests
        if manifest is not None
    ]
    return sorted(summaries, key=lambda s: (_when(s.created), s.run_id), reverse=True)


def _listed_manifest(store: Store, run_id: str) -> dict[str, Any] | None:
    """A run's manifest for a listing: one fer did not publish is left out with a warning,
    instead of hiding every run from `fer reports list` (as for pointers)."""
    try:
        return _load_manifest(store, run_id)
    except NotFerObjectError as exc:
        log.warning("%s", exc)
        return None


def _summary(manifest: dict[str, Any], *, latest: str | None, champion: str | None) -> RunSummary:
    metrics = manifest.get("metrics", {})
    epochs = metrics.get("epochs", (manifest.get("parameters") or {}).get("epochs"))
    return RunSummary(
        run_id=manifest["run_id"],
        created=manifest.get("created"),
        model=manifest.get("model"),
        epochs=epochs,
        accuracy=metrics["accuracy"],
        macro_f1=metrics.get("macro_f1"),
        val_accuracy=_validation_accuracy(metrics),
        is_champion=manifest["run_id"] == champion,
        is_latest=manifest["run_id"] == latest,
    )


def resolve_run(store: Store, ref: str) -> PublishedRun:
    """The complete run a reference names: a run id, ``latest`` or ``champion``."""
    if ref in POINTERS:
        run_id = _pointer_run_id(store, ref)
        if run_id is None:
            raise StorageError(f"no run is marked '{ref}' in {store.location} yet; publish a run")
    else:
        run_id = _check_ref(ref, store=store)
    manifest = _load_manifest(store, run_id)
    if manifest is None and ref in POINTERS:
        raise StorageError(f"'{ref}' names run '{run_id}', which is no longer in "
                           f"{store.location}; publishing a run moves '{ref}' to it")
    if manifest is None:
        raise StorageError(
            f"run '{run_id}' not found in {store.location}; list the published runs to see "
            "which exist"
        )
    return PublishedRun(run_id, manifest)


def _check_ref(ref: str, *, store: Store) -> str:
    try:
        return _check_run_id(ref, source=store.location)
    except FerError as exc:
        raise StorageError(
            f"{ref!r} is not a run id, 'latest' or 'champion' (looking in {store.location})"
        ) from exc


def read_report(store: Store, ref: str) -> RunReport:
    """The ``classification_report.txt`` text and metrics of a published run, verified."""
    run = resolve_run(store, ref)
    if REPORT not in run.files:
        raise StorageError(f"run '{run.run_id}' in {store.location} was published without {REPORT}")
    data = store.get_bytes(_run_key(run.run_id, REPORT))
    if data is None:
        raise _missing(store, REPORT, run=run)
    _verify(hashlib.sha256(data).hexdigest(), run=run, name=REPORT)
    # fer writes UTF-8; a report edited in another encoding before publishing is shown
    # with its odd bytes replaced (U+FFFD), not refused: its bytes are verified
    return RunReport(run.run_id, data.decode("utf-8", errors="replace"), run.metrics)


def download_run(store: Store, ref: str, *, dest: Path) -> Path:
    """Download every artifact of a run into ``dest/<run-id>/``, checking each sha256."""
    run = resolve_run(store, ref)
    target = Path(dest) / run.run_id
    with local_errors("create", target, folder="--dest"):
        target.mkdir(parents=True, exist_ok=True)
    for name in run.files:
        _download_verified(store, run, name, target=target)
    # last, and whole (fer.files): it marks the folder complete
    with (local_errors("write", target / MANIFEST, folder="--dest"),
          written_whole(target / MANIFEST) as partial):
        partial.write_bytes(_dump(run.manifest))
    return target


def _download_verified(store: Store, run: PublishedRun, name: str, *, target: Path) -> None:
    """``name`` at its place under ``target`` once its sha256 is the manifest's; written
    whole (fer.files) under a temporary name of its own, so two downloads into one --dest
    never write one partial file, and a file that fails its check is never put in place."""
    path = target.joinpath(*_safe_parts(name, run=run))
    with local_errors("write", path, folder="--dest"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as partial:
            try:
                store.download(_run_key(run.run_id, name), partial)
            except MissingObjectError:
                raise _missing(store, name, run=run) from None
            _verify(_sha256(partial), run=run, name=name)


def _missing(store: Store, name: str, *, run: PublishedRun) -> StorageError:
    """A published file gone from the store, named where it was and with what restores it."""
    return StorageError(f"{name} of run '{run.run_id}' is missing from the store (not found "
                        f"at {store.url(_run_key(run.run_id, name))}); publish the run again")


def _safe_parts(name: str, *, run: PublishedRun) -> tuple[str, ...]:
    """A manifest's file name as path parts, refusing anything that escapes the run folder."""
    if _escapes_run_folder(name):
        raise StorageError(f"manifest of run '{run.run_id}' names an unsafe file path {name!r}")
    return PurePosixPath(name).parts


def _escapes_run_folder(name: str) -> bool:
    """Whether a file name from a manifest is empty, absolute or climbs out with '..', or
    holds a NUL, which no file name can (open() raised ValueError: a traceback)."""
    path = PurePosixPath(name)
    return not path.parts or path.is_absolute() or ".." in path.parts or "\0" in name


def _verify(digest: str, *, run: PublishedRun, name: str) -> None:
    expected = run.files[name]["sha256"]
    if digest != expected:
        raise StorageError(
            f"{name} of run '{run.run_id}' is corrupt: sha256 {digest} does not match the "
            f"manifest's {expected}; publish the run again"
        )


# --- shared helpers -------------------------------------------------------------------------


def _run_key(run_id: str, name: str) -> str:
    return f"runs/{run_id}/{name}"


def _load_manifest(store: Store, run_id: str) -> dict[str, Any] | None:
    """The remote manifest of a complete run, or ``None`` for a missing or incomplete one;
    a StorageError for one that is not a published run's."""
    key = _run_key(run_id, MANIFEST)
    manifest = _load_json(store, key)
    if manifest is not None and not _is_published(manifest):
        raise NotFerObjectError(
            f"{store.url(key)} is not the manifest of a published run (expected a run_id, its "
            "created time, files with a sha256 each, and metrics with accuracy): a `fer "
            "train` run folder inside the store? Keep run folders (--out, a flow's out_dir) "
            "outside it")
    if manifest is not None and manifest["run_id"] != run_id:  # listed twice as that run
        raise NotFerObjectError(
            f"{store.url(key)} is the manifest of run '{manifest['run_id']}', not of "
            f"'{run_id}': a copy of that run's folder? Remove it, or give the copy its own "
            "run_id and publish it from a run folder")
    return manifest


def _is_published(manifest: dict[str, Any]) -> bool:
    """What publishing adds to a run's manifest, and what its readers rely on: a listing,
    a download and a champion comparison read these fields without checking them again."""
    metrics, files = manifest.get("metrics"), manifest.get("files")
    return (isinstance(manifest.get("run_id"), str) and isinstance(manifest.get("created"), str)
            and isinstance(files, dict)
            and all(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    for entry in files.values())
            and isinstance(metrics, dict) and _is_number(metrics.get("accuracy"))
            and all(isinstance(manifest.get(key), dict | None) for key in ("parameters", "data")))


def _is_number(value: Any) -> bool:
    """A finite number: JSON's NaN and Infinity (Python reads and writes both) compare as no
    figure does, NaN neither above nor below (a tie, won by age) and Infinity above all."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _read_pointer(store: Store, name: str) -> dict[str, Any] | None:
    return _load_json(store, f"{name}.json")


def _pointer_run_id(store: Store, name: str) -> str | None:
    """The run a pointer names, checked like any run id: it becomes a key in the store and
    a folder under `fer reports get --dest`, so '../..' must not pass."""
    pointer = _read_pointer(store, name)
    return None if pointer is None else _checked_run_id(pointer, name, store=store)


def _checked_run_id(pointer: dict[str, Any], name: str, *, store: Store) -> str:
    """The run id in pointer ``name``, or a StorageError naming the pointer file."""
    try:
        return _check_run_id(pointer.get("run_id"), source=store.url(f"{name}.json"))
    except FerError as exc:
        raise NotFerObjectError(f"{exc}; it was not written by fer") from None


def _marked_run(store: Store, name: str) -> str | None:
    """The run a pointer names, for a listing: a pointer fer did not write marks no run,
    with a warning, instead of hiding every run from `fer reports list`."""
    try:
        return _pointer_run_id(store, name)
    except NotFerObjectError as exc:
        log.warning("%s", exc)
        return None


def _load_json(store: Store, key: str) -> dict[str, Any] | None:
    return _parse_json(store.get_bytes(key), store=store, key=key)


def _parse_json(data: bytes | None, *, store: Store, key: str) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict):
        raise NotFerObjectError(f"{store.url(key)} is not a JSON object; it was not written "
                                "by fer")
    return value


def _dump(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _parse_time(value: Any) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _age(record: dict[str, Any]) -> tuple[datetime, str]:
    """A run's place in time, for ``latest`` and champion ties: its creation time, then its
    id (start time, model, random suffix) for runs created in the same second, so that
    neither pointer depends on which of two such runs was published last."""
    return _when(record.get("created")), str(record.get("run_id") or "")


def _when(created: Any) -> datetime:
    """A run's creation time for ordering; unreadable times sort oldest."""
    try:
        return _parse_time(created)
    except (TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)
