"""Train a registry model on a dataset and write a complete run folder.

The validation split (never the test split) picks the best epoch; the test split is
scored once, after training, for the reports.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import logging
import math
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from fer.batchnorm import recalibrate_if_better
from fer.checkpoint import (
    MemberCheckpoint,
    MemberProgress,
    RunRecord,
    finish_run,
    is_complete,
    mark_diverged,
    record_resume,
    start_run,
    training_lock,
)
from fer.config import TrainConfig
from fer.data import Dataset, Split, pixels_sha256, split_sha256
from fer.errors import CheckpointError, FerError, TrainingDiverged, writing
from fer.evaluate import evaluate_run, predict_labels
from fer.labels import NUM_CLASSES
from fer.manifest import git_commit, machine, new_run_id, package_versions, write_json
from fer.models import ModelSpec, averaging, get_spec, with_precision
from fer.optimizers import build_optimizer
from fer.options import check_config
from fer.pipeline import training_batches
from fer.plots import plot_curves
from fer.precision import dtype_policy, resolve_precision, slow_here
from fer.seeding import seeded
from fer.storage import is_folder_store, location_from_anywhere, userinfo_dropped

RUN_FILES = ("model.keras", "history.csv", "curves.png", "classification_report.txt",
             "classification_report.json", "confusion_matrix.png", "metrics.json",
             "manifest.json")

log = logging.getLogger(__name__)  # progress for a person watching; the run folder has the record


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    metrics: dict


def train(dataset: Dataset, config: TrainConfig, *, verbose: int = 1,
          resume: RunRecord | None = None, resume_flags: str = "",
          data_origin: str | None = None) -> RunResult:
    """Fit, then score on the test split: the complete ``config.out_dir/<run-id>/`` folder.

    ``resume_flags`` are added to the resume command a stop logs: options the run does not
    record (``--publish --storage ...``) that the command which stopped was given.
    """
    with _fitting(dataset, config, resume=resume, started_by=None,
                  data_origin=data_origin) as (run, why, spec, resuming):
        # one hold from the first epoch to the scored run: another process resuming it
        # between the two would finish it, and this one's scoring would find it gone
        fitted = _fit_members(dataset, run, spec, why=why, resuming=resuming,
                              verbose=verbose, resume_flags=resume_flags)
        return RunResult(run_id=fitted.run_id, run_dir=fitted.run_dir,
                         metrics=_score(fitted.run_dir, dataset.test, resume_flags=resume_flags))


def publish_flags(storage: str | None, *, endpoint_url: str | None = None,
                  create_bucket: bool = False, force_champion: bool = False) -> str:
    """`fer train --resume`'s options that publish a resumed run as the stopped command would
    have (the run's record keeps its training options, not where it was to be published).
    ``storage``, ``endpoint_url``: where it publishes, FER_STORAGE and the environment's
    endpoint applied (a resume from a shell without them published elsewhere); a folder
    store as an absolute path, ~ expanded, for a resume from another folder or shell."""
    flags = ["--publish"]
    if storage:
        flags += ["--storage", shlex.quote(location_from_anywhere(storage))]
    if endpoint_url and not (storage and is_folder_store(storage)):  # a folder store's
        # resume would refuse it; the password left out: the command is logged (a flow's
        # to its server), and boto3 signs with AWS_* credentials, not the URL's
        flags += ["--endpoint-url", shlex.quote(userinfo_dropped(endpoint_url))]
    flags += [flag for flag, on in (("--create-bucket", create_bucket),
                                    ("--force-champion", force_champion)) if on]
    return " ".join(flags)


def resume_command(run_dir: Path, flags: str) -> str:
    return f"`fer train --resume {shlex.quote(str(run_dir))}{' ' + flags if flags else ''}`"


def score(run_dir: Path, test: Split, *, resume_flags: str = "") -> dict:
    """Score a fitted run on the test split, writing its reports, then drop its checkpoint:
    the run is complete. A stop while scoring leaves the checkpoint, so that a resume
    finishes the run instead of finding nothing to do. It holds the run's training lock, as
    fitting does: another process resuming the run meanwhile would rewrite the model being
    scored and find its checkpoint removed."""
    try:
        with training_lock(run_dir):
            return _score(run_dir, test, resume_flags=resume_flags)
    except FerError:
        if not is_complete(run_dir):
            raise
    # Another process (a `fer train --resume` between a flow's train and evaluate tasks)
    # finished the run meanwhile: its reports stand, and the run is not a failure.
    log.info("%s was finished by another process meanwhile; its test reports stand", run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def _score(run_dir: Path, test: Split, *, resume_flags: str) -> dict:
    try:
        metrics = evaluate_run(run_dir, test)
    except FerError:
        raise  # a problem to fix first: resuming would meet it again
    except BaseException:
        log.info("scoring stopped; %s finishes the run", resume_command(run_dir, resume_flags))
        raise
    finish_run(run_dir)
    return metrics


def fit(dataset: Dataset, config: TrainConfig, *, verbose: int = 1,
        resume: RunRecord | None = None, started_by: str | None = None,
        resume_flags: str = "", data_origin: str | None = None) -> RunResult:
    """Train on train, select the epoch on validation; write model, history, curves, manifest.

    With ``config.ensemble`` > 1 the members train one after another from seeds
    ``seed``, ``seed + 1``, ... on the same split, and the saved model averages them.
    The run folder's checkpoint keeps each finished epoch until ``score`` has written the
    test reports; ``resume`` (from ``fer.checkpoint.read_run``) continues a run that stopped
    before (one whose members all finished is saved and written again, which is quick).
    ``started_by`` names what started a new run (a Prefect flow run), in its record and
    manifest, so that a retry of it finds the run again (``fer.checkpoint.find_started``);
    ``data_origin`` is where the data came from as the user named it (the dataset's own
    path is fer's copy under FER_DATA_DIR), recorded in the manifest.
    The test split is not touched here; ``score`` scores it afterwards.
    """
    with _fitting(dataset, config, resume=resume, started_by=started_by,
                  data_origin=data_origin) as (run, why, spec, resuming):
        return _fit_members(dataset, run, spec, why=why, resuming=resuming,
                            verbose=verbose, resume_flags=resume_flags)


@contextlib.contextmanager
def _fitting(dataset: Dataset, config: TrainConfig, *, resume: RunRecord | None,
             started_by: str | None, data_origin: str | None
             ) -> Iterator[tuple[RunRecord, str, ModelSpec, dict | None]]:
    """The run to fit (a new one, or ``resume`` checked against the data), why its
    precision, its model, and this process as a resume records it (None: a new run), held
    under the run's training lock."""
    if resume is not None and config != resume.config:
        raise ValueError(f"resuming {resume.run_dir} takes the config it recorded, not {config}")
    _check_config(config, dataset, new_run=resume is None)
    spec = get_spec(config.model)
    if resume is None:
        run, why = _new_run(config, dataset, spec, started_by=started_by, data_origin=data_origin)
        process = None
    else:
        run, why, process = _resumed_run(resume, dataset, spec)
    with training_lock(run.run_dir):
        yield run, why, spec, process


def _fit_members(dataset: Dataset, run: RunRecord, spec: ModelSpec, *, why: str,
                 resuming: dict | None, verbose: int, resume_flags: str) -> RunResult:
    """Train the run's members one after another (each continued from its checkpoint), then
    write the run's training files; a stop logs how to resume. ``resuming``: this process,
    added to the run's resumes when it first trains a member on (its checkpoint read whole)
    or, every member having finished, is about to save the run (a resume that fails before,
    on a checkpoint another Keras wrote, say, continued nothing and is not listed; one whose
    save then fails, on a full disk, is, as the manifest it writes must list it)."""
    config = run.config

    def continuing() -> None:
        nonlocal run, resuming
        if resuming is not None:
            run, resuming = record_resume(run, {"at": _now(), **resuming}), None

    averaged = _averaged(config)
    log.info("%s model %s: %s, batch size %d, %s (%s); %d training and %d validation "
             "images (validation %s); seed %d%s; run folder %s",
             "resuming" if resuming is not None else "training",
             spec.name, _count(config.epochs, "epoch"), config.batch_size, run.precision, why,
             len(dataset.train), len(dataset.validation), dataset.validation_origin, config.seed,
             f"; the saved model averages {averaged}" if averaged else "", run.run_dir)
    members: list[Member] = []
    try:
        for number in range(1, config.ensemble + 1):
            if config.ensemble > 1:
                log.info("member %d of %d (seed %d)", number, config.ensemble,
                         config.seed + number - 1)
            members.append(_fit_member(dataset, run, spec, number=number,
                                       clock=members[-1].clock if members else None,
                                       verbose=verbose, restored=continuing))
        continuing()  # every member had finished: this process saves and scores the run
        training_metrics = _write_run(members, run, spec, dataset)
    except TrainingDiverged as exc:  # a resume would go on at the same learning rate
        try:
            mark_diverged(run.run_dir, str(exc))
        except OSError as unmarked:  # a full disk (FileWriteError): the divergence is the news
            log.warning("cannot record the divergence: %s", unmarked)
        raise
    except FerError:
        raise  # a problem to fix first (an unreadable checkpoint): resuming would meet it again
    except BaseException:  # Ctrl-C, SIGTERM (Prefect raises its own TerminationSignal), any error
        log.info("training stopped; %s%s continues it from its last finished epoch",
                 resume_command(run.run_dir, resume_flags),
                 f" or a retry of {run.started_by}" if run.started_by else "")
        raise
    return RunResult(run_id=run.run_dir.name, run_dir=run.run_dir, metrics=training_metrics)


def _write_run(members: list[Member], run: RunRecord, spec: ModelSpec, dataset: Dataset) -> dict:
    """Save the trained members' model, history and curves, then metrics.json and the
    manifest (the run's training half); its training metrics."""
    config = run.config
    averaged = _averaged(config)
    saved = _save_model(members, run.run_dir, precision=run.precision, tta=config.tta)
    training_metrics = _training_metrics(members, config, dataset, precision=run.precision,
                                         spec=spec)
    # The model as saved (recalibrated, averaged, in float32) is what the champion is chosen
    # on; best_val_accuracy is the first member's at its best epoch, before all of that.
    predicted = predict_labels(saved, dataset.validation.images)
    training_metrics["saved_model_val_accuracy"] = round(
        float(np.mean(predicted == dataset.validation.labels)), 4)
    training_metrics["saved_model_val_precision"] = "float32"  # beside bf16 figures, say so
    log.info("saved model%s: validation accuracy %.4f",
             f" (the average of {averaged})" if averaged else "",
             training_metrics["saved_model_val_accuracy"])
    write_json(run.run_dir / "metrics.json", training_metrics)
    resumed = {f"member {n}": m.resumed_at for n, m in enumerate(members, start=1) if m.resumed_at}
    write_json(run.run_dir / "manifest.json", {
        "run_id": run.run_dir.name,
        "created": _now(),  # the model's time, which `latest` goes by; "started": the run's
        **({"started": run.started} if run.started else {}),
        "model": spec.name,
        "parameters": {**vars(config), "learning_rate": run.learning_rate},
        "seed": config.seed,
        "precision": run.precision,
        **({"precision_reason": run.precision_reason} if run.precision_reason else {}),
        "data": {**_data_record(dataset),
                 **({"origin": run.data_origin} if run.data_origin else {})},
        # the process that began the run (an older fer's record: this one), like its commit
        # and precision; each resume's process in "resumes"
        "versions": run.versions or package_versions(),
        "git_commit": run.git_commit,
        "machine": run.machine or machine(),
        **({"started_by": run.started_by} if run.started_by else {}),
        **({"resumed_at_epochs": resumed} if resumed else {}),
        **({"resumes": list(run.resumes)} if run.resumes else {}),
        "artifacts": list(RUN_FILES),
    })
    return training_metrics


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _process() -> dict:
    """The code and machine of this process, for the run's record and manifest."""
    return {"git_commit": git_commit(), "versions": package_versions(), "machine": machine()}


def _new_run(config: TrainConfig, dataset: Dataset, spec: ModelSpec, *,
             started_by: str | None, data_origin: str | None) -> tuple[RunRecord, str]:
    """A new run folder, with the record a resume needs; and why this precision."""
    precision, why = resolve_precision(config.precision)
    slow = slow_here(precision)  # only where asked for: auto never picks a slow one
    if slow:
        log.warning("training in %s as asked, but %s: it trains several times slower here "
                    "than in what --precision auto picks", precision, slow)
    process = _process()  # the code that trains, not whatever is checked out hours later
    recipe, pixels = spec.recipe(), pixels_sha256(dataset)  # before the folder: a Ctrl-C
    run = RunRecord(  # while hashing would leave it without a record
        run_dir=_new_run_folder(Path(config.out_dir), config.model), config=config,
        precision=precision,
        learning_rate=spec.learning_rate if config.learning_rate is None else config.learning_rate,
        data_source=_absolute(dataset.source), data_sha256=dataset.sha256,
        git_commit=process["git_commit"], started_by=started_by, precision_reason=why,
        data_origin=data_origin, recipe=recipe, pixels_sha256=pixels,
        started=_now(), versions=process["versions"], machine=process["machine"])
    try:
        start_run(run)
    except BaseException as exc:  # a full disk, Ctrl-C: a folder without its record could
        shutil.rmtree(run.run_dir, ignore_errors=True)  # be neither resumed nor published
        if isinstance(exc, OSError):
            raise FerError(f"{exc.filename or run.run_dir}: cannot write the new run's record "
                           f"({exc.strerror}); make room (or fix the cause) and train "
                           "again") from None
        raise
    return run, why


def _new_run_folder(out_dir: Path, model: str) -> Path:
    """A new, empty run folder; another id where one was taken (two runs of a model started
    in the same second, as a sweep launched at once may, share one in 65,536)."""
    for _ in range(8):
        run_dir = out_dir / new_run_id(model)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:  # a worker's --out it cannot write, say
            raise FerError(f"{run_dir}: cannot create the run folder ({exc.strerror}); "
                           "expected the run folders' parent (--out, a flow's out_dir) to be a "
                           "folder this user can write") from None
    raise FerError(f"{out_dir}: every run id tried was taken; expected the run folders' "
                   "parent (--out, a flow's out_dir) to hold run folders fer named")


def _absolute(source: str) -> str:
    """A local source as an absolute path, so a resume from another folder finds it."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def _resumed_run(run: RunRecord, dataset: Dataset, spec: ModelSpec
                 ) -> tuple[RunRecord, str, dict]:
    """The stopped run, checked against the data it is resumed on and against how this fer
    trains its model; its recorded precision; this process (``_process``)."""
    if dataset.sha256 != run.data_sha256:
        raise FerError(f"{run.run_dir}: the run trained on data with sha256 "
                       f"{run.data_sha256[:12]}..., but {dataset.source} has "
                       f"{dataset.sha256[:12]}... now; it can only resume on the data it began with")
    process = _process()
    commit = process["git_commit"]
    began = f" (commit {run.git_commit})" if run.git_commit else ""
    changed = _recipe_changes(run.recipe, spec.recipe()) if run.recipe is not None else []
    if changed:  # a CheckpointError: a Prefect retry trains the run anew
        raise CheckpointError(f"{run.run_dir}: model '{spec.name}' trains differently in this "
                              f"fer than when the run began ({'; '.join(changed)}); resume it "
                              f"with the fer that began it{began}, or train it anew")
    if run.pixels_sha256 is None:  # every fer before the fingerprint carved validation otherwise
        raise CheckpointError(f"{run.run_dir}: began in a fer that did not record the pixels "
                              "it trained on (before the end of 2026-12-05); this fer splits "
                              "validation otherwise (pixel-identical copies of training images "
                              "on one side), so the rest of the run would train on other images; "
                              f"resume it with the fer that began it{began}, or train it anew")
    if run.pixels_sha256 != pixels_sha256(dataset):
        decoders = ", ".join(_version_changes(run.versions, process["versions"], DECODERS))
        raise CheckpointError(f"{run.run_dir}: {dataset.source} decodes into other pixels "
                              "or splits them otherwise here than where the run began (the "
                              "same file; another fer's decoding or validation carving, see "
                              "CACHE_FORMAT and split_validation in fer/data.py, or another "
                              f"decoder{': ' + decoders if decoders else ''}); "
                              f"resume it with the fer that began it{began}, or train it anew")
    if commit != run.git_commit:
        log.warning("resuming %s with code at commit %s; it began at %s (the manifest records "
                    "the first)", run.run_dir.name, commit, run.git_commit)
    trainers = _version_changes(_trainers(run.versions), _trainers(process["versions"]),
                                TRAINERS)
    if trainers:  # the optimiser's defaults (Muon's) and kernels are theirs
        log.warning("resuming %s with %s: the rest of the run trains with their optimiser "
                    "defaults and kernels (the manifest records the first)",
                    run.run_dir.name, ", ".join(trainers))
    slow = slow_here(run.precision)
    if slow:  # kept: the weights and optimizer state continue in it
        log.warning("resuming %s in %s, as it began, but %s: it trains several times slower "
                    "here than float32 would", run.run_dir.name, run.precision, slow)
    return run, "as the run started", process


DECODERS = ("fer", "opencv-python-headless", "numpy")
TRAINERS = ("keras", "tensorflow")  # as _trainers names them


def _trainers(versions: dict | None) -> dict | None:
    """Keras's and TensorFlow's versions, TensorFlow's whichever package holds it
    (tensorflow-cpu on x86_64, tensorflow on arm64: pyproject's markers)."""
    return versions and {"keras": versions.get("keras"),
                         "tensorflow": versions.get("tensorflow") or versions.get("tensorflow-cpu")}


def _version_changes(began: dict | None, now: dict, names: tuple[str, ...]) -> list[str]:
    """'name then -> now' for the packages of ``names`` whose versions differ from the
    record's; none where an older record has no versions."""
    return [f"{name} {began.get(name)} -> {now.get(name)}" for name in names
            if began and began.get(name) != now.get(name)]


def _recipe_changes(began: dict, now: dict) -> list[str]:
    """'name: then -> now' for each setting of a recipe that differs (the builder's options
    by their own names)."""
    def flat(recipe: dict) -> dict:
        return {**recipe.get("build", {}), **{k: v for k, v in recipe.items() if k != "build"}}

    then, current = flat(began), flat(now)
    return [f"{name}: {then.get(name)} -> {current.get(name)}"
            for name in sorted(then.keys() | current.keys()) if then.get(name) != current.get(name)]


def _save_model(members: list[Member], run_dir: Path, *, precision: str,
                tta: bool) -> keras.Model:
    """Save the members' average (with ``tta``: over each image and its mirror too) in
    float32, which loads and runs everywhere, with their history and curves; return it."""
    # always a float32 copy: the training model itself would save its optimizer and compile
    # config (twice the file, and Keras' own load_model then needs fer's optimizer class)
    saved = averaging([with_precision(m.model, policy="float32") for m in members], flip=tta)
    with writing(run_dir / "model.keras"):
        saved.save(run_dir / "model.keras")
    _write_history([m.history for m in members], run_dir / "history.csv")
    plot_curves([m.history for m in members], run_dir / "curves.png")
    return saved


@dataclass
class Member:
    """One trained network: its weights restored to its best validation epoch."""

    seed: int
    model: keras.Model
    history: dict
    best_epoch: int
    best_val_accuracy: float
    train_seconds: float
    wall_seconds: float  # training with its validation passes and recalibration
    clock: float  # the perf_counter() value history's elapsed_seconds counts from (member 1's start)
    batch_norm_recalibration: dict | None  # fer.batchnorm.Recalibration.as_record(); None: not in the recipe
    resumed_at: list[int]  # the epochs after which training stopped and was resumed


def _fit_member(dataset: Dataset, run: RunRecord, spec: ModelSpec, *, number: int,
                clock: float | None, verbose: int, restored: Callable[[], None]) -> Member:
    """Member ``number`` (from seed ``seed + number - 1``: weights, augmentation, shuffling;
    the split is the dataset's), continued from its checkpoint where it has one;
    ``restored`` is called when it is about to train on (a finished member's is not)."""
    config, seed = run.config, run.config.seed + number - 1
    checkpoint = MemberCheckpoint(run.run_dir, number)
    progress, started = checkpoint.progress(), time.perf_counter()
    wall_before = progress.wall_seconds  # spent on this member before a stop
    with seeded(seed), dtype_policy(run.precision):
        model = spec.build()
    if progress.finished:
        checkpoint.restore_final(model)
        log.info("trained before the stop: best validation accuracy %.4f at epoch %d of %d",
                 progress.best_value, progress.best_epoch, config.epochs)
        return _member(model, progress, seed=seed, clock=started - progress.elapsed[-1])
    spec.prepare(model, dataset.train.images)
    _compile(model, spec, run, steps=math.ceil(len(dataset.train) / config.batch_size) * config.epochs)
    if progress.epochs_done:
        checkpoint.restore(model, progress)
        progress.resumed_at.append(progress.epochs_done)
        log.info("resuming after epoch %d of %d", progress.epochs_done, config.epochs)
    # the first member's clock starts with its build, as its wall_seconds does, so that the
    # time to an accuracy and the wall compare (from fit's start, it left out the build)
    timer = EpochTimer(started - progress.elapsed[-1] if progress.elapsed
                       else started if clock is None else clock,
                       train_seconds=progress.train_seconds, elapsed=progress.elapsed)
    best = KeepBestWeights(best_value=progress.best_value, best_epoch=progress.best_epoch,
                           weights=checkpoint.best_weights(progress))
    restored()  # its checkpoint read whole: it trains on from here
    saver = EpochCheckpoint(checkpoint, progress, timer=timer, best=best,
                            wall_before=wall_before, started=started)
    diverged = StopWhenDiverged(learning_rate=run.learning_rate, precision=run.precision)
    if progress.epochs_done < config.epochs:  # else it stopped after its last epoch
        model.fit(  # a resumed member reshuffles from a seed of its own, not replaying epoch 1's
            training_batches(dataset.train, batch_size=config.batch_size,
                             shuffle_seed=seed + progress.epochs_done,
                             class_weights=class_weights(dataset.train,
                                                         scheme=spec.class_weighting)),
            validation_data=training_batches(dataset.validation, batch_size=256),
            epochs=config.epochs, initial_epoch=progress.epochs_done,
            callbacks=[timer, diverged, best, saver], shuffle=False, verbose=verbose)
    best.restore(model)
    log.info("best validation accuracy %.4f at epoch %d of %d", best.best_value, best.best_epoch,
             config.epochs)
    if spec.recalibrate_batch_norm:
        progress.batch_norm_recalibration = _recalibrate(model, dataset)
    progress.wall_seconds = wall_before + time.perf_counter() - started
    checkpoint.save_final(model, progress)
    return _member(model, progress, seed=seed, clock=timer.started)


def _recalibrate(model: keras.Model, dataset: Dataset) -> dict:
    """The trained member's batch-norm statistics recomputed from un-augmented training
    images, kept where validation does not fall (fer.batchnorm); the outcome logged, and
    returned as the record the manifest keeps."""
    recalibration = recalibrate_if_better(model, dataset.train.images,
                                          validation=dataset.validation)
    before, after = recalibration.val_accuracy_before, recalibration.val_accuracy_after
    if before is None:
        log.warning("batch-norm statistics: %s", recalibration.outcome)
    else:
        log.info("batch-norm statistics recomputed from un-augmented training images: "
                 "validation accuracy %.4f -> %s, %s", before,
                 "none" if after is None else f"{after:.4f}", recalibration.outcome)
    return recalibration.as_record()


def _compile(model: keras.Model, spec: ModelSpec, run: RunRecord, *, steps: int) -> None:
    """The recipe's optimiser (its schedule spans the run's ``steps``), loss and metric."""
    model.compile(optimizer=build_optimizer(spec.optimizer, learning_rate=run.learning_rate,
                                            weight_decay=spec.weight_decay, total_steps=steps,
                                            precision=run.precision),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec.label_smoothing),
                  metrics=["accuracy"])


def _member(model: keras.Model, progress: MemberProgress, *, seed: int, clock: float) -> Member:
    return Member(seed=seed, model=model,
                  history={**progress.history, "elapsed_seconds": progress.elapsed},
                  best_epoch=progress.best_epoch, best_val_accuracy=progress.best_value,
                  train_seconds=progress.train_seconds, wall_seconds=progress.wall_seconds,
                  clock=clock, batch_norm_recalibration=progress.batch_norm_recalibration,
                  resumed_at=progress.resumed_at)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _averaged(config: TrainConfig) -> str:
    """What the saved model averages, for the log ("3 members, each with its mirror"); empty
    for a single network."""
    members = _count(config.ensemble, "member") if config.ensemble > 1 else ""
    if config.tta:
        return f"{members}, each with its mirror" if members else "each image and its mirror"
    return members


def _training_metrics(members: list[Member], config: TrainConfig, dataset: Dataset, *,
                      precision: str, spec: ModelSpec) -> dict:
    """metrics.json's training half. ``best_epoch``/``best_val_accuracy`` and
    ``batch_norm_recalibration`` are member 1's (a single run's as before); an ensemble
    lists every member's under ``ensemble``."""
    train_seconds = sum(m.train_seconds for m in members)
    metrics = {
        "epochs": config.epochs,
        "best_epoch": members[0].best_epoch,
        "best_val_accuracy": round(members[0].best_val_accuracy, 4),
        "wall_seconds": round(sum(m.wall_seconds for m in members), 1),
        "train_seconds": round(train_seconds, 1),
        "train_images_per_second": round(
            len(dataset.train) * config.epochs * len(members) / train_seconds, 1),
        "precision": precision,
        "class_weighting": spec.class_weighting,
        "test_time_augmentation": "flip" if config.tta else "none",
        "batch_norm_recalibration": members[0].batch_norm_recalibration,
    }
    if len(members) > 1:
        metrics["ensemble"] = [{"seed": m.seed, "best_epoch": m.best_epoch,
                                "best_val_accuracy": round(m.best_val_accuracy, 4),
                                "batch_norm_recalibration": m.batch_norm_recalibration}
                               for m in members]
    return metrics


def _check_config(config: TrainConfig, dataset: Dataset, *, new_run: bool) -> None:
    check_config(config, new_run=new_run)
    if dataset.train is None or dataset.validation is None:
        raise FerError(f"{dataset.source}: has no train split; it can be evaluated, not trained on")
    if not len(dataset.train) or not len(dataset.validation):  # a handful of images per class
        remedy = ("more images per class, or another validation fraction (--val-fraction, "
                  "a flow's val_fraction)"
                  if dataset.validation_origin.startswith("carved") else  # the CSV's PublicTest:
                  "validation rows that are not copies of training rows")  # its fraction unused
        raise FerError(f"{dataset.source}: {len(dataset.train)} training and "
                       f"{len(dataset.validation)} validation images (validation "
                       f"{dataset.validation_origin}); expected some of each: {remedy}")


def class_weights(split: Split, *, scheme: str) -> np.ndarray | None:
    """Per-class loss weights, normalised to a mean sample weight of 1; "sqrt" lifts rare
    classes (disgust) without drowning the rest (full inverse frequency cost 3.7 points of
    validation accuracy and lowered macro-F1 too: BENCHMARKS.md)."""
    if scheme == "none":
        return None
    counts = np.bincount(split.labels, minlength=NUM_CLASSES).astype(np.float64)
    weights = np.sqrt(counts[counts > 0].mean() / np.maximum(counts, 1))
    return (weights / np.average(weights, weights=counts)).astype(np.float32)


def _write_history(histories: list[dict], path: Path) -> None:
    """One row per epoch; an ensemble's file has a ``member`` column and a row block each."""
    keys = list(histories[0])
    member_column = ["member"] if len(histories) > 1 else []
    with writing(path), open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *member_column, *keys])
        for member, history in enumerate(histories, start=1):
            rows = zip(*(history[k] for k in keys), strict=True)
            for epoch, values in enumerate(rows, start=1):
                writer.writerow([epoch, *([member] if member_column else []),
                                 *(f"{float(v):.6g}" for v in values)])


