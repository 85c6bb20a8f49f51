"""The ``fer`` command line: parses options, builds the typed config, calls ``fer.*``, prints.

Problems a user can fix (``FerError``) print as one ``error:`` line and exit 1, without a
traceback. Heavy imports (TensorFlow) happen inside the commands that need them, so
``fer --help`` is instant; `train` and `retrain` check the model name against the
registry's names (fer.options) without it, before reading data.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from fer.config import (
    DEFAULT_SOURCE_URL,
    DEFAULT_STORAGE,
    MAX_BATCH_SIZE,
    VAL_FRACTION_RANGE,
    Settings,
    TrainConfig,
    check_store_named,
    check_writable,
    folder_named,
)
from fer.errors import FerError, FileWriteError, RunStillGoing, expand_home
from fer.profiles import PROFILES

app = typer.Typer(help="Facial-emotion recognition: train, evaluate, predict, publish.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

reports_app = typer.Typer(help="Runs published to object storage: list, show, get.",
                          no_args_is_help=True)
app.add_typer(reports_app, name="reports")

StorageOption = Annotated[str | None, typer.Option(
    "--storage", help="s3://bucket/prefix, file://path or a folder; default: $FER_STORAGE "
                      "or ./artifacts")]
TrainStorageOption = Annotated[str | None, typer.Option(
    "--storage", help="with --publish: s3://bucket/prefix, file://path or a folder; default: "
                      "$FER_STORAGE or ./artifacts; with --remote: default the deployment's "
                      "storage, else the worker's $FER_STORAGE or ./artifacts there")]
EndpointOption = Annotated[str | None, typer.Option(
    "--endpoint-url", help="S3 endpoint (MinIO etc.); default: $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL")]
CreateBucketOption = Annotated[bool, typer.Option(
    "--create-bucket", help="create the bucket if it does not exist")]
ForceChampionOption = Annotated[bool, typer.Option(
    "--force-champion", help="make this run the champion even if it scores lower")]
# `fer train`'s own two: with --remote, the --no- forms override a deployment that sets them.
TrainCreateBucketOption = Annotated[bool, typer.Option(
    "--create-bucket/--no-create-bucket",
    help="create the bucket if it does not exist (--no-create-bucket: with --remote, not even "
         "where the deployment sets create_bucket)")]
TrainForceChampionOption = Annotated[bool, typer.Option(
    "--force-champion/--no-force-champion",
    help="make this run the champion even if it scores lower (--no-force-champion: with "
         "--remote, not even where the deployment sets force_champion)")]


def _tensorflow_for_training() -> None:
    """TensorFlow loaded with its oneDNN kernels asked for, which it reads once, at import:
    a training command calls this before anything imports it (fer.train does)."""
    from fer.precision import prefer_onednn

    prefer_onednn()
    _load_tensorflow()


def _load_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up banners (oneDNN, absl) sent to /dev/null.

    TF_CPP_MIN_LOG_LEVEL does not silence them in TF 2.21, and they would bury the
    one-line errors this CLI promises.
    """
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _settings(*, storage: str | None = None, endpoint_url: str | None = None) -> Settings:
    """Environment first, then the command's own options on top."""
    return Settings.from_env().with_options(storage=storage, endpoint_url=endpoint_url)


def _store_settings(*, storage: str | None, endpoint_url: str | None,
                    data: str | None = None) -> Settings:
    """The settings of a command that reads or writes the store. A given --endpoint-url that
    neither an s3:// store nor an s3:// ``data`` reaches is refused: accepted, it was
    ignored, and the folder store was read or written instead of the S3 one meant."""
    from fer.options import endpoint_left_unused

    settings = _settings(storage=storage, endpoint_url=endpoint_url)
    unused = endpoint_left_unused(endpoint_url, storage=settings.storage, data=data)
    if unused:
        given = ("--storage" if storage else "the default" if settings.storage == DEFAULT_STORAGE
                 else "FER_STORAGE")
        raise typer.BadParameter(f"{unused} (the store from {given})",
                                 param_hint="--endpoint-url")
    return settings


def _store(settings: Settings, *, create_bucket: bool = False):
    from fer.storage import open_store

    return open_store(settings.storage, endpoint_url=settings.endpoint_url,
                      create_bucket=create_bucket)


def _publish(run_dir: Path, settings: Settings, *, create_bucket: bool,
             force_champion: bool) -> None:
    from fer.runs import publish_run

    result = publish_run(run_dir, _store(settings, create_bucket=create_bucket),
                         force_champion=force_champion)
    typer.echo(f"published {result.run_id} to {_printable(result.location)}"
               f"{result.champion_note}")


