"""The ``retrain`` flow: check the store, fetch data, train, evaluate, publish; each task one
call into ``fer``.

Tasks hand each other paths (as ``str``) and small records, never arrays: the dataset is
decoded from fer's cache wherever it is needed. TensorFlow is imported inside the tasks, so
loading this file (``prefect deploy`` does, for the parameter schema) stays cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import re
import shutil
import typing
from collections.abc import Iterator
from pathlib import Path

import pydantic
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run as this_flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Cancelled, State
from prefect.utilities.templating import find_placeholders

from fer.config import (
    DEFAULT_SOURCE_URL,
    Settings,
    TrainConfig,
    check_store_named,
    check_writable,
    folder_named,
)
from fer.errors import CheckpointError, FerError, StorageError, expand_home
from fer.fetch import check_can_fetch, check_not_empty
from fer.options import check_config, endpoint_left_unused, parameter_name
from fer.precision import prefer_onednn
from fer.runs import REPORT, PublishResult
from flows.cancellation import CANCELLED_WHILE_PUBLISHING, CancellationWatch, CancelledOnServer

NETWORK_RETRIES = 3
NETWORK_RETRY_DELAYS = [10, 30, 90]  # seconds: rides out an S3 restart or a flaky download
# A retried flow run keeps its id, so Prefect's default cache (inputs + code + run id) would
# replay every task the first attempt finished: the data fetched then, though the source has
# changed since, and a "published" that uploaded nothing. Each task is safe to run again
# (train continues or takes its run folder, evaluate keeps a complete run's reports,
# publishing is idempotent), so none is cached.
TASK_OPTIONS = {"cache_policy": NO_CACHE}
# deploy/prefect.yaml tags every deployment's runs so, and `fer retrain` its run in its own
# process: the crash automation of `fer deploy` watches the runs that carry it.
FER_TAG = "fer"
IN_PROCESS_TAG = "in-process"
HEARTBEAT_S = 30  # `fer retrain`'s: Prefect's shortest interval
REPORT_ARTIFACT = "classification-report"
METRICS_ARTIFACT = "test-metrics"


def _retry_unless(permanent: type[Exception]):
    """A retry condition: storage errors retry when transient, other errors unless they are
    ``permanent``. Denied access, a missing bucket, a malformed dataset or a bad run folder
    will not fix themselves, and retrying them only delays the failure by minutes."""
    def worth_retrying(task, task_run, state) -> bool:
        error = state.data
        if isinstance(error, StorageError):
            return error.transient
        return not isinstance(error, permanent)

    return worth_retrying


def _retry_left() -> bool:
    """Whether Prefect has a retry left for the task running now (False outside a task run:
    nothing tries again)."""
    context = TaskRunContext.get()
    return context is not None and context.task_run.run_count <= context.task.retries


@task(retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_RETRY_DELAYS,
      retry_condition_fn=_retry_unless(FerError), **TASK_OPTIONS)  # a failed download retries
def fetch_data(data: str | None, *, data_dir: str, endpoint_url: str | None
               ) -> tuple[str, str | None]:
    """Bring the data source into the local cache; the local path of the dataset, and where
    it came from as the user named it (for the run's manifest). A source down for a moment
    is retried; the copy fetched before stands in only after the last attempt."""
    from fer.fetch import resolve_data

    source = resolve_data(data, data_dir=Path(data_dir), default_source=DEFAULT_SOURCE_URL,
                          endpoint_url=endpoint_url,
                          retry_later=_retry_left())
    return str(source.path), source.origin


class _ToRunLog(logging.Handler):
    """Hands each record to a Prefect run logger, which stores it with the run."""

    def __init__(self, run_logger: logging.LoggerAdapter) -> None:
        super().__init__()
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(record.levelno, record.getMessage(), exc_info=record.exc_info)
        except Exception:  # a log line must never fail the run; logging reports it on stderr
            self.handleError(record)


@contextlib.contextmanager
def fer_log_in_run_log() -> Iterator[None]:
    """Inside a flow: fer's log (what trains, in what precision and why, what each member
    chose; a dataset's warnings) goes to the run's log, so the run's page and `prefect
    flow-run logs` show it; Keras' epoch lines go to the worker's stdout only. fer's records
    stop propagating meanwhile, so a terminal running the flow shows them once, through the
    root logger's handler (Prefect's console; under `fer retrain`, the CLI's). INFO is let
    through unless fer's logger already lets more through (DEBUG)."""
    fer_logger = logging.getLogger("fer")
    handler = _ToRunLog(get_run_logger())
    level, propagate = fer_logger.level, fer_logger.propagate
    fer_logger.addHandler(handler)
    fer_logger.setLevel(min(fer_logger.getEffectiveLevel(), logging.INFO))
    fer_logger.propagate = False
    try:
        yield
    finally:
        fer_logger.removeHandler(handler)
        fer_logger.setLevel(level)
        fer_logger.propagate = propagate


@task(**TASK_OPTIONS)
def check_storage(*, storage: str, endpoint_url: str | None, create_bucket: bool,
                  out_dir: Path | None = None) -> None:
    """Open the store before anything else, so that a missing bucket, a wrong key or denied
    access (or run folders trained inside a folder store) fails the run in seconds rather
    than after the training. A store that cannot be reached just now is only warned about:
    publish retries it when the training is done."""
    from fer.runs import check_can_publish
    from fer.storage import open_store

    try:
        check_can_publish(open_store(storage, endpoint_url=endpoint_url,
                                     create_bucket=create_bucket), out_dir=out_dir)
    except StorageError as exc:
        if not exc.transient:
            raise
        get_run_logger().warning("%s; training anyway, publishing will try again", exc)


@task(**TASK_OPTIONS)
def train(source: str, config: TrainConfig, *, data_dir: str, started_by: str | None,
          data_origin: str | None = None, resume_flags: str = "") -> str:
    """Fit a model on the source's train split; the run folder it wrote.

    A retry of the flow run (``prefect flow-run retry``, the UI's Retry) after a crash or a
    cancellation continues the run it began from its last finished epoch, or takes that run
    as it is once trained, if its folder is on this machine and the data is unchanged;
    otherwise it trains from the start. ``started_by`` names the flow run (None where no
    server keeps it to be retried).
    """
    from fer.data import load_dataset

    carved = {}

    def split_as(config: TrainConfig):  # each split loaded once: a retry's is mostly the same
        key = (config.val_fraction, config.split_seed)
        if key not in carved:
            carved[key] = load_dataset(Path(source), val_fraction=config.val_fraction,
                                       seed=config.split_seed, cache_dir=Path(data_dir))
        return carved[key]

    dataset = split_as(config)
    from fer.train import fit  # TensorFlow loads only once the data is known to be good

    earlier = _earlier_attempt(config.out_dir, started_by)
    if earlier is not None:
        try:
            return str(_continue(earlier, dataset, split_as=split_as,
                                 resume_flags=resume_flags))
        except _TrainAgain as why:
            get_run_logger().warning("%s began %s, but %s; training from the start",
                                     started_by, earlier, why)
    return str(fit(dataset, config, verbose=2, started_by=started_by,
                   data_origin=data_origin,
                   resume_flags=resume_flags).run_dir)


def _earlier_attempt(out_dir: Path, started_by: str | None) -> Path | None:
    """The run folder an earlier attempt of this flow run began, if it is on this machine.

    A retry that finds none (the first attempt ran on another worker's machine, or its
    folder was removed) trains from the start, and says so: the user retried to save the
    training already done.
    """
    from fer.checkpoint import find_started

    if not started_by:
        return None
    earlier = find_started(out_dir, started_by=started_by)
    attempt = this_flow_run.run_count
    if earlier is None and attempt > 1:
        get_run_logger().warning(
            "attempt %d of %s, but no run folder an earlier attempt began is in %s on this "
            "machine (if one began training, it ran on another machine or its folder was "
            "removed); training from the start", attempt, started_by, out_dir)
    return earlier


class _TrainAgain(Exception):
    """An earlier attempt's run folder that this one cannot continue, and why."""


def _continue(run_dir: Path, dataset, *, split_as, resume_flags: str = "") -> Path:
    """An earlier attempt's run: taken as it is once complete, else resumed on the split it
    recorded (``split_as(config)`` carves it: an attempt begun by a fer before
    ``split_seed`` carved its validation with ``seed``)."""
    from fer.checkpoint import diverged_reason, is_complete, read_run
    from fer.train import fit

    diverged = diverged_reason(run_dir)
    if diverged is not None:  # trained anew with the same seed and rate, it would diverge
        raise FerError(f"{run_dir}: {diverged}")  # again, hours later: the flow run fails
    if is_complete(run_dir):
        recorded = json.loads((run_dir / "manifest.json").read_text())["data"]["sha256"]
        if recorded != dataset.sha256:
            raise _TrainAgain("its data has changed since")
        get_run_logger().info("%s is complete already: publishing it as it is", run_dir)
        return run_dir
    try:
        stopped = read_run(run_dir)
    except FerError as exc:
        raise _TrainAgain(f"it cannot be resumed ({exc})") from None
    if stopped.data_sha256 != dataset.sha256:
        raise _TrainAgain("its data has changed since")
    dataset = split_as(stopped.config)
    for _ in range(stopped.config.ensemble + 1):  # at most each member deleted once
        try:
            return fit(dataset, stopped.config, verbose=2, resume=stopped,
                       resume_flags=resume_flags).run_dir
        except CheckpointError as exc:  # else every retry would fail the same way
            if exc.member_folder is None:
                raise _TrainAgain(f"its checkpoint cannot be continued ({exc})") from None
            get_run_logger().warning("%s; training that member again from its start (the "
                                     "members that finished are kept)", exc.problem)
            shutil.rmtree(exc.member_folder)
    raise _TrainAgain("none of its members' checkpoints could be continued")


@task(**TASK_OPTIONS)
def evaluate(run_dir: str, source: str, *, data_dir: str, resume_flags: str = "") -> dict:
    """Score the run's model on the test split and write its reports; the metrics. A run
    an earlier attempt completed keeps its reports: scoring it again would rewrite
    metrics.json (its timing), which publishing a run already uploaded refuses."""
    from fer.checkpoint import is_complete
    from fer.data import load_dataset
    from fer.train import score

    if is_complete(Path(run_dir)):
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    dataset = load_dataset(Path(source), cache_dir=Path(data_dir), require_train=False)
    return score(Path(run_dir), dataset.test, resume_flags=resume_flags)


@task(retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_RETRY_DELAYS,
      retry_condition_fn=_retry_unless(FerError), **TASK_OPTIONS)
def publish(run_dir: str, *, storage: str, endpoint_url: str | None,
            create_bucket: bool, force_champion: bool = False) -> PublishResult:
    """Upload the run folder to the store and move its latest/champion pointers."""
    from fer.runs import publish_run
    from fer.storage import open_store

    store = open_store(storage, endpoint_url=endpoint_url, create_bucket=create_bucket)
    return publish_run(Path(run_dir), store, force_champion=force_champion)


@flow(name="retrain", log_prints=True, persist_result=True)
def retrain(
    epochs: int = TrainConfig.epochs,
    batch_size: int = TrainConfig.batch_size,
    model: str = TrainConfig.model,
    data: str | None = None,
    storage: str | None = None,
    seed: int = TrainConfig.seed,
    split_seed: int = TrainConfig.split_seed,
    val_fraction: float = TrainConfig.val_fraction,
    learning_rate: float | None = None,
    out_dir: str = str(TrainConfig.out_dir),
    precision: str = TrainConfig.precision,
    create_bucket: bool = False,
    tta: bool = TrainConfig.tta,
    ensemble: int = TrainConfig.ensemble,
    force_champion: bool = False,
    endpoint_url: str | None = None,
) -> dict:
    """Train a model on fresh data, report it, and publish it; ``storage`` None: FER_STORAGE,
    ``endpoint_url`` None: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, both where the flow runs
    (``fer retrain`` passes its --endpoint-url; ``fer train --remote`` sends none, so a
    worker uses its own).

    Returns the published run's id, location, whether it became the champion, and its
    test accuracy and macro-F1.
    """
    config = _train_config(locals())  # first: locals() are the flow's parameters alone
    config = dataclasses.replace(config, out_dir=_on_this_machine(config.out_dir))
    # a deployment's typo fails before any download; a retry resumes the run its first
    # attempt began, with that attempt's validation fraction (a fer before its range took it)
    check_config(config, spell=parameter_name, new_run=this_flow_run.run_count <= 1)
    prefer_onednn()  # before TensorFlow loads in this process (fer.train loads Keras)
    from fer.train import publish_flags
    settings = Settings.from_env().with_options(storage=storage, endpoint_url=endpoint_url)
    unused = endpoint_left_unused(endpoint_url, storage=settings.storage, data=data)
    if unused:  # a deployment's endpoint_url, not the worker's AWS_ENDPOINT_URL
        raise FerError(f"endpoint_url: {unused}")
    storage, endpoint_url = settings.storage, settings.endpoint_url
    data_dir = str(settings.data_dir)
    check_writable(config.out_dir, parameter_name("out_dir"))  # before any download, not
    check_can_fetch(data, data_dir=settings.data_dir)  # after it and the decoding

    # a run stops when cancelled on its server: a deployment's even where its worker's
    # watch gave up (the server away), and `fer retrain`'s, which no worker would stop
    # (none outside a flow run: `retrain.fn()` called as a function)
    watch = CancellationWatch(this_flow_run.id) if this_flow_run.id else None
    with fer_log_in_run_log():
        try:
            with watch or contextlib.nullcontext():
                check_storage(storage=storage, endpoint_url=endpoint_url,
                              create_bucket=create_bucket, out_dir=config.out_dir)
                source, origin = fetch_data(data, data_dir=data_dir, endpoint_url=endpoint_url)
                # a stop names the resume command that publishes where this run would have
                flags = publish_flags(storage, endpoint_url=endpoint_url,
                                      create_bucket=create_bucket, force_champion=force_champion)
                run_dir = train(source, config, data_dir=data_dir, started_by=_retryable_run(),
                                data_origin=origin, resume_flags=flags)
                metrics = evaluate(run_dir, source, data_dir=data_dir, resume_flags=flags)
                _post_report(Path(run_dir), metrics)
            # not stopped halfway through publishing: asked once before it instead
            if watch is not None and watch.is_cancelling():
                raise CancelledOnServer
        except CancelledOnServer:
            return _cancelled()
        published = publish(run_dir, storage=storage, endpoint_url=endpoint_url,
                            create_bucket=create_bucket, force_champion=force_champion)
    if watch is not None and watch.is_cancelling():  # cancelled while publishing, which
        return _cancelled(published=published)  # went on: the server takes no Completed now
    create_link_artifact(key="published-run", link=published.location,
                         link_text=f"run {published.run_id}",
                         description="Where the run's model, reports and manifest were published.")
    note = published.note(override="the force_champion parameter")
    print(f"published run {published.run_id} to {published.location}{note}")
    return {
        "run_id": published.run_id,
        "became_champion": published.became_champion,
        "is_champion": published.is_champion,
        "not_champion_because": published.not_champion_because,
        "location": published.location,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
    }


def retrain_in_this_process(**parameters: typing.Any) -> dict:
    """The retrain flow run by ``fer retrain``, tagged FER_TAG as the deployments' runs are:
    with PREFECT_API_URL set, the run is the server's, and should this process die without
    a word (killed, its machine lost) the crash automation marks it Crashed instead of it
    showing Running for ever. Its heartbeats come every HEARTBEAT_S, Prefect's shortest
    interval: a `fer deploy --crash-after` chosen for workers that send theirs that often
    (Prefect's default is 180 s) would otherwise mark this healthy run Crashed, and Prefect
    would stop its evaluation and publishing. It does not take work pool `fer`'s slot: it
    trains now, beside a deployed run, not after it."""
    with tags(FER_TAG, IN_PROCESS_TAG), temporary_settings(
            updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}):
        state = retrain(**parameters, return_state=True)
    # cancelled on its server (Ctrl-C here raises KeyboardInterrupt); Cancelling: cancelled
    # as it ended otherwise (failed, or published after the last check), an end the server
    # refuses a Cancelling run, which it takes to Cancelled alone
    if state.is_cancelled() and state.message:
        raise FerError(f"the run was {state.message}")
    if state.is_cancelled() or state.is_cancelling():
        raise FerError("the run was cancelled on its Prefect server as it ended; its log "
                       "there says how far it got (whether it published)")
    return state.result()  # a failed run's error raised


def check_parameters(parameters: dict) -> None:
    """Parameters for the retrain flow (a deployment's, with its schedule's), checked as a run
    of it will check them: names, types (as Prefect casts them), then fer's own limits. A
    FerError naming the first problem: `fer deploy` refuses a typo (``epoch: 20``,
    ``model: defualt``, ``epochs: 0``) instead of the scheduled run failing when it fires."""
    accepted = inspect.signature(retrain.fn).parameters
    unknown = sorted(set(parameters) - set(accepted), key=str)  # YAML keys: `on:` is True
    if unknown:
        raise FerError(f"unknown parameter {', '.join(map(repr, unknown))} (the retrain flow "
                       f"takes {', '.join(accepted)})")
    hints = typing.get_type_hints(retrain.fn)
    values = {}
    for name, value in parameters.items():
        if _templated(value):  # {{ $ENV }}, {{ prefect.variables.x }}: `prefect deploy`
            continue  # fills them in, and the run checks what it got
        try:
            values[name] = pydantic.TypeAdapter(hints[name]).validate_python(value)
        except pydantic.ValidationError as exc:
            raise FerError(f"{name}: {value!r}: {exc.errors()[0]['msg']}") from None
    check_config(_train_config(values), spell=parameter_name)
    if values.get("data") is not None:
        check_not_empty(values["data"])
    check_store_named(storage=values.get("storage"), endpoint_url=values.get("endpoint_url"))
    templated = set(parameters) - set(values)  # filled in when the run fires
    if values.get("storage") is not None and not templated & {"data", "endpoint_url"}:
        # (else the worker's FER_STORAGE, or a data template, decides: the run checks it)
        unused = endpoint_left_unused(values.get("endpoint_url"), storage=values["storage"],
                                      data=values.get("data"))
        if unused:
            raise FerError(f"endpoint_url: {unused}")


def _templated(value: object) -> bool:
    """Whether a parameter holds a Prefect template. YAML reads `2025-01-06` as a date, which
    Prefect's search refuses with a ValueError, at any depth: such a value holds none, and
    the type check names it."""
    try:
        return bool(find_placeholders(value))
    except ValueError:
        return False


def _train_config(arguments: dict) -> TrainConfig:
    """The TrainConfig of the retrain flow's arguments (those it has a field for; the flow's
    defaults are TrainConfig's own, so one left out is the default either way)."""
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    options = {name: value for name, value in arguments.items() if name in fields}
    if "out_dir" in options:  # a deployment's `out_dir: ""` had trained into "."
        try:
            options["out_dir"] = folder_named(options["out_dir"])
        except FerError as exc:
            raise FerError(f"{parameter_name('out_dir')} {exc}") from None
    return TrainConfig(**options)


def _cancelled(*, published: PublishResult | None = None) -> State:
    """The state a run ends in that was seen Cancelling on its server: stopped by fer's own
    check, or, ``published``, cancelled while it published."""
    if published is not None:
        message = (f"{CANCELLED_WHILE_PUBLISHING}, which went on to the end: run "
                   f"{published.run_id} is published to {published.location}"
                   f"{published.note(override='the force_champion parameter')}")
    elif this_deployment.id:
        message = ("cancelled: stopped by fer's own check of the run's state on the server, "
                   "Prefect's own stop not having come (a worker stops watching a run for "
                   "cancellation once its Prefect server was away for about 30 s); nothing "
                   "was published")
    else:
        message = ("cancelled: stopped by fer's own check of the run's state on the server "
                   "(`fer retrain` runs it in its own process, which no worker stops); "
                   "nothing was published")
    get_run_logger().warning(message)
    return Cancelled(message=message)


def _on_this_machine(out_dir: Path) -> Path:
    """``out_dir: ~/fer-runs`` in a deployment is the home folder where the run runs, the
    worker's: expanded by the flow, not by `fer deploy` (its ~user may exist on the worker
    alone)."""
    return expand_home(out_dir, what="out_dir")


def _retryable_run() -> str | None:
    """This flow run, as the run folder records it, when it can be retried: a run of a
    deployment, which a worker takes again. None for `fer retrain`'s run in its own process,
    which nothing retries (`fer train --resume` is the way there)."""
    return f"prefect flow run {this_flow_run.id}" if this_deployment.id else None


def _post_report(run_dir: Path, metrics: dict) -> None:
    """The classification report and a metrics table, posted before publishing.

    Posting first means a run whose upload fails still shows how good it was; and the server
    keeps them, so `fer train --remote --wait` can print them whatever store the worker used.
    """
    report = (run_dir / REPORT).read_text()
    create_markdown_artifact(
        key=REPORT_ARTIFACT, markdown=report_markdown(run_dir.name, report),
        description="sklearn classification report on the test split.",
    )
    rows = [{"metric": "accuracy", "value": metrics["accuracy"]},
            {"metric": "macro_f1", "value": metrics["macro_f1"]}]
    rows += [{"metric": f"recall {name}", "value": recall}
             for name, recall in metrics["per_class_recall"].items()]
    create_table_artifact(key=METRICS_ARTIFACT, table=rows,
                          description=f"Test-split metrics of run {run_dir.name}.")


def report_markdown(run_id: str, report: str) -> str:
    """The report artifact's text; ``parse_report_markdown`` reads it back."""
    return f"## Classification report: run `{run_id}`\n\n```text\n{report}```\n"


def parse_report_markdown(markdown: str) -> tuple[str, str] | None:
    """(run id, report text) from a ``report_markdown`` text; None for any other text."""
    found = _REPORT_MARKDOWN.fullmatch(markdown)
    return (found["run_id"], found["report"]) if found else None


_REPORT_MARKDOWN = re.compile(
    r"## Classification report: run `(?P<run_id>[^`]+)`\n\n```text\n(?P<report>.*)```\n",
    re.DOTALL)