def _data_record(dataset: Dataset) -> dict:
    return {
        "source": _absolute(dataset.source),  # `fer evaluate` run elsewhere finds it
        "sha256": dataset.sha256,
        "test_split_sha256": split_sha256(dataset.test),  # `fer evaluate` on a copy knows it
        "validation": dataset.validation_origin,
        "counts": {name: split.class_counts()
                   for name, split in (("train", dataset.train), ("validation", dataset.validation),
                                       ("test", dataset.test))},
    }


class StopWhenDiverged(keras.callbacks.Callback):
    """A training loss that became NaN or infinite ends the run at that epoch's end, in one
    error line, before the epoch is kept or checkpointed: every later epoch would train NaN
    weights for hours, and the saved model would score every image as one class."""

    def __init__(self, *, learning_rate: float, precision: str):
        super().__init__()
        self.learning_rate, self.precision = learning_rate, precision

    def on_epoch_end(self, epoch, logs=None):
        # the validation loss too: an epoch's last update can make the weights NaN after
        # its training loss was computed
        for name, which in (("loss", "training"), ("val_loss", "validation")):
            value = (logs or {}).get(name)
            if value is not None and not math.isfinite(float(value)):
                self._diverged(f"the {which} loss is {float(value)} after epoch {epoch + 1}")

    def _diverged(self, what: str) -> None:
        raise TrainingDiverged(
            f"training diverged: {what} "
            f"(learning rate {self.learning_rate:g}, precision {self.precision}); train "
            "again with a lower --learning-rate"
            + ("" if self.precision == "float32" else " or --precision float32"))