@contextmanager
def _download_progress():
    """A rich progress bar fed by the core's (done, total) callback: on stderr, and only on a
    terminal (in a pipe or a log file it would only leave a blank line)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    console = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("downloading", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _checked_sha256(value: str) -> str:
    """64 hex digits, as `sha256sum` prints them (a 'sha256:' prefix allowed), checked before
    any download: a malformed one would fail after it and delete the good file."""
    digest = value.strip().lower().removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise typer.BadParameter(f"{value!r}: expected 64 hexadecimal digits", param_hint="--sha256")
    return digest


@app.command("fetch-data")
def fetch_data(
    source: Annotated[str, typer.Option(help="http(s) URL, s3://bucket/key or local path")] =
        DEFAULT_SOURCE_URL,
    sha256: Annotated[str | None, typer.Option(
        help="expected sha256 of the file (of a folder: its data sha256, as printed)")] = None,
    endpoint_url: EndpointOption = None,
) -> None:
    """Download (or copy), verify, unpack and decode a dataset once; later runs reuse it."""
    from fer.fetch import fetch_data as fetch
    from fer.fetch import redacted, source_name

    if sha256 is not None:
        sha256 = _checked_sha256(sha256)
    _check_endpoint_used(endpoint_url, source=source, reaches="an s3:// --source")
    settings = _settings(endpoint_url=endpoint_url)
    check_writable(settings.data_dir, "FER_DATA_DIR")
    with _download_progress() as progress:
        fetched = fetch(source, data_dir=settings.data_dir, sha256=sha256,
                        endpoint_url=settings.endpoint_url, progress=progress)
    typer.echo(f"dataset ready: {_printable(fetched.path)}")
    if fetched.file_sha256 and fetched.file_sha256 != fetched.sha256:
        typer.echo(f"sha256 of {_printable(source_name(source) or redacted(source))}: "
                   f"{fetched.file_sha256} "
                   "(what --sha256 checks)")
        typer.echo(f"data sha256: {fetched.sha256} (of the unpacked dataset: what run "
                   "manifests record)")
    else:
        typer.echo(f"sha256: {fetched.sha256}")
    typer.echo(f"cached under {_printable(settings.data_dir)}")


def _profiles_help(option: str) -> str:
    """Each profile's value of a train option, read from fer.profiles so --help cannot go
    stale when a profile changes; profiles that leave it out train with TrainConfig's."""
    def shown(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return f"{value:g}" if isinstance(value, float) else str(value)

    setting = [p for p in PROFILES.values() if option in p.train_options]
    values = ", ".join(f"{p.name} {shown(p.train_options[option])}" for p in setting)
    fallback = getattr(TrainConfig, option)
    otherwise = ("" if len(setting) == len(PROFILES) or fallback is None
                 else f"; else {shown(fallback)}")
    return f"default: the profile's ({values}{otherwise})"


EpochsOption = Annotated[int | None, typer.Option(
    "--epochs", "-e", min=1, help=_profiles_help("epochs"))]
BatchSizeOption = Annotated[int | None, typer.Option(
    "--batch-size", "-b", min=1, max=MAX_BATCH_SIZE, help=_profiles_help("batch_size"))]
ModelOption = Annotated[str | None, typer.Option(
    help=f"registry name (see `fer models`); {_profiles_help('model')}")]
ProfileOption = Annotated[str, typer.Option(
    help=f"preset: {' | '.join(PROFILES)} (see README); explicit options win")]
DataOption = Annotated[str | None, typer.Option(
    help="file, folder, archive, URL or s3://; default: the fetched dataset")]


def _folder_path(value: str | Path) -> Path:
    """An --out as given; an empty one is refused (folder_named)."""
    try:
        return folder_named(value)
    except FerError as exc:
        raise typer.BadParameter(str(exc)) from None


OUT_HELP = "folder that receives <run-id>/"
OutOption = Annotated[Path, typer.Option(parser=_folder_path, metavar="<path>", help=OUT_HELP)]
TrainOutOption = Annotated[Path, typer.Option(  # `fer train` has --remote; `fer retrain` not
    parser=_folder_path, metavar="<path>",
    help=f"{OUT_HELP} (with --remote: a folder on the worker)")]
DEFAULT_OUT = TrainConfig.out_dir
# `fer train --remote --wait` stopped following a run that had not ended (no worker took it,
# its worker stopped polling, the API went away): not the run's failure, which exits 1.
EXIT_RUN_STILL_GOING = 3
SeedOption = Annotated[int, typer.Option(
    help="seeds the weights, augmentation and shuffling (not the split: --split-seed)")]
SplitSeedOption = Annotated[int, typer.Option(
    help="seeds the validation split carved from train; kept apart from --seed so that runs "
         "of different seeds compare on one split (the champion is chosen within a split)")]
ValFractionOption = Annotated[float, typer.Option(
    min=VAL_FRACTION_RANGE[0], max=VAL_FRACTION_RANGE[1],
    help="fraction of train carved out for validation")]
LearningRateOption = Annotated[float | None, typer.Option(
    help=f"peak learning rate (> 0); {_profiles_help('learning_rate')}, unless --model or "
         "--batch-size differs from the profile's; else the model's own")]


def _existing(*, folder: bool):
    """An option callback for a path that must exist: ``~`` expanded first, as a shell does
    not after `=` (`--model=~/m.keras`: Click's exists=True refused it as missing), then
    Click's check, in its words."""
    kind = "Directory" if folder else "File"

    def check(value: Path | None) -> Path | None:
        if value is None:
            return None
        try:
            value = expand_home(value, what="path")
        except FerError as exc:  # a ~user that is no user
            raise typer.BadParameter(str(exc)) from None
        try:
            if not value.exists():
                raise typer.BadParameter(f"{kind} '{value}' does not exist.")
        except PermissionError:  # a folder above it that this user may not enter
            raise typer.BadParameter(f"{kind} '{value}' cannot be reached: a folder above it "
                                     "is not readable by this user.") from None
        if value.is_dir() != folder:
            raise typer.BadParameter(f"{kind} '{value}' is a {'file' if folder else 'directory'}.")
        if not os.access(value, os.R_OK | (os.X_OK if folder else 0)):  # a folder: entered too
            raise typer.BadParameter(f"{kind} '{value}' is not readable.")
        return value
    return check


ModelFileOption = Annotated[Path, typer.Option(callback=_existing(folder=False),
                                               help="a model.keras")]

PrecisionOption = Annotated[str, typer.Option(
    help="auto | float32 | mixed_bfloat16 | mixed_float16")]
InferencePrecisionOption = Annotated[str, typer.Option(
    help="auto (mixed_float16 on a GPU, mixed_bfloat16 on CPUs with bf16 instructions and "
         "TensorFlow's oneDNN kernels on, else float32) | float32 | mixed_bfloat16 | "
         "mixed_float16")]
EnsembleOption = Annotated[int | None, typer.Option(
    min=1, help="train N models from seeds seed..seed+N-1 on the same split and save their "
                "average (N times the training and inference cost); "
                f"{_profiles_help('ensemble')}")]
TtaOption = Annotated[bool | None, typer.Option(
    "--tta/--no-tta", help="save a model that averages each image with its mirror (twice the "
                           f"inference cost); {_profiles_help('tta')}")]


def _profile_options(profile: str, **given) -> dict:
    """The profile's training options, overridden by whatever the user gave."""
    from fer.profiles import get_profile

    return get_profile(profile).options_with(
        **{key: value for key, value in given.items() if value is not None})


@app.command()
def train(
    ctx: typer.Context,
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = None,
    model: ModelOption = None,
    profile: ProfileOption = "default",
    data: DataOption = None,
    out: TrainOutOption = DEFAULT_OUT,
    seed: SeedOption = TrainConfig.seed,
    split_seed: SplitSeedOption = TrainConfig.split_seed,
    val_fraction: ValFractionOption = TrainConfig.val_fraction,
    learning_rate: LearningRateOption = None,
    precision: PrecisionOption = TrainConfig.precision,
    tta: TtaOption = None,
    ensemble: EnsembleOption = None,
    publish: Annotated[bool, typer.Option(help="publish the run to --storage when done")] = False,
    storage: TrainStorageOption = None,
    endpoint_url: EndpointOption = None,
    create_bucket: TrainCreateBucketOption = False,
    force_champion: TrainForceChampionOption = False,
    remote: Annotated[bool, typer.Option(
        help="run on a Prefect worker: trigger the 'retrain' deployment instead")] = False,
    wait: Annotated[bool, typer.Option(
        help="with --remote: follow the run to the end and print its report")] = False,
    resume: Annotated[Path | None, typer.Option(
        parser=_folder_path, callback=_existing(folder=True), metavar="<path>",
        help="continue the run in this folder (runs/<run-id>) from its last finished epoch, "
             "with the options and data it started with")] = None,
) -> None:
    """Train a model; writes model, curves, reports, metrics and manifest to runs/<run-id>/."""
    if wait and not remote:
        raise typer.BadParameter("only follows a run started with --remote", param_hint="--wait")
    if remote and endpoint_url is not None:  # an empty one too: it is refused either way
        raise typer.BadParameter("the worker uses its own AWS_ENDPOINT_URL; set it where the "
                                 "worker runs", param_hint="--endpoint-url")
    if remote and not publish and _given(ctx, "publish"):
        raise typer.BadParameter("a --remote run always publishes (to the worker's "
                                 "FER_STORAGE, or --storage); train here to keep it local",
                                 param_hint="--no-publish")
    if not publish and not remote:
        _check_publish_options(ctx)
        if resume is None:  # a resume's own check follows
            _check_endpoint_used(endpoint_url, source=data,
                                 reaches="an s3:// --data, or with --publish")
    if not remote:  # `--out=~/runs` keeps its ~ in the shell; a remote run's is the worker's
        out = expand_home(out, what="--out")
    if resume is not None:
        _check_resume_alone(ctx, remote=remote, publish=publish, data=data,
                            endpoint_url=endpoint_url)
    else:
        _check_data_named(data)  # before a remote run is queued to fail on the worker
        check_store_named(storage=storage, endpoint_url=endpoint_url)
        options = _profile_options(profile, epochs=epochs, batch_size=batch_size, model=model,
                                   learning_rate=learning_rate, tta=tta, ensemble=ensemble)
        config = _checked_config(options, seed=seed, split_seed=split_seed,
                                 val_fraction=val_fraction, precision=precision, out=out)
    if remote:
        _train_remotely(_remote_parameters(
            options, seed=seed, split_seed=split_seed, val_fraction=val_fraction,
            precision=precision, data=data,
            storage=storage, out=out if _given(ctx, "out") else None,
            create_bucket=create_bucket if _given(ctx, "create_bucket") else None,
            force_champion=force_champion if _given(ctx, "force_champion") else None), wait=wait)
        return
    settings = (_store_settings(storage=storage, endpoint_url=endpoint_url, data=data)
                if publish else _settings(storage=storage, endpoint_url=endpoint_url))
    from fer.checkpoint import is_complete

    only_publish = publish and resume is not None and is_complete(resume)  # a stop while
    # publishing, a flow run that crashed after scoring: publishing is what is left
    if not only_publish:  # (the resume command a failed publish names: the folder may be
        check_writable(resume or out, "--resume" if resume else "--out")  # another user's)
    if publish:
        from fer.runs import check_can_publish

        check_can_publish(_store(settings, create_bucket=create_bucket),  # before the hours
                          out_dir=Path(resume).resolve().parent if resume else out)
        if only_publish:  # the store answered: say so only now
            typer.echo(f"{resume} finished training before it stopped; publishing it", err=True)
            _publish(resume, settings, create_bucket=create_bucket,
                     force_champion=force_champion)
            return
    if resume is None or data is not None:  # a resume reads the data it recorded, or --data
        from fer.fetch import check_can_fetch

        check_can_fetch(data, data_dir=settings.data_dir)
    _tensorflow_for_training()  # before fer.train imports it (a resume has no config checked)
    # A stop logs the resume command; it must publish too, as this command would have.
    from fer.train import publish_flags

    flags = (publish_flags(settings.storage, endpoint_url=settings.endpoint_url,
                           create_bucket=create_bucket, force_champion=force_champion)
             if publish else "")
    try:
        result = (_resume_locally(resume, data=data, settings=settings, resume_flags=flags)
                  if resume is not None
                  else _train_locally(config, data=data, settings=settings, resume_flags=flags))
    except FileWriteError as exc:
        if not Path(exc.filename).resolve().is_relative_to((resume or out).resolve()):
            raise  # not the run's own file (the data folder's): nothing to resume
        # a full disk while training or scoring: the log has named the resume command
        raise FerError(f"the run stopped: {exc.filename}: {exc.strerror}; make room (or fix "
                       "the cause), then resume it as logged above") from None
    metrics = result.metrics
    typer.echo(f"run {result.run_id}: test accuracy {metrics['accuracy']:.4f}, "
               f"macro-F1 {metrics['macro_f1']:.4f}, "
               f"{metrics['train_images_per_second']:.0f} train images/s\n"
               f"files in {_printable(result.run_dir)}")
    if publish:
        try:
            _publish(result.run_dir, settings, create_bucket=create_bucket,
                     force_champion=force_champion)
        except FerError as exc:  # the store failed after the hours: the run itself is whole
            from fer.train import resume_command

            raise FerError(f"{exc}; the run is complete in {result.run_dir}: once the cause "
                           f"is fixed, {resume_command(result.run_dir, flags)} publishes it"
                           ) from None
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, a hangup: named as training's stop is
            from fer.train import resume_command

            logging.getLogger("fer").warning(
                "publishing stopped; the run is complete in %s: %s publishes it",
                _printable(result.run_dir), resume_command(result.run_dir, flags))
            raise


# What a run records when it starts, so --resume takes none of them. Its data, too, but
# --data may name a copy of it (another machine's, a moved FER_DATA_DIR): its sha256 is checked.
RECORDED_OPTIONS = ("epochs", "batch_size", "model", "profile", "out", "seed",
                    "split_seed", "val_fraction", "learning_rate", "precision", "tta",
                    "ensemble")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (by the source's name: Typer ships its own
    copy of Click)."""
    return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"


# Options that only say where and how to publish: without --publish they would do nothing.
PUBLISH_OPTIONS = ("storage", "create_bucket", "force_champion")


def _as_typed(ctx: typer.Context, names: list[str]) -> str:
    """Options as the user typed them: a switch given as False is its --no- form (a
    refused `--no-tta` had been named --tta)."""
    return ", ".join(("--no-" if ctx.params.get(name) is False else "--")
                     + name.replace("_", "-") for name in names)


def _check_publish_options(ctx: typer.Context) -> None:
    # `--no-force-champion` and `--no-create-bucket` turn off what is off here: harmless
    given = [name for name in PUBLISH_OPTIONS if _given(ctx, name) and ctx.params[name] is not False]
    if given:
        named = _as_typed(ctx, given)
        raise typer.BadParameter(f"{named} {'has' if len(given) == 1 else 'have'} no effect "
                                 "unless the run is published; add --publish",
                                 param_hint="--publish")


def _check_endpoint_used(endpoint_url: str | None, *, source: str | None, reaches: str) -> None:
    """A given --endpoint-url that nothing here reaches is refused: accepted, it was ignored,
    and the user's s3:// source or store was not the one the command read or wrote."""
    from fer.fetch import is_s3_source

    if endpoint_url is None:
        return
    _check_data_named(source)  # an empty --data is named as such, not as an unused endpoint
    if not (source is not None and is_s3_source(source)):
        raise typer.BadParameter(f"the endpoint is used only to read {reaches}; this command "
                                 "reaches no S3 store", param_hint="--endpoint-url")


def _check_resume_alone(ctx: typer.Context, *, remote: bool, publish: bool, data: str | None,
                        endpoint_url: str | None) -> None:
    given = [name for name in RECORDED_OPTIONS if _given(ctx, name)]
    if remote:
        given.append("remote")
    if given:
        named = _as_typed(ctx, given)
        raise typer.BadParameter(f"takes the options and data the run recorded; leave out "
                                 f"{named}", param_hint="--resume")
    _check_data_named(data)
    if not publish:  # it reaches S3 for an s3:// copy of the data or for --publish
        _check_endpoint_used(endpoint_url, source=data,
                             reaches="an s3:// --data copy of the run's data, or with --publish")


# Training options a profile may leave unset, as `fer train` here would train them: sent
# with every remote run (a learning rate of null: the model's own), so that a deployment's
# YAML values for them (`ensemble: 3`) do not change what the command asked for.
REMOTE_TRAINING_DEFAULTS = {"tta": TrainConfig.tta, "ensemble": TrainConfig.ensemble,
                            "learning_rate": None}


def _remote_parameters(options: dict, *, out: Path | None, **given) -> dict:
    """The retrain deployment's parameters for what the user asked: every training option
    (the profile's, the given values, and REMOTE_TRAINING_DEFAULTS), so that the run trains
    what `fer train` would here; other options left unset (None) are left out, so the
    deployment's own values apply (its data, storage, out_dir, create_bucket and
    force_champion; ``out`` None: --out not given)."""
    parameters = {**given, "out_dir": str(out) if out is not None else None}
    return {**REMOTE_TRAINING_DEFAULTS, **options,
            **{key: value for key, value in parameters.items() if value is not None}}


def _check_data_named(data: str | None) -> None:
    """An empty --data (`--data "$DATA"`, the variable unset) is refused; None: the default."""
    if data is not None:
        from fer.fetch import check_not_empty

        check_not_empty(data)


def _import_flows(module: str):
    """flows/ needs Prefect, which only the orchestration extra installs."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FerError(f"{module} needs Prefect ({exc}); install it with "
                       "`pip install -e '.[orchestration]'` in the checkout") from None


def _checked_config(options: dict, *, seed: int, split_seed: int, val_fraction: float,
                    precision: str, out: Path) -> TrainConfig:
    """The run's TrainConfig, checked before any download or server round trip (a misspelt
    model or precision fails here)."""
    from fer.precision import check_precision

    check_precision(precision)
    config = TrainConfig(**options, seed=seed, split_seed=split_seed, val_fraction=val_fraction,
                         precision=precision, out_dir=out)
    _check_training(config)
    return config


def _check_training(config: TrainConfig, *, new_run: bool = True) -> None:
    """fer.options' checks, which load no TensorFlow: a --remote run trains nothing here
    (a local one loads it, oneDNN asked for first, before fer.train). A resumed run keeps
    the validation fraction it began with (``new_run`` False)."""
    from fer.options import check_config

    check_config(config, new_run=new_run)


def _train_remotely(parameters: dict, *, wait: bool) -> None:
    """Start the run and name it at once; with ``wait``, follow it. Ctrl-C (or SIGTERM)
    stops the following only: the run goes on, and the message says how to cancel it
    (or, once the run was seen ending and its report is being read, how it ended).
    One while the run is being created (Prefect's client retries a struggling server for
    tens of seconds) says the run may exist, as a lost answer does."""
    remote = _import_flows("flows.remote")
    try:
        started = remote.trigger_retrain(parameters)
    except KeyboardInterrupt:
        typer.echo(f"stopped while starting the run; {remote.CREATED_OR_NOT}", err=True)
        raise
    typer.echo(f"flow run {started.flow_run_id} ({started.name}): {started.state}\n{started.url}")
    if not wait:
        return
    ended: list[str] = []

    def show(state) -> None:
        typer.echo(f"state: {state.name}")
        if state.is_final():
            ended.append(state.name)

    try:
        run = remote.follow_run(started.flow_run_id, on_state=show)
    except KeyboardInterrupt:
        typer.echo(f"stopped reading flow run {started.flow_run_id}'s report; the run ended "
                   f"{ended[-1]} (see {started.url})" if ended else
                   f"stopped following flow run {started.flow_run_id}; it goes on (cancel it "
                   f"with `prefect flow-run cancel {started.flow_run_id}`)", err=True)
        raise
    report = run.report
    if report is None:
        raise FerError(f"flow run {run.name} completed but posted no classification report; "
                       f"see {run.url}")
    typer.echo(f"\npublished run {report.run_id}: test accuracy "
               f"{_fmt(report.metrics.get('accuracy'))}, macro-F1 "
               f"{_fmt(report.metrics.get('macro_f1'))}\n\n{report.text.rstrip()}")


@app.command()
def retrain(
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = None,
    model: ModelOption = None,
    profile: ProfileOption = "default",
    data: DataOption = None,
    out: OutOption = DEFAULT_OUT,
    seed: SeedOption = TrainConfig.seed,
    split_seed: SplitSeedOption = TrainConfig.split_seed,
    val_fraction: ValFractionOption = TrainConfig.val_fraction,
    learning_rate: LearningRateOption = None,
    precision: PrecisionOption = TrainConfig.precision,
    tta: TtaOption = None,
    ensemble: EnsembleOption = None,
    storage: StorageOption = None,
    endpoint_url: EndpointOption = None,
    create_bucket: CreateBucketOption = False,
    force_champion: ForceChampionOption = False,
) -> None:
    """Run the Prefect retrain flow in this process: check the store, fetch, train, evaluate,
    publish."""
    # The temporary server Prefect starts here would send its usage analytics, and log an
    # error where the machine is offline; PREFECT_SERVER_ANALYTICS_ENABLED=true set in the
    # environment turns them on (this default overrides a Prefect profile's setting).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _check_data_named(data)  # before a server starts, or the one named is asked
    _store_settings(storage=storage, endpoint_url=endpoint_url, data=data)  # its checks
    options = _profile_options(profile, epochs=epochs, batch_size=batch_size, model=model,
                               learning_rate=learning_rate, tta=tta, ensemble=ensemble)
    out = expand_home(out, what="--out")  # the flow runs here: the home folder is this one
    _checked_config(options, seed=seed, split_seed=split_seed, val_fraction=val_fraction,
                    precision=precision, out=out)
    from fer.fetch import check_can_fetch

    check_can_fetch(data, data_dir=Settings.from_env().data_dir)
    check_writable(out, "--out")
    remote = _import_flows("flows.remote")  # a typo above costs no server round trip
    if remote.PREFECT_API_URL.value():  # that server runs the flow: it must answer first
        remote.require_api()
        server = contextlib.nullcontext()
    else:  # in a session of its own: Ctrl-C reaches fer, which records the stop through it
        server = _import_flows("flows.local_server").temporary_server()
    flows_retrain = _import_flows("flows.retrain")
    from fer.runs import champion_note

    with server:
        result = flows_retrain.retrain_in_this_process(
            **options, data=data, storage=storage, seed=seed, split_seed=split_seed,
            val_fraction=val_fraction, out_dir=str(out), precision=precision,
            endpoint_url=endpoint_url, create_bucket=create_bucket,
            force_champion=force_champion)
    typer.echo(f"run {result['run_id']}: test accuracy {result['accuracy']:.4f}, macro-F1 "
               f"{result['macro_f1']:.4f}; published to {_printable(result['location'])}"
               + champion_note(became=result["became_champion"], now=result["is_champion"],
                               because=result.get("not_champion_because")))


@app.command()
def deploy(
    project_dir: Annotated[Path, typer.Option(
        parser=_folder_path, callback=_existing(folder=True), metavar="<path>",
        help="checkout holding deploy/prefect.yaml")
    ] = Path("."),
    name: Annotated[list[str] | None, typer.Option(
        "--name", help="only these deployments (repeatable); default: all")] = None,
    crash_after: Annotated[int | None, typer.Option(  # 60: flows.deploy.MIN_CRASH_AFTER_S
        min=60, help="seconds without a heartbeat after which a fer flow run is marked "
                     "Crashed (its worker died), freeing the pool; at least 60; default: keep "
                     "the current setting, 600 for a new automation")] = None,
) -> None:
    """Register the Prefect deployments in deploy/prefect.yaml (work pool `fer`), and the
    automation that marks a run whose worker died Crashed."""
    flows_deploy = _import_flows("flows.deploy")
    for registered in flows_deploy.deploy_all(project_dir.resolve(), names=name or None,
                                              crash_after_s=crash_after):
        typer.echo(f"deployed {registered}")


def _train_locally(config: TrainConfig, *, data: str | None, settings: Settings,
                   resume_flags: str = ""):
    from fer.data import load_dataset

    source = _resolved_data(data, settings)
    dataset = load_dataset(source.path, val_fraction=config.val_fraction,
                           seed=config.split_seed, cache_dir=settings.data_dir)
    from fer.train import train as train_run

    return train_run(dataset, config, verbose=_keras_verbosity(), resume_flags=resume_flags,
                     data_origin=source.origin)


def _resolved_data(data: str | None, settings: Settings):
    """``--data`` as a local dataset (fer.fetch.resolve_data), a download's progress shown."""
    from fer.fetch import resolve_data

    with _download_progress() as progress:
        return resolve_data(data, data_dir=settings.data_dir, default_source=DEFAULT_SOURCE_URL,
                            endpoint_url=settings.endpoint_url, progress=progress)