class EpochTimer(keras.callbacks.Callback):
    """Time in training steps only (validation excluded) for images/s, and the wall clock
    at each epoch's end (``elapsed_seconds`` in history.csv, for time-to-accuracy),
    counted from ``started`` (a ``time.perf_counter()`` value; default: when fit begins),
    so an ensemble's later members continue the clock of its first. A resumed member
    starts from the ``train_seconds`` and ``elapsed`` it had reached."""

    def __init__(self, started: float | None = None, *, train_seconds: float = 0.0,
                 elapsed: Sequence[float] = ()):
        super().__init__()
        self.train_seconds = train_seconds
        self.elapsed: list[float] = list(elapsed)
        self.started = started
        self._epoch_start = 0.0

    def on_train_begin(self, logs=None):
        if self.started is None:
            self.started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self.train_seconds += time.perf_counter() - self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        self.elapsed.append(round(time.perf_counter() - self.started, 2))


class KeepBestWeights(keras.callbacks.Callback):
    """Remember the weights of the epoch with the best validation accuracy (a resumed
    member starts from the best it had reached)."""

    def __init__(self, *, best_value: float = -np.inf, best_epoch: int = 0,
                 weights: list[np.ndarray] | None = None):
        super().__init__()
        self.best_value = best_value
        self.best_epoch = best_epoch
        self.weights = weights

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy")
        if value is not None and value > self.best_value:
            self.best_value, self.best_epoch = float(value), epoch + 1
            self.weights = self.model.get_weights()

    def restore(self, model: keras.Model) -> None:
        if self.weights is not None:
            model.set_weights(self.weights)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the member's progress to its checkpoint after every epoch; runs after the
    callbacks it reads (the epoch timer and the best-weights keeper)."""

    def __init__(self, checkpoint: MemberCheckpoint, progress: MemberProgress, *,
                 timer: EpochTimer, best: KeepBestWeights, wall_before: float, started: float):
        super().__init__()
        self.checkpoint, self.progress, self.timer, self.best = checkpoint, progress, timer, best
        self._wall_before, self._started = wall_before, started

    def on_epoch_end(self, epoch, logs=None):
        progress = self.progress
        for key, value in (logs or {}).items():
            progress.history.setdefault(key, []).append(float(value))
        progress.epochs_done = epoch + 1
        progress.elapsed = list(self.timer.elapsed)
        progress.train_seconds = self.timer.train_seconds
        progress.wall_seconds = self._wall_before + time.perf_counter() - self._started
        progress.best_value, progress.best_epoch = self.best.best_value, self.best.best_epoch
        self.checkpoint.save_epoch(self.model, progress, best_weights=self.best.weights)