def _resume_locally(run_dir: Path, *, data: str | None, settings: Settings,
                    resume_flags: str = ""):
    """The stopped run's training, on the data source it recorded or on ``data``, a copy of
    it (fer.train refuses one whose sha256 differs)."""
    from fer.checkpoint import read_run

    run = read_run(run_dir)
    _check_training(run.config, new_run=False)
    if data is not None:
        source = _resolved_data(data, settings).path
        # a later stop's resume command reads the same copy (fetched: fer's, not the URL)
        resume_flags = f"{resume_flags} --data {shlex.quote(str(source.resolve()))}".strip()
    elif Path(run.data_source).exists():
        source = Path(run.data_source)
    else:
        origin = (f", such as {run.data_origin}"  # a URL or key; not the same path again
                  if run.data_origin and run.data_origin != run.data_source else "")
        raise FerError(f"{run.run_dir}: the data it trained on, {run.data_source}, is gone; "
                       f"pass a copy of it (data sha256 {run.data_sha256[:12]}...{origin}) "
                       "with --data")
    from fer.data import load_dataset
    from fer.train import train as train_run

    dataset = load_dataset(source, val_fraction=run.config.val_fraction,
                           seed=run.config.split_seed, cache_dir=settings.data_dir)
    return train_run(dataset, run.config, verbose=_keras_verbosity(), resume=run,
                     resume_flags=resume_flags)


def _keras_verbosity() -> int:
    """A progress bar on a terminal; one line per epoch in logs."""
    return 1 if sys.stdout.isatty() else 2


@app.command()
def evaluate(
    model: ModelFileOption,
    data: Annotated[str | None, typer.Option(
        help="source whose test split is scored; default: the fetched dataset")] = None,
    out: Annotated[Path | None, typer.Option(
        parser=_folder_path, metavar="<path>",
        help="report folder; default: evaluation/ beside the model")] = None,
    precision: InferencePrecisionOption = "auto",
    endpoint_url: EndpointOption = None,
) -> None:
    """Score a saved model on a source's test split and write the report files."""
    from fer.data import load_dataset
    from fer.precision import check_precision, choose_precision

    check_precision(precision)  # before any download
    _check_data_named(data)  # before the model loads
    _check_endpoint_used(endpoint_url, source=data, reaches="an s3:// --data")
    settings = _settings(endpoint_url=endpoint_url)
    from fer.fetch import check_can_fetch

    check_can_fetch(data, data_dir=settings.data_dir)
    out = check_writable(expand_home(out, what="--out") if out else model.parent / "evaluation",
                    "--out")
    if (out / "manifest.json").exists():  # its reports and metrics are the run's record
        raise FerError(f"--out {out}: is a run folder, whose reports `fer publish` uploads "
                       "as they are; pass another folder (default: evaluation/ beside the "
                       "model)")
    _load_tensorflow()
    from fer.evaluate import (
        check_fer_classes,
        evaluate_split,
        in_float32_where_it_overflows,
        seen_in_training,
    )
    from fer.models import class_names_of, load_model

    precision = choose_precision(precision)
    loaded = load_model(model, precision=precision)  # a wrong --model fails before any download
    check_fer_classes(class_names_of(loaded))
    source = _resolved_data(data, settings)
    dataset = load_dataset(source.path, cache_dir=settings.data_dir, require_train=False)
    overlap = seen_in_training(model.parent, dataset, data_dir=settings.data_dir)

    def scored_in(policy: str) -> dict:  # float32 where float16 (a GPU's auto) overflows
        return evaluate_split(
            loaded if policy == precision else load_model(model, precision=policy),
            dataset.test, out_dir=out, extra_metrics={
                "model": str(model.resolve()),  # what was scored on what: a later evaluation
                "data": {"source": str(source.path.resolve()), "origin": source.origin,
                         "sha256": dataset.sha256},  # replaces it
                "inference_precision": policy,
                "test_images_seen_in_training": overlap})  # null: could not be told

    metrics = in_float32_where_it_overflows(scored_in, precision, what="the test split")
    typer.echo(f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
               f"on {metrics['test_samples']} images\nreports in {_printable(out)}")


@app.command()
def predict(
    # path_type=str: the names as given, which the output repeats (a Path prints ./a.png
    # as a.png, and a script matching records to its inputs finds none)
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, path_type=str,
                                                 help="image files, any size or colour")],
    model: ModelFileOption,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
    faces: Annotated[bool, typer.Option(help="detect faces first, classify each")] = False,
    batch_size: Annotated[int, typer.Option(
        min=1, max=MAX_BATCH_SIZE, help="images scored at once (memory against speed)")] = 64,
    precision: InferencePrecisionOption = "auto",
) -> None:
    """Print the top emotion and the probabilities of each image (or each face)."""
    from fer.precision import check_precision, choose_precision

    check_precision(precision)  # before TensorFlow loads
    _load_tensorflow()
    from fer.evaluate import in_float32_where_it_overflows
    from fer.models import load_model
    from fer.predict import predict_inputs, read_model_inputs

    images = _once_each(images)
    inputs = read_model_inputs(images, faces=faces)  # every bad file named before the model loads
    predictions = in_float32_where_it_overflows(
        lambda policy: predict_inputs(load_model(model, precision=policy), inputs,
                                      batch_size=batch_size),
        choose_precision(precision), what="the images", reported=False)
    by_file: dict[str, list] = {str(path): [] for path in images}  # in the order given
    for p in predictions:
        by_file[p.file].append(p)
    if as_json:  # every file given, in order; one without a face has emotion null
        records = [record for file, found in by_file.items() for record in (
            [vars(p) for p in found] if found else
            [{"file": file, "emotion": None, "probabilities": None, "box": None}])]
        # a name's bytes that are not UTF-8 escaped as in the text lines: json.dumps wrote a
        # lone surrogate (\udce9), which jq turns into U+FFFD and strict parsers refuse
        typer.echo(json.dumps([{**record, "file": _printable(record["file"])}
                               for record in records], indent=2))
        for file in (file for file, found in by_file.items() if not found):
            typer.echo(f"{_printable(file)}: no face found", err=True)
        return
    for file, found in by_file.items():
        for p in found:
            where = f" face at x={p.box[0]} y={p.box[1]} w={p.box[2]} h={p.box[3]}" if p.box else ""
            ranked = sorted(p.probabilities.items(), key=lambda kv: kv[1], reverse=True)
            typer.echo(f"{_printable(p.file)}{where}: {p.emotion} ("
                       + ", ".join(f"{name} {prob:.2f}" for name, prob in ranked) + ")")
        if not found:
            typer.echo(f"{_printable(file)}: no face found")


def _once_each(paths: list[str]) -> list[str]:
    """Each file once, as first given: `a.png`, `./a.png`, `$PWD/a.png` and a link to it
    are one file (only identical spellings had been merged)."""
    first: dict[Path, str] = {}
    for path in paths:
        first.setdefault(Path(path).resolve(), path)
    return list(first.values())


def _printable(name: str | Path) -> str:
    """A file name as a UTF-8 terminal can take it: bytes that are not UTF-8 (a Latin-1
    `café.png`, held as surrogates) as \\x escapes, where printing them raised."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@app.command()
def publish(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                            help="a run folder made by `fer train`")],
    storage: StorageOption = None,
    endpoint_url: EndpointOption = None,
    create_bucket: CreateBucketOption = False,
    force_champion: ForceChampionOption = False,
) -> None:
    """Publish a run folder (made here or elsewhere) to object storage; safe to repeat."""
    _publish(run_dir, _store_settings(storage=storage, endpoint_url=endpoint_url),
             create_bucket=create_bucket, force_champion=force_champion)


@reports_app.command("list")
def reports_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON for machines")] = False,
    storage: StorageOption = None,
    endpoint_url: EndpointOption = None,
) -> None:
    """Published runs, newest first: test accuracy, macro-F1, and the validation accuracy the
    champion is chosen on."""
    from fer.runs import list_runs

    store = _store(_store_settings(storage=storage, endpoint_url=endpoint_url))
    runs = list_runs(store)
    if as_json:
        typer.echo(json.dumps([vars(r) for r in runs], indent=2, default=str))
        return
    if not runs:  # where it looked: a mistyped --storage folder is empty too
        typer.echo(f"no published runs in {_printable(store.location)}")
        return
    id_width = max(len("run id"), *(len(r.run_id) for r in runs))
    model_width = max(len("model"), *(len(str(r.model)) for r in runs))
    typer.echo(f"{'run id':{id_width}s} {'created':25s} {'model':{model_width}s} {'epochs':>6s} "
               f"{'accuracy':>8s} {'macro-F1':>8s} {'val acc':>8s}  markers")
    for r in runs:
        markers = " ".join(m for m, on in (("champion", r.is_champion), ("latest", r.is_latest)) if on)
        typer.echo(f"{r.run_id:{id_width}s} {str(r.created):25s} {str(r.model):{model_width}s} "
                   f"{str(r.epochs):>6s} "
                   f"{_fmt(r.accuracy):>8s} {_fmt(r.macro_f1):>8s} {_fmt(r.val_accuracy):>8s}"
                   f"  {markers}")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


@reports_app.command("show")
def reports_show(
    ref: Annotated[str, typer.Argument(help="run id, 'latest' or 'champion'")] = "latest",
    as_json: Annotated[bool, typer.Option("--json", help="JSON for machines")] = False,
    storage: StorageOption = None,
    endpoint_url: EndpointOption = None,
) -> None:
    """Print a published run's classification report and metrics."""
    from fer.runs import read_report

    report = read_report(_store(_store_settings(storage=storage, endpoint_url=endpoint_url)), ref)
    if as_json:
        typer.echo(json.dumps({"run_id": report.run_id, "report": report.text,
                               "metrics": report.metrics}, indent=2))
        return
    m = report.metrics
    typer.echo(f"run {report.run_id}: test accuracy {_fmt(m.get('accuracy'))}, "
               f"macro-F1 {_fmt(m.get('macro_f1'))}, epochs {m.get('epochs', '-')}\n")
    typer.echo(report.text.rstrip())


@reports_app.command("get")
def reports_get(
    ref: Annotated[str, typer.Argument(help="run id, 'latest' or 'champion'")],
    dest: Annotated[Path, typer.Option(parser=_folder_path, metavar="<path>",
                                       help="folder that receives <run-id>/")] = Path("."),
    storage: StorageOption = None,
    endpoint_url: EndpointOption = None,
) -> None:
    """Download every artifact of a published run, verifying each sha256."""
    from fer.runs import download_run

    folder = download_run(_store(_store_settings(storage=storage, endpoint_url=endpoint_url)), ref,
                          dest=expand_home(dest, what="--dest"))
    typer.echo(f"downloaded to {_printable(folder)} (sha256 verified)")


@app.command("models")
def list_models() -> None:
    """List the model registry."""
    _load_tensorflow()
    from fer.models import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for spec in REGISTRY.values():
        typer.echo(f"{spec.name:{width}s} {spec.description}")


class _LogLines(logging.Formatter):
    """fer's progress lines bare, as a person reads them; a Prefect run's lines led by the
    run's name, as Prefect prints them; a warning or worse from any library led by its level
    ("warning: ...", "error: ..."), with its traceback if it has one, unless the exception
    is a FerError."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if getattr(record, "task_run_name", None):
            message = f"Task run '{record.task_run_name}' - {message}"
        elif getattr(record, "flow_run_name", None):
            message = f"Flow run '{record.flow_run_name}' - {message}"
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        if record.exc_info and not isinstance(record.exc_info[1], (FerError, FileWriteError)):
            # a FerError is bad input, a FileWriteError a full disk, each said in its message:
            # Prefect's log of a failed task or flow run keeps no traceback of it (README: bad
            # data never prints one)
            message += "\n" + self.formatException(record.exc_info)
        return message


# The loggers of a Prefect flow run and its task runs: the run's states, and fer's progress
# lines, which the retrain flow forwards into its run's log (flows/retrain.py).
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _shown_on_console(record: logging.LogRecord) -> bool:
    """fer's own INFO lines pass, and a Prefect run's (`fer retrain`); other libraries' only
    from warnings up (a library that sets its logger to INFO would otherwise fill the
    terminal, Prefect's server among them)."""
    return (record.levelno >= logging.WARNING or record.name == "fer"
            or record.name.startswith("fer.") or record.name in PREFECT_RUN_LOGGERS)


def _configure_logging() -> None:
    """To stderr, keeping stdout for results: fer's progress, a Prefect run's lines, and
    everyone's warnings. Prefect, imported later, then leaves the root logger to this
    handler and its own loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogLines())
    handler.addFilter(_shown_on_console)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("fer").setLevel(logging.INFO)


def _stop_on_sigterm() -> list[int]:
    """SIGTERM (`kill`, `timeout`, systemd, `docker stop`) and a hangup (a closed terminal or
    ssh session) stop a command as Ctrl-C does, instead of ending Python on the spot: a
    training then logs how to resume it. A hangup that `nohup` ignores stays ignored. The
    list gets the signal's number once it came."""
    received: list[int] = []

    def stop(signum, frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, stop)
    return received


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 1; SIGTERM
    exits 143 (128 + 15) and a hangup 129, as a process killed by them does."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # level 2 still prints oneDNN banners
    _configure_logging()
    terminated = _stop_on_sigterm()
    try:
        app()
    except FerError as exc:  # a file name in it may hold bytes that are not UTF-8
        typer.echo(f"error: {_printable(str(exc))}", err=True)
        sys.exit(EXIT_RUN_STILL_GOING if isinstance(exc, RunStillGoing) else 1)
    except FileWriteError as exc:  # a full disk under `fer evaluate --out`, say
        typer.echo(f"error: cannot write {exc.filename}: {exc.strerror}", err=True)
        sys.exit(1)
    except PermissionError as exc:  # a path under a folder this user may not enter
        where = f"{_printable(str(exc.filename))}: " if exc.filename else ""
        why = (" (this user may not read it, or enter a folder above it)"
               if exc.errno == errno.EACCES and exc.filename else "")
        typer.echo(f"error: {where}{exc.strerror}{why}", err=True)
        sys.exit(1)
    except SystemExit:
        if terminated:  # Typer exits 130 (Ctrl-C's) for the interrupt the signal raised
            sys.exit(128 + terminated[0])
        raise
