"""flows.retrain and flows.remote: the retrain flow in-process, and as deployment runs on a worker.

Every training here is one epoch on 20 images per class, run one at a time. Deployment runs
go through a real Prefect server, a real process worker started with the Docker image's
command, and a real S3 server (SeaweedFS).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import http.server
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest
import s3server
from conftest import subset_of_shared_archive
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Pending, Running, State
from prefect_server import PrefectServer, start_worker
from run_folders import epochs_done, make_run
from s3server import BUCKET, free_port
from test_cli import FER, run_fer
from test_fetch import serving

import flows.local_server as local_server
import flows.remote as remote_module
import flows.retrain as retrain_module
from fer.checkpoint import read_run
from fer.config import TrainConfig
from fer.data import Dataset, load_dataset
from fer.errors import DataError, FerError, RunStillGoing
from fer.fetch import current_source
from fer.runs import PublishResult, list_runs, read_report
from fer.storage import LocalStore, open_store
from flows.deploy import (
    DEFAULT_CRASH_AFTER_S,
    MIN_CRASH_AFTER_S,
    WATCH_EVENT,
    WATCH_RESEND_S,
    deploy_all,
    ensure_crash_detection,
    ensure_work_pool,
)
from flows.remote import follow_run, trigger_retrain
from flows.retrain import (
    METRICS_ARTIFACT,
    REPORT_ARTIFACT,
    check_parameters,
    fetch_data,
    parse_report_markdown,
    publish,
    report_markdown,
    retrain,
)

# One Prefect server for the session: prefect_api, deployed, start_fer_worker, tiny_fer_zip ...
pytest_plugins = ["prefect_server"]
# ... and the S3 server fixtures (assigned, not imported, so test arguments may shadow them).
s3_server = s3server.s3_server
s3_env = s3server.s3_env
integration = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
TINY = {"epochs": 1, "batch_size": 32, "model": "default"}


def task_runs(flow_run_id) -> dict:
    """The flow run's task runs by task name (check_storage, fetch_data, train, evaluate,
    publish)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run for run in runs}


def artifacts(flow_run_id) -> dict:
    """The flow run's keyed artifacts (the ones the flow posts), by key."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found if artifact.key}


def run_log(flow_run_id, *, containing: str, timeout: float = 30.0) -> list[str]:
    """The flow run's log messages as the server stores them, once one ``containing`` the
    text has arrived (the run's process sends its log in batches, shortly after the state)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            found = [entry.message for entry in client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(str(flow_run_id))])))]
        if any(containing in message for message in found) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def flow_run(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(str(flow_run_id)))


def left_pending():
    """A fer run of the deployment left Pending, as a worker that took it and died leaves
    it (Pending from the start: a worker polling the pool takes Scheduled runs only)."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/retrain")
        return client.create_flow_run_from_deployment(deployment.id, tags=["fer"],
                                                      state=Pending())


def run_events(name: str, flow_run_id) -> list:
    """The events ``name`` of the run that the server has stored (at most 50). The filter
    is made anew each call: its window ends when it is made."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(event=EventNameFilter(name=[name]),
                         resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]))
    with get_client(sync_client=True) as client:
        return client.read_events(filter=wanted, limit=50).events  # the server takes <= 50


def stored_events(name: str, flow_run_id, *, within_s: float = 30) -> list:
    """run_events, waiting up to ``within_s`` for the first: the server stores events in
    the background."""
    deadline = time.monotonic() + within_s
    while not (events := run_events(name, flow_run_id)) and time.monotonic() < deadline:
        time.sleep(1)
    return events


def assert_marked_crashed(flow_run_id, *, still: str, since: float) -> None:
    """The run, left in state ``still`` at ``since`` (time.monotonic), is marked Crashed by
    the automation at MIN_CRASH_AFTER_S (a margin of 90 s for the server's timers)."""
    while (state := flow_run(flow_run_id).state).name == still:
        assert time.monotonic() - since < MIN_CRASH_AFTER_S + 90, "never marked Crashed"
        time.sleep(1)
    assert state.name == "Crashed" and f"no heartbeat for {MIN_CRASH_AFTER_S} s" in state.message


# --- task bodies ------------------------------------------------------------------------------


def test_templated_parameters_are_left_to_the_run_and_odd_keys_named():
    """`prefect deploy` fills in {{ $ENV }} and {{ prefect.variables.x }} after fer deploy
    reads the YAML: such a value is the run's to check, not refused as a model name. A
    YAML 1.1 key such as `on:` (read as True) is named, not a TypeError traceback."""
    check_parameters({"model": "{{ $FER_MODEL }}", "epochs": "{{ prefect.variables.epochs }}",
                      "out_dir": "{{ $FER_RUNS }}", "batch_size": 64})
    with pytest.raises(FerError, match=r"unknown parameter True, 'epoch' \(the retrain flow "):
        check_parameters({"epoch": 20, True: 1})


def test_an_out_dir_with_a_tilde_is_the_home_folder_where_the_flow_runs(monkeypatch, tmp_path):
    """`out_dir: ~/fer-runs` in a deployment trains into the worker's home, not into a
    folder named ~ under its working folder."""
    from flows.retrain import _on_this_machine

    monkeypatch.setenv("HOME", str(tmp_path))
    assert _on_this_machine(Path("~/fer-runs")) == tmp_path / "fer-runs"
    # `fer deploy` checks the parameters without expanding: that ~user is the worker's
    check_parameters({"out_dir": "~fer-no-such-user-4f2a/runs"})


def test_an_empty_data_parameter_is_refused_by_fer_deploy():
    """`data: ""` read the worker's working folder as the dataset when the run fired; an
    empty `storage:` or `endpoint_url:` fails the run when it fires."""
    with pytest.raises(FerError, match=r"data source '' is empty"):
        check_parameters({"data": ""})
    with pytest.raises(FerError, match=r"^out_dir: ' ' is empty: expected a folder path"):
        check_parameters({"out_dir": " "})  # had trained into the worker's working folder
    with pytest.raises(FerError, match=r"storage '' is empty"):
        check_parameters({"storage": ""})
    with pytest.raises(FerError, match=r"endpoint URL ' ' is empty"):
        check_parameters({"endpoint_url": " "})


def test_an_endpoint_parameter_beside_a_folder_store_is_refused(tmp_path, monkeypatch):
    """`endpoint_url:` with `storage:` a folder and no s3:// data reaches nothing: refused by
    `fer deploy` and by the run before any download, as `fer retrain --endpoint-url` is (the
    run had published to the folder). With an s3:// data, or storage left to the worker's
    FER_STORAGE, `fer deploy` leaves it to the run."""
    from flows.retrain import retrain

    problem = r"^endpoint_url: the store, .*, is a folder; the endpoint is used only for an s3://"
    with pytest.raises(FerError, match=problem):
        check_parameters({"storage": "./artifacts", "endpoint_url": "http://minio:9000"})
    check_parameters({"storage": "./artifacts", "endpoint_url": "http://minio:9000",
                      "data": "s3://datasets/fer2013.zip"})
    check_parameters({"endpoint_url": "http://minio:9000"})
    check_parameters({"storage": "./artifacts", "endpoint_url": "http://minio:9000",
                      "data": "{{ $FER_DATA }}"})  # an s3:// key, perhaps, when the run fires
    monkeypatch.setenv("FER_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(FerError, match=problem):
        retrain.fn(endpoint_url="http://127.0.0.1:9", out_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_an_out_dir_the_run_cannot_write_is_refused_before_any_download(tmp_path, monkeypatch):
    """`fer train --remote --out experiments` on a worker that may not write there failed
    when the run folder was made, after the download, decoding and hashing of the data."""
    from flows.retrain import retrain

    (tmp_path / "taken").write_text("")
    monkeypatch.setenv("FER_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(FerError, match=r"^out_dir: .*taken/runs: .*taken is a file, not a folder"):
        retrain.fn(out_dir=str(tmp_path / "taken" / "runs"), data="https://127.0.0.1:9/f.zip")
    with pytest.raises(FerError, match=r"^out_dir: '' is empty: expected a folder path"):
        retrain.fn(out_dir="", data="https://127.0.0.1:9/f.zip")  # not the working folder
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path / "taken" / "data"))
    with pytest.raises(FerError, match=r"^FER_DATA_DIR .*taken/data: .*taken is a file"):
        retrain.fn(out_dir=str(tmp_path / "runs"), data="https://127.0.0.1:9/f.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_parameter_yaml_reads_as_a_date_is_named_not_a_traceback():
    """YAML reads an unquoted `data: 2025-01-06` as a date, which Prefect's placeholder
    search raised ValueError on (a traceback from `fer deploy`); it is a type error named."""
    import datetime

    with pytest.raises(FerError, match=r"^data: datetime\.date\(2025, 1, 6\): Input should be "
                                       r"a valid string"):
        check_parameters({"data": datetime.date(2025, 1, 6)})
    with pytest.raises(FerError, match=r"^data: \[datetime\.date\(2025, 1, 6\)\]: Input "
                                       r"should be a valid string"):
        check_parameters({"data": [datetime.date(2025, 1, 6)]})  # inside a list too


def test_fetch_data_passes_a_local_source_through(tiny_fer_zip, data_dir):
    """The local path is read in place; the origin the run records is that path in full."""
    assert fetch_data.fn(str(tiny_fer_zip), data_dir=str(data_dir), endpoint_url=None) == (
        str(tiny_fer_zip), str(tiny_fer_zip.resolve()))


@integration
def test_fetch_data_names_a_missing_remote_source(s3_env, data_dir):
    with pytest.raises(FerError, match=r"missing\.zip: no such object at "):
        fetch_data.fn(f"s3://{BUCKET}/missing.zip", data_dir=str(data_dir),
                      endpoint_url=s3_env.endpoint_url)


class _DownFor(http.server.SimpleHTTPRequestHandler):
    """Serves a folder (answering If-Modified-Since), but HTTP 503 to the next ``down``
    requests: a download server restarting."""

    down = 0

    def do_GET(self):  # noqa: N802 (the http.server API)
        if _DownFor.down:
            _DownFor.down -= 1
            self.send_error(503)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@flow
def _fetch_only(url: str, data_dir: str) -> str:
    return fetch_data.with_options(retry_delay_seconds=0)(url, data_dir=data_dir,
                                                           endpoint_url=None)[0]


def test_a_source_down_for_a_moment_is_retried_before_the_copy_from_before_is_used(
        prefect_api, tiny_fer_zip, tmp_path, caplog):
    """A retrain on a URL (`fer retrain --data URL`, a deployment's `data` parameter) whose
    download server answers 503 once fetches the file as it is now on its retry (it trained
    on the copy fetched before at once, and the retries never ran); a server down through
    every attempt still falls back to the copy, on the last."""
    site, data_dir = tmp_path / "site", str(tmp_path / "fer-data")
    site.mkdir()
    served = site / "fer2013.zip"
    served.write_bytes(tiny_fer_zip.read_bytes())
    with serving(functools.partial(_DownFor, directory=str(site))) as base:
        url = f"{base}/{served.name}"
        last_week = _fetch_only(url, data_dir)
        with zipfile.ZipFile(tiny_fer_zip) as old, zipfile.ZipFile(served, "w") as new:
            for entry in old.infolist()[:-1]:  # one image fewer: another dataset
                new.writestr(entry, old.read(entry))
        os.utime(served, (time.time() + 60, time.time() + 60))
        _DownFor.down = 1
        state = _fetch_only(url, data_dir, return_state=True)
        this_week = state.result()
        assert this_week != last_week
        assert task_runs(state.state_details.flow_run_id)["fetch_data"].run_count == 2
        _DownFor.down = 1 + 3
        with caplog.at_level("WARNING", logger="fer"):
            state = _fetch_only(url, data_dir, return_state=True)
    assert state.result() == this_week
    assert task_runs(state.state_details.flow_run_id)["fetch_data"].run_count == 1 + 3
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("fer")]
    assert len(warned) == 1 and "HTTP 503" in warned[0]
    assert "using the copy fetched before" in warned[0]


def test_publish_uploads_the_run_and_moves_the_pointers(tmp_path):
    run_dir = make_run(tmp_path / "runs", "r1", accuracy=0.5)
    result = publish.fn(str(run_dir), storage=str(tmp_path / "store"), endpoint_url=None,
                        create_bucket=False)
    assert result == PublishResult("r1", True, str(tmp_path / "store" / "runs" / "r1"),
                                  is_champion=True)
    assert read_report(LocalStore(tmp_path / "store"), "latest").text == (
        run_dir / "classification_report.txt").read_text()


def test_publish_can_force_the_champion(tmp_path):
    """The publish task's force_champion (`fer retrain --force-champion`, a deployment run's
    parameter): a lower-scoring run still becomes the champion.

    r2 scores lower and is not; r3 scores lower still and is, because it is forced.
    """
    store = str(tmp_path / "store")
    for run_id, accuracy, force in (("r1", 0.6, False), ("r2", 0.5, False), ("r3", 0.4, True)):
        run_dir = make_run(tmp_path / "runs", run_id, accuracy=accuracy)
        result = publish.fn(str(run_dir), storage=store, endpoint_url=None, create_bucket=False,
                            force_champion=force)
        assert result.became_champion == (run_id != "r2")
    assert read_report(LocalStore(tmp_path / "store"), "champion").run_id == "r3"


def test_evaluate_keeps_the_reports_of_a_run_completed_before(tmp_path):
    """A retried flow run whose earlier attempt completed the run: scoring it again would
    rewrite metrics.json, which publishing a run already uploaded refuses. (The source does
    not exist: it is never read.)"""
    run_dir = make_run(tmp_path, "20250101-000000-default-0001", accuracy=0.61)
    before = (run_dir / "metrics.json").read_bytes()
    metrics = retrain_module.evaluate.fn(str(run_dir), str(tmp_path / "gone.zip"),
                                         data_dir=str(tmp_path / "data"))
    assert metrics["accuracy"] == 0.61
    assert (run_dir / "metrics.json").read_bytes() == before


@integration
def test_a_retry_takes_its_completed_run_only_on_the_same_data(prefect_api, tmp_path):
    """The train task's check on an earlier attempt's complete run: taken as it is on the
    data it recorded, trained again (with the reason logged) on data changed since."""
    run_dir = make_run(tmp_path, "20250101-000000-default-0001", accuracy=0.61,
                       data_sha256="a" * 64)
    (run_dir / "manifest.json").write_text(json.dumps(
        {**json.loads((run_dir / "manifest.json").read_text()), "data": {"sha256": "a" * 64}}))

    @flow
    def attempt(sha256: str) -> str:
        try:
            return str(retrain_module._continue(run_dir, Dataset(
                source="x", sha256=sha256, test=None), split_as=None))
        except retrain_module._TrainAgain as why:
            return f"again: {why}"

    assert attempt("a" * 64) == str(run_dir)
    assert attempt("b" * 64) == "again: its data has changed since"


def test_a_retry_of_a_diverged_run_fails_at_once(tmp_path):
    """An earlier attempt whose training diverged: a retry would train anew with the same
    seed and learning rate (no retry can change them) and diverge again, hours later; it
    fails with the divergence's line instead, which says to lower the learning rate."""
    from fer.checkpoint import mark_diverged

    run_dir = make_run(tmp_path, "20250101-000000-default-0001", accuracy=0.61)
    (run_dir / "checkpoint").mkdir()
    mark_diverged(run_dir, "training diverged: the training loss is nan after epoch 2 "
                           "(learning rate 0.1, precision float32); train again with a lower "
                           "--learning-rate")
    with pytest.raises(FerError, match=r"0001: training diverged: .* train again with a lower "
                                       r"--learning-rate$") as raised:
        retrain_module._continue(run_dir, None, split_as=None)
    assert not isinstance(raised.value, retrain_module._TrainAgain)


@integration
def test_a_retry_resumes_on_the_split_its_run_recorded(prefect_api, tmp_path, tiny_dataset,
                                                       monkeypatch):
    """A retry's parameters carve the split with the flow's split_seed; the run an earlier
    attempt began (here by a fer before split_seed, which carved with seed 3) resumes on
    the split it recorded, not on the retry's: another split had failed the pixel check
    and thrown the finished epochs away."""
    from test_checkpoint import EpochSpy, stopped_run

    from fer.checkpoint import FOLDER, RUN_RECORD

    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, seed=3, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    record = json.loads((run_dir / FOLDER / RUN_RECORD).read_text())
    del record["config"]["split_seed"]
    (run_dir / FOLDER / RUN_RECORD).write_text(json.dumps(record))
    asked = []

    def split_as(recorded: TrainConfig):
        asked.append(recorded.split_seed)
        return tiny_dataset

    @flow
    def attempt() -> str:
        return str(retrain_module._continue(run_dir, tiny_dataset, split_as=split_as))

    assert attempt() == str(run_dir)
    assert asked == [3]
    assert json.loads((run_dir / "manifest.json").read_text())["resumed_at_epochs"] == {
        "member 1": [1]}


@integration
def test_a_retry_trains_again_only_the_member_whose_checkpoint_is_damaged(
        prefect_api, tmp_path, tiny_dataset, monkeypatch):
    """A member checkpoint this fer cannot continue (damaged mid-write, or written for a
    model an upgrade changed) had failed the task, and every retry the same way; then made
    the retry train the whole run again, the ensemble's finished members included (an hour
    each in `best`). Now that member is trained again, the finished ones are kept, and the
    run completes in its own folder; the log says why."""
    from test_checkpoint import EpochSpy, state, stopped_run

    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path, precision="float32",
                         ensemble=2)
    run_dir = stopped_run(tmp_path, tiny_dataset, config,
                          EpochSpy(monkeypatch, stop_at=2, stop_member=2))
    weights = run_dir / "checkpoint" / "member-2" / state(run_dir, member=2)["weights_file"]
    weights.write_bytes(weights.read_bytes()[:100])
    spy = EpochSpy(monkeypatch)

    @flow
    def attempt() -> str:
        return str(retrain_module._continue(run_dir, tiny_dataset,
                                            split_as=lambda config: tiny_dataset))

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    try:
        assert attempt() == str(run_dir)
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
    assert state(run_dir, member=1)["finished"] and state(run_dir, member=2)["finished"]
    # member 2 trained again from its start; member 1 read back, not trained (no epochs)
    assert [b["epoch"] for b in spy.begun] == [1, 2, 3]
    (warning,) = [r.getMessage() for r in records if "training that member again" in
                  r.getMessage()]
    assert "member-2" in warning and "unreadable checkpoint" in warning
    assert "delete" not in warning  # the retry deletes it; the user has nothing to do


@integration
def test_a_retry_that_finds_no_earlier_run_folder_says_so(prefect_api, tmp_path):
    """A retried flow run whose first attempt's folder is not on this machine (another
    worker ran it, or it was removed) trains from the start, and its log says why: the user
    retried to keep the training done. A first attempt says nothing."""
    attempts = []

    @flow(retries=1)
    def retried() -> str:
        from prefect.runtime import flow_run

        attempts.append(retrain_module._earlier_attempt(tmp_path, "prefect flow run x"))
        if len(attempts) == 1:
            raise RuntimeError("the first attempt dies")
        return str(flow_run.id)

    flow_run_id = retried()

    assert attempts == [None, None]
    found = run_log(flow_run_id, containing="attempt 2")
    said = [message for message in found if "no run folder an earlier attempt began" in message]
    assert len(said) == 1 and said[0].startswith("attempt 2 of prefect flow run x")
    assert str(tmp_path) in said[0]


def test_report_markdown_reads_back_what_was_posted():
    """`fer train --remote --wait` prints the report it reads back from the posted artifact."""
    text = "              precision    recall  f1-score   support\n\n       angry       0.55\n"
    assert parse_report_markdown(report_markdown("20261130-1-default-ab12", text)) == (
        "20261130-1-default-ab12", text)
    assert parse_report_markdown("## something else\n") is None


def test_following_a_retried_run_reads_its_latest_report():
    """A retried flow run has posted a report per attempt under one key: the newest is the
    run's (the server lists them by random id, so either had been printed)."""
    import datetime as dt
    from types import SimpleNamespace

    def artifact(key, data, minute):
        return SimpleNamespace(key=key, data=data, created=dt.datetime(2026, 1, 1, 0, minute,
                                                                       tzinfo=dt.UTC))

    attempts = [artifact(REPORT_ARTIFACT, report_markdown(run_id, f"report of {run_id}\n"),
                         minute)
                for run_id, minute in (("20260101-2-default-bbbb", 2),
                                       ("20260101-1-default-aaaa", 1))]
    attempts += [artifact(METRICS_ARTIFACT, json.dumps([{"metric": "accuracy", "value": v}]),
                          minute) for v, minute in ((0.62, 2), (0.61, 1))]
    for listed in (attempts, attempts[::-1]):
        client = SimpleNamespace(read_artifacts=lambda artifact_filter, listed=listed: listed)
        posted = remote_module._posted_report(client, SimpleNamespace(id=uuid.uuid4()))
        assert (posted.run_id, posted.metrics) == ("20260101-2-default-bbbb", {"accuracy": 0.62})


# --- the flow, in-process ---------------------------------------------------------------------


@integration
def test_fer_retrain_runs_in_process_without_a_server(tiny_fer_zip, tmp_path):
    """`fer retrain` with no PREFECT_API_URL: Prefect runs a temporary local server; the
    terminal shows the run's lines and fer's progress, once each, and no telemetry error."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PREFECT_") and key != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), FER_DATA_DIR=str(tmp_path / "data"),
               FER_STORAGE=str(tmp_path / "artifacts"), TF_CPP_MIN_LOG_LEVEL="3",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    done = subprocess.run([*FER, "retrain", "--epochs", str(TINY["epochs"]), "--batch-size",
                           str(TINY["batch_size"]), "--model", TINY["model"], "--data",
                           str(tiny_fer_zip), "--out", str(tmp_path / "runs"),
                           "--split-seed", "5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, accuracy = re.search(r"^run (\S+): test accuracy (0\.\d{4}), macro-F1 0\.\d{4}; "
                                 r"published to ", done.stdout, re.MULTILINE).groups()
    store = LocalStore(tmp_path / "artifacts")
    assert [run.run_id for run in list_runs(store)] == [run_id]
    report = read_report(store, "latest")
    assert report.run_id == run_id and f"{report.metrics['accuracy']:.4f}" == accuracy
    assert (tmp_path / "runs" / run_id / "model.keras").is_file()
    manifest = json.loads((tmp_path / "runs" / run_id / "manifest.json").read_text())
    assert manifest["machine"]["onednn"] is True  # the flow asked before its tasks loaded TF
    assert "seed 5," in manifest["data"]["validation"]  # --split-seed reached the flow's split
    assert "started_by" not in manifest  # the temporary server forgets the run: no retrying it
    # fer's progress lines reach the flow run's log, which the terminal shows, once
    assert re.search(r"^Flow run '[\w-]+' - training model default: 1 epoch, batch size 32, ",
                     done.stderr, re.MULTILINE), done.stderr[-3000:]
    assert done.stderr.count("training model default: 1 epoch, batch size 32, ") == 1
    assert re.search(r"^Flow run '[\w-]+' - Finished in state Completed", done.stderr,
                     re.MULTILINE), done.stderr[-3000:]
    # Prefect's analytics are off: on an offline machine (as CI's) sending them logs an error
    assert "telemetry" not in done.stderr
    # the flow's result is kept (`--wait` reads it where it can), not each task's as well
    # (Prefect keeps no result of a task without a cache policy, NO_CACHE)
    assert len(list((tmp_path / "prefect" / "storage").iterdir())) == 1


@integration
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_fer_retrain_stopped_mid_training_leaves_no_server(tiny_fer_zip, tmp_path, stop):
    """Ctrl-C in the terminal (SIGINT to the whole process group) while `fer retrain` trains:
    its temporary server, in a session of its own, lives until the stop is recorded, so fer
    exits 130 at once with the resume command. (Prefect's own temporary server died with the
    Ctrl-C, and fer retried it for minutes, then printed a traceback.) Killed outright, fer
    cannot stop the server itself: Linux stops it when fer dies."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), FER_DATA_DIR=str(tmp_path / "data"),
               FER_STORAGE=str(tmp_path / "artifacts"), TF_CPP_MIN_LOG_LEVEL="3")
    runs = tmp_path / "runs"
    # In a process group of its own, as a shell runs a job, with Ctrl-C's default action
    with (tmp_path / "stderr").open("w") as log:
        retrain = subprocess.Popen(
            [*FER, "retrain", "--epochs", "300", "--batch-size", "32", "--data",
             str(tiny_fer_zip), "--out", str(runs)], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 240
            while not (runs.is_dir() and epochs_done(runs) >= 2):
                assert retrain.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            (server,) = [pid for pid in _children(retrain.pid) if b"server" in _cmdline(pid)]
            if stop == signal.SIGINT:
                os.killpg(retrain.pid, signal.SIGINT)
            else:
                retrain.kill()  # fer alone: nothing of its own cleanup runs
            retrain.wait(timeout=60)
        finally:
            if retrain.poll() is None:
                os.killpg(retrain.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _cmdline(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _cmdline(server), "the temporary Prefect server outlived fer retrain"
    if stop == signal.SIGINT:
        stderr = (tmp_path / "stderr").read_text()
        assert retrain.returncode == 130, stderr[-3000:]
        (run_dir,) = runs.iterdir()
        # the resume command publishes where `fer retrain` would have
        store = tmp_path / "artifacts"
        assert (f"training stopped; `fer train --resume {run_dir} --publish --storage {store}` "
                "continues it") in stderr
        assert "Traceback" not in stderr and "Error logging to API" not in stderr


@integration
def test_the_temporary_server_takes_another_port_when_its_first_is_taken(tmp_path,
                                                                          monkeypatch):
    """Another program may take the free port before the server binds it: the server that
    exits then is started again on a new port, and serves."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        second = free_port()
        ports = iter([taken.getsockname()[1], second])
        monkeypatch.setattr(local_server, "_free_port", lambda: next(ports))
        with local_server.temporary_server() as url:
            assert url == f"http://127.0.0.1:{second}/api"
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=10)  # stopped with the block


def test_following_tells_an_ended_run_from_one_whose_outcome_is_unknown():
    """The API failing while a run is followed: its outcome is unknown (exit 3), unless the
    run was seen ending already, when only its report could not be read (exit 1)."""
    lost = httpx.ConnectError("connection refused")
    with pytest.raises(RunStillGoing, match=r"the run goes on without us"):
        with remote_module._api_answers("run-id"):
            raise lost
    with pytest.raises(FerError, match=r"run-id ended Completed, but its report could not be "
                                       r"read") as raised:
        with remote_module._api_answers("run-id", ended="Completed"):
            raise lost
    assert not isinstance(raised.value, RunStillGoing)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> bytes:
    """A live process's command line; empty once it has gone (a zombie has none either)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@integration
def test_training_error_fails_the_flow_with_fers_message(prefect_api, tiny_fer_zip, data_dir,
                                                         tmp_path, monkeypatch):
    """A FerError raised while training (as a diverged run raises one) fails the train task
    once, not retried, and the flow with fer's message; nothing is evaluated or published.
    (Its epochs=0 had been refused by the parameter check before any task ran.)"""
    import fer.train

    calls = []

    def fails_to_train(*args, **kwargs):
        calls.append(1)
        raise FerError("training diverged: the loss is NaN after epoch 1")

    monkeypatch.setattr(fer.train, "fit", fails_to_train)
    state = retrain(epochs=1, data=str(tiny_fer_zip), storage=str(tmp_path / "store"),
                    out_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed()
    assert "training diverged: the loss is NaN after epoch 1" in state.message
    assert len(calls) == 1
    ran = task_runs(state.state_details.flow_run_id)
    assert "train" in ran and not {"evaluate", "publish"} & set(ran)


@integration
def test_a_run_cancelled_while_it_publishes_ends_cancelled_naming_what_it_published(
        prefect_api, tiny_fer_zip, data_dir, tmp_path, monkeypatch):
    """A cancel that comes while the run publishes (which is not stopped halfway) leaves the
    run Cancelled, with a message naming the run it published all the same: the server takes
    no Completed from a Cancelling run, and the run had been left to Prefect's timeout."""
    from prefect.runtime import flow_run as this_flow_run
    from prefect.states import Cancelling

    import fer.runs

    publish_run = fer.runs.publish_run

    def cancelled_meanwhile(*args, **kwargs):
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(this_flow_run.id, Cancelling(), force=True)
        return publish_run(*args, **kwargs)

    monkeypatch.setattr(fer.runs, "publish_run", cancelled_meanwhile)
    state = retrain(**TINY, data=str(tiny_fer_zip), storage=str(tmp_path / "store"),
                    out_dir=str(tmp_path / "runs"), return_state=True)
    (published,) = list_runs(LocalStore(tmp_path / "store"))
    assert state.is_cancelled(), state
    assert state.message == ("cancelled while publishing, which went on to the end: run "
                             f"{published.run_id} is published to "
                             f"{LocalStore(tmp_path / 'store').url('runs/' + published.run_id)}"
                             " (new champion)")
    ended = flow_run(state.state_details.flow_run_id)
    assert ended.state.name == "Cancelled"
    # following it (`fer train --remote --wait`) offers no retry: it published already
    with pytest.raises(FerError, match=r"ended Cancelled: cancelled while publishing") as raised:
        with get_client(sync_client=True) as client:
            remote_module._finish(client, ended)
    assert "retry" not in str(raised.value)


@integration
def test_fer_retrain_cancelled_as_its_run_failed_is_one_error_line(
        prefect_api, tiny_fer_zip, data_dir, tmp_path, monkeypatch):
    """A cancel that comes as the run fails otherwise (here publishing fails): the server
    takes no Failed from a Cancelling run, which stays Cancelling, and `fer retrain` had
    ended in Prefect's UnfinishedRun traceback; it is one FerError line now."""
    from prefect.runtime import flow_run as this_flow_run
    from prefect.states import Cancelling

    import fer.runs

    def cancelled_and_failed(*args, **kwargs):
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(this_flow_run.id, Cancelling(), force=True)
        raise FerError("cannot write the store: No space left on device")

    monkeypatch.setattr(fer.runs, "publish_run", cancelled_and_failed)
    with pytest.raises(FerError, match=r"^the run was cancelled on its Prefect server as it "
                                       r"ended; its log there says how far it got"):
        retrain_module.retrain_in_this_process(
            **TINY, data=str(tiny_fer_zip), storage=str(tmp_path / "store"),
            out_dir=str(tmp_path / "runs"))


@integration
def test_bad_parameters_fail_the_flow_before_any_data_is_fetched(prefect_api, data_dir,
                                                                 tmp_path):
    """A typo in a deployment's parameters (an unknown model) fails the run at once, before
    the store is opened or the dataset fetched and decoded."""
    state = retrain(model="defualt", data=str(tmp_path / "data.zip"),
                    storage=str(tmp_path / "store"), out_dir=str(tmp_path / "runs"),
                    return_state=True)
    assert state.is_failed() and "unknown model 'defualt'" in state.message
    assert task_runs(state.state_details.flow_run_id) == {}


@integration
def test_bad_dataset_is_not_retried(prefect_api, s3_env, data_dir, tmp_path):
    """A download that is not a dataset fails at once: retrying cannot fix the data."""
    s3_env.client().put_object(Bucket=BUCKET, Key="junk.zip", Body=b"not a zip archive")
    state = retrain(data=f"s3://{BUCKET}/junk.zip", storage=str(tmp_path / "store"),
                    out_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match=r"junk\.zip: the server sent text that is not a "
                                        r"FER2013 CSV"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["fetch_data"].run_count == 1 and runs["fetch_data"].state.is_failed()
    assert "train" not in runs  # failed in the download, not later in the training


def test_a_data_parameter_naming_no_users_home_is_not_retried(prefect_api, data_dir, tmp_path):
    """`data: ~nosuchuser/fer.zip` is fer's one-line error at once, not after 10 + 30 + 90
    seconds of retries: only a transient storage error (or an unforeseen one) is retried."""
    state = retrain(data="~fer-no-such-user-4f2a/fer.zip", storage=str(tmp_path / "store"),
                    out_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed() and "cannot expand its ~" in state.message
    assert task_runs(state.state_details.flow_run_id)["fetch_data"].run_count == 1


def test_network_tasks_retry_three_times_after_10_30_and_90_seconds():
    """README's promise for fetch_data and publish (the test above runs publish's retries
    with no delay)."""
    for network_task in (fetch_data, publish):
        assert network_task.retries == 3
        assert network_task.retry_delay_seconds == [10, 30, 90]


@integration
def test_publish_failure_is_retried_then_fails_the_flow(prefect_api, s3_env, tiny_fer_zip,
                                                         data_dir, tmp_path, monkeypatch):
    """A dead S3 endpoint: publish is retried (not the training), then the flow fails clearly.
    The endpoint is the flow's parameter (as `fer retrain --endpoint-url` passes it), which
    wins over the live one in AWS_ENDPOINT_URL."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(retrain_module, "publish", publish.with_options(retry_delay_seconds=0))
    state = retrain(**TINY, data=str(tiny_fer_zip), storage=f"s3://{BUCKET}/dead",
                    endpoint_url=dead, out_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed()
    assert f"cannot reach S3 endpoint {dead}" in state.message
    flow_run_id = state.state_details.flow_run_id
    runs = task_runs(flow_run_id)
    # The endpoint was already dead when the run began: a warning, not a failure, since a
    # store that is down for a moment may be back when the training is done.
    assert runs["check_storage"].state.is_completed()
    assert any(f"cannot reach S3 endpoint {dead}" in line and "training anyway" in line
               for line in run_log(flow_run_id, containing="training anyway"))
    assert runs["publish"].run_count == 1 + 3  # README: retried 3 times
    assert runs["train"].run_count == 1
    # The report is posted before publishing, so a run that failed to upload still shows it.
    assert set(artifacts(flow_run_id)) == {"classification-report", "test-metrics"}


@integration
@pytest.mark.parametrize(("secret", "bucket", "message"), [
    ("wrong", BUCKET, "denied access"),
    (None, "no-such-bucket", "bucket 'no-such-bucket' does not exist"),
])
def test_a_store_that_will_not_work_fails_the_run_before_training(
        prefect_api, s3_env, tiny_fer_zip, data_dir, tmp_path, monkeypatch, secret, bucket,
        message):
    """A wrong secret key or a missing bucket fails the run in its first task, once: no
    download, no training to throw away, no retries that would only wait 130 s."""
    if secret:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"{secret}-{uuid.uuid4().hex}")
    state = retrain(**TINY, data=str(tiny_fer_zip), storage=f"s3://{bucket}/early",
                    out_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed() and message in state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["check_storage"].run_count == 1
    assert {"fetch_data", "train", "publish"}.isdisjoint(runs)
    assert not (tmp_path / "runs").exists()


@integration
def test_a_store_folder_that_cannot_be_written_fails_the_run_before_training(
        prefect_api, tiny_fer_zip, data_dir, tmp_path):
    """A folder store fer cannot write (here its parent is a file; a read-only mount, a
    full disk) fails the first task: opening a folder checks nothing, so the run had
    trained for hours and failed at publishing."""
    (tmp_path / "taken").write_text("a file, not a folder")
    state = retrain(**TINY, data=str(tiny_fer_zip), storage=str(tmp_path / "taken" / "store"),
                    out_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed() and "cannot write" in state.message
    assert {"fetch_data", "train", "publish"}.isdisjoint(task_runs(
        state.state_details.flow_run_id))
    assert not (tmp_path / "runs").exists()


def test_run_folders_inside_a_folder_stores_runs_fail_the_run_before_training(
        prefect_api, tiny_fer_zip, data_dir, tmp_path):
    """out_dir set to the folder store's runs/: its run folder would be read as a published
    run there, and publishing failed after the training."""
    state = retrain(**TINY, data=str(tiny_fer_zip), storage=str(tmp_path / "store"),
                    out_dir=str(tmp_path / "store" / "runs"), return_state=True)
    assert state.is_failed() and "keeps its published runs" in state.message
    assert {"fetch_data", "train", "publish"}.isdisjoint(task_runs(
        state.state_details.flow_run_id))
    assert not (tmp_path / "store" / "runs").exists()


# --- deployment runs on a worker --------------------------------------------------------------


@pytest.fixture(scope="module")
def storage_url() -> str:
    return f"s3://{BUCKET}/flows-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(deployed, start_fer_worker, s3_server, storage_url, tmp_path_factory):
    """One worker for pool `fer`, started with the image's command, publishing to S3."""
    home = tmp_path_factory.mktemp("worker")
    env = {**s3_server.env(storage=storage_url), "FER_DATA_DIR": str(home / "data"),
           "AWS_CONFIG_FILE": str(home / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}  # Prefect's shortest
    process = start_fer_worker(log_path=home / "worker.log", env=env)
    process.wait_for_log(r"Worker '.*' started!", timeout=90)
    yield process
    process.stop()


def follow(run, **options):
    return follow_run(run.flow_run_id, poll_seconds=1, pickup_timeout_s=90, **options)


CANCEL_EVENTS_REPLAYED_S = 62  # Prefect replays a minute of events to a new subscriber


def wait_for_the_workers_crash_report(worker, *, since: int) -> None:
    """Wait, after a flow run of ``worker`` ended Crashed, until the worker has reported the
    crash itself. Prefect 3.9 proposes Crashed twice: its executor first, then the worker,
    seconds later (loading the flow for its crash hooks); the worker's late proposal lands on
    a run retried meanwhile, which then ends Crashed without running (seen in CI). A user
    retries after reading the error, long after; a test retries at once. The worker logs a
    line as `prefect.flow_runs.worker` after its proposal, whether it was taken or not."""
    worker.wait_for_log(r"prefect\.flow_runs\.worker - ", since=since, timeout=60)


@integration
def test_triggered_retrain_runs_on_a_worker_and_publishes_to_s3(worker, s3_env, s3_server,
                                                                storage_url, tiny_fer_zip,
                                                                tmp_path):
    """A run of the on-demand deployment on the worker: trained, reported on the server,
    published to S3; the worker's S3 secret key appears nowhere it wrote (its log, the
    run's log, the run folder, the published objects), as README promises."""
    seen = []
    run = trigger_retrain({**TINY, "data": str(tiny_fer_zip), "out_dir": str(tmp_path)},
                          wait=True, poll_seconds=1, pickup_timeout_s=90,
                          on_state=lambda state: seen.append(state.name))
    assert run.state == "Completed" and seen[-1] == "Completed" and "Running" in seen
    assert run.url.endswith(f"/runs/flow-run/{run.flow_run_id}")
    store = open_store(storage_url, endpoint_url=s3_env.endpoint_url)
    assert run.result["run_id"] in [summary.run_id for summary in list_runs(store)]
    report = read_report(store, "latest")
    assert report.run_id == run.result["run_id"] and "macro avg" in report.text
    assert run.result["location"] == f"{storage_url}/runs/{run.result['run_id']}/"
    posted = artifacts(run.flow_run_id)
    assert set(posted) == {"classification-report", "test-metrics", "published-run"}
    assert report.text in posted["classification-report"].data
    assert run.result["location"] in posted["published-run"].data
    logged = run_log(run.flow_run_id, containing="best validation accuracy")
    assert any(m.startswith("training model default: 1 epoch, batch size 32, ") for m in logged), logged
    secret = s3_server.secret_key.encode()
    written = [worker.log().encode(), "\n".join(logged).encode()]
    written += [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    client = s3_server.client()
    bucket, prefix = storage_url.removeprefix("s3://").split("/", 1)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        written += [client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                    for item in page.get("Contents", [])]
    assert len(written) > 10 and not any(secret in blob for blob in written)


@integration
def test_fer_train_remote_wait_prints_the_published_report(worker, prefect_api, s3_server,
                                                           storage_url, tiny_fer_zip, tmp_path):
    """`fer train --epochs 1 --remote --wait` as a user types it: run on the worker, report back.

    The user's own FER_STORAGE is not where the worker publishes: the report comes from the
    server, not from a store the user may not even be able to reach.
    """
    fer = str(Path(sys.executable).parent / "fer")
    env = {**os.environ, **prefect_api.client_env(), **s3_server.env(storage=storage_url)}
    here = {**env, "FER_STORAGE": str(tmp_path / "my-own-store")}
    command = [fer, "train", "--epochs", "1", "--batch-size", "32", "--data", str(tiny_fer_zip),
               "--out", str(tmp_path / "runs"), "--remote", "--wait"]  # not the checkout's runs/
    trained = subprocess.run(command, capture_output=True, text=True, env=here, timeout=600,
                             check=False)
    assert trained.returncode == 0, trained.stderr
    assert "/runs/flow-run/" in trained.stdout and "state: Completed" in trained.stdout
    assert "published run " in trained.stdout and "macro avg" in trained.stdout
    run_id = trained.stdout.split("published run ", 1)[1].split(":", 1)[0]
    shown = subprocess.run([fer, "reports", "show", "latest"], capture_output=True, text=True,
                           env=env, timeout=120, check=False)
    assert shown.returncode == 0 and f"run {run_id}:" in shown.stdout
    assert "macro avg" in shown.stdout


def prefect_cli(server, *args: str) -> None:
    """``prefect ARGS`` as a user types it, against ``server``."""
    done = subprocess.run([str(Path(sys.executable).with_name("prefect")), *args],
                          env={**os.environ, **server.client_env()}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@integration
@pytest.mark.parametrize("stop", ["Crashed", "Cancelled"])
def test_a_retried_run_continues_its_training(worker, prefect_api, tiny_fer_zip, tmp_path, stop):
    """The flow run's process is killed mid-training (out of memory, a reboot), or the run
    is cancelled: following it says how to retry. `prefect flow-run retry`, as a user types
    it, sends the run back to the worker, whose training continues in the same run folder
    from its last finished epoch instead of starting over."""
    # Batches of 8 make each epoch long enough that the run cannot finish its 40 epochs
    # while `prefect flow-run cancel` starts and the worker acts on it.
    run = trigger_retrain({**TINY, "epochs": 40, "batch_size": 8, "data": str(tiny_fer_zip),
                           "out_dir": str(tmp_path)}, wait=False)
    deadline = time.monotonic() + 180
    while epochs_done(tmp_path) < 2:
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.05)
    if stop == "Crashed":
        killed_at = len(worker.log())
        assert worker.kill_descendants()
    else:
        prefect_cli(prefect_api, "flow-run", "cancel", run.flow_run_id)
        cancelled_at = time.monotonic()
    # A cancelled run's process ends by SIGTERM; Prefect's worker has marked it Crashed
    # ("exited due to a SIGTERM signal") when it saw that exit before the cancellation
    # (once, with the CPU shared by a training): either way following names the retry.
    ended = "Crashed" if stop == "Crashed" else "(Cancelled|Crashed)"
    with pytest.raises(FerError, match=rf"ended {ended}: .*`prefect flow-run retry "
                                       rf"{run.flow_run_id}` runs it again"):
        follow(run)
    if stop == "Crashed":
        wait_for_the_workers_crash_report(worker, since=killed_at)
    else:
        # Each attempt's watch for cancellations is sent the last minute of Cancelling
        # events when it connects (Prefect 3.9's events stream), and cancels a run that one
        # names without reading its state: a retry within the minute can be cancelled again
        # by the first cancel, if the replay comes after its process has started.
        time.sleep(max(0.0, cancelled_at + CANCEL_EVENTS_REPLAYED_S - time.monotonic()))
    (run_dir,) = tmp_path.iterdir()
    stopped_after = epochs_done(tmp_path)
    assert 2 <= stopped_after < 40

    prefect_cli(prefect_api, "flow-run", "retry", run.flow_run_id)
    finished = follow(run)

    assert finished.state == "Completed" and finished.result["run_id"] == run_dir.name
    assert list(tmp_path.iterdir()) == [run_dir]  # the same folder, not a second run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_at_epochs"] == {"member 1": [stopped_after]}
    assert manifest["started_by"] == f"prefect flow run {run.flow_run_id}"
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 40  # header, then every epoch once


@integration
def test_a_run_cancelled_after_its_server_was_away_stops_and_publishes_nothing(
        tiny_fer_zip, tmp_path):
    """The Prefect server away mid-training long enough that the worker stops watching for
    cancellations ("Cancellation observer failed" in its log; Prefect 3.9.1 gives up after
    about 30 s), then back, then the run cancelled as a user does: the run stops within a
    minute and ends Cancelled, without publishing. It had trained to its last epoch,
    published, and shown Cancelling for ever. A server and worker of its own: the session's
    stay up for the other tests."""
    server = PrefectServer(tmp_path / "prefect-home").start()
    store = tmp_path / "store"
    worker = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            deploy_all(REPO, names=["retrain"])
            worker = start_worker(server, log_path=tmp_path / "worker.log", env={
                "FER_DATA_DIR": str(tmp_path / "data"), "FER_STORAGE": str(store)})
            worker.wait_for_log(r"Worker '.*' started!", timeout=90)
            # epochs enough to train until long after the cancellation
            run = trigger_retrain({**TINY, "epochs": 2000, "batch_size": 8,
                                   "data": str(tiny_fer_zip), "out_dir": str(tmp_path / "runs")})
            deadline = time.monotonic() + 180
            while epochs_done(tmp_path / "runs") < 2:
                assert time.monotonic() < deadline, worker.log()[-3000:]
                time.sleep(0.2)
            server.stop()
            worker.wait_for_log(r"Cancellation observer failed", timeout=120)
            server.start()
            prefect_cli(server, "flow-run", "cancel", run.flow_run_id)
            cancelled_at = time.monotonic()
            while not (state := flow_run(run.flow_run_id).state).is_final():
                assert time.monotonic() - cancelled_at < 90, worker.log()[-3000:]
                time.sleep(1)
            # ended by fer's own check, not by Prefect's (which had given up)
            assert state.name == "Cancelled" and "fer's own check" in state.message, state
            assert "publish" not in task_runs(run.flow_run_id)
        assert epochs_done(tmp_path / "runs") < 2000
        assert not store.exists() or not any(store.rglob("manifest.json"))
    finally:
        if worker is not None:
            worker.kill_with_descendants()
        server.stop()


@integration
def test_a_retry_fetches_the_data_again_and_trains_anew_when_it_changed(worker, prefect_api,
                                                                       tiny_fer_zip, tmp_path):
    """A retry runs every task again, fetching included. A crashed run of the worker's
    current dataset (`data: null`, as the weekly deployment runs), whose current dataset
    `fer fetch-data` replaced before the retry, trains a new run on the new data and says
    why, instead of continuing on the data its first attempt fetched: Prefect would replay
    that attempt's cached result, since a retried flow run keeps its id."""
    worker_data = {"FER_DATA_DIR": worker.env["FER_DATA_DIR"]}
    assert run_fer("fetch-data", "--source", tiny_fer_zip, env=worker_data).returncode == 0
    out = tmp_path / "runs"
    run = trigger_retrain({**TINY, "epochs": 30, "data": None, "out_dir": str(out)}, wait=False)
    deadline = time.monotonic() + 180
    while epochs_done(out) < 2:
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.05)
    killed_at = len(worker.log())
    assert worker.kill_descendants()
    with pytest.raises(FerError, match=r"ended Crashed"):
        follow(run)
    wait_for_the_workers_crash_report(worker, since=killed_at)
    (first,) = out.iterdir()
    newer = subset_of_shared_archive(tmp_path / "newer.zip", train_per_class=15, test_per_class=5)
    assert run_fer("fetch-data", "--source", newer, env=worker_data).returncode == 0

    prefect_cli(prefect_api, "flow-run", "retry", run.flow_run_id)
    finished = follow(run)

    assert finished.state == "Completed" and finished.result["run_id"] != first.name
    manifest = json.loads((out / finished.result["run_id"] / "manifest.json").read_text())
    assert manifest["data"]["sha256"] != read_run(first).data_sha256
    assert manifest["data"]["origin"] == str(newer)  # as `fer fetch-data --source` named it
    now_current = current_source(Path(worker_data["FER_DATA_DIR"])).path
    assert manifest["data"]["sha256"] == load_dataset(now_current, cache_dir=tmp_path).sha256
    assert any("its data has changed since; training from the start" in message
               for message in run_log(run.flow_run_id, containing="its data has changed"))


@integration
def test_a_run_whose_worker_died_is_marked_crashed_and_frees_the_pool(worker, tiny_fer_zip,
                                                                      tmp_path):
    """The worker's machine dies mid-training (worker and flow run killed at once, nothing
    reports): the automation `fer deploy` registers marks the run Crashed once its
    heartbeats stop, and the pool, which runs one flow at a time, then starts the run that
    was waiting, instead of holding both for ever."""
    ensure_crash_detection(crash_after_s=MIN_CRASH_AFTER_S)
    try:
        dying = trigger_retrain({**TINY, "epochs": 30, "data": str(tiny_fer_zip),
                                 "out_dir": str(tmp_path)}, wait=False)
        deadline = time.monotonic() + 180
        while epochs_done(tmp_path) < 1:
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.05)
        waiting = trigger_retrain({"data": str(tmp_path / "missing.zip"),
                                   "out_dir": str(tmp_path)}, wait=False)
        assert worker.kill_with_descendants()
        killed_at = time.monotonic()
        time.sleep(5)
        assert flow_run(dying.flow_run_id).state.name == "Running"  # nothing else ends it
        assert flow_run(waiting.flow_run_id).state.is_scheduled()  # or Late: not picked up

        assert_marked_crashed(dying.flow_run_id, still="Running", since=killed_at)
        worker.start()
        with pytest.raises(FerError, match=r"ended Failed: .*missing\.zip: data source not found"):
            follow(waiting)
    finally:
        ensure_crash_detection(crash_after_s=DEFAULT_CRASH_AFTER_S)
        if not worker.running():
            worker.start()


@contextlib.contextmanager
def fer_retrain_training(server, data: Path, tmp_path: Path, *, epochs: int):
    """`fer retrain` as a user runs it with PREFECT_API_URL set to ``server``: yields the
    process and its flow run once the first epoch is done (runs in tmp_path/runs, published
    to the folder tmp_path/artifacts, its stderr in tmp_path/stderr); killed at the end."""
    runs = tmp_path / "runs"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(server.client_env(), FER_DATA_DIR=str(tmp_path / "data"),
               FER_STORAGE=str(tmp_path / "artifacts"), TF_CPP_MIN_LOG_LEVEL="3")
    with (tmp_path / "stderr").open("w") as log:
        process = subprocess.Popen(
            [*FER, "retrain", "--epochs", str(epochs), "--batch-size", "32", "--data",
             str(data), "--out", str(runs)], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 240
            while epochs_done(runs) < 1:
                assert process.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "stderr").read_text()[-3000:])
                time.sleep(0.2)
            with get_client(sync_client=True) as client:
                (run,) = [run for run in client.read_flow_runs()
                          if run.parameters.get("out_dir") == str(runs)]
            yield process, run
        finally:
            process.kill()
            process.wait()


@integration
def test_a_fer_retrain_killed_mid_training_is_marked_crashed_on_its_server(prefect_api,
                                                                          tiny_fer_zip,
                                                                          tmp_path):
    """`fer retrain` with PREFECT_API_URL set records its run on that server. Killed outright
    (its machine lost), nothing reported the run's end, and it showed Running for ever: its
    run had no `fer` tag, which the crash automation watches. It has the tag now, as the
    deployments' runs do, and is marked Crashed. Its heartbeats come every 30 s, whatever
    Prefect's default (180 s), so that a --crash-after set for workers that send theirs that
    often does not mark it Crashed while it trains."""
    ensure_crash_detection(crash_after_s=MIN_CRASH_AFTER_S)
    try:
        with fer_retrain_training(prefect_api, tiny_fer_zip, tmp_path,
                                  epochs=300) as (retrain_here, run):
            deadline = time.monotonic() + 90  # the second at 30 s, not at 180
            while True:
                heard = run_events("prefect.flow-run.heartbeat", run.id)
                if len(heard) >= 2:
                    break
                assert retrain_here.poll() is None and time.monotonic() < deadline, (
                    f"{len(heard)} heartbeat(s)")
                time.sleep(1)
        killed_at = time.monotonic()
        assert {"fer", "in-process"} <= set(flow_run(run.id).tags)
        assert_marked_crashed(run.id, still="Running", since=killed_at)
    finally:
        ensure_crash_detection(crash_after_s=DEFAULT_CRASH_AFTER_S)


@integration
def test_a_fer_retrain_cancelled_on_its_server_stops_and_publishes_nothing(prefect_api,
                                                                          tiny_fer_zip,
                                                                          tmp_path):
    """`fer retrain` with PREFECT_API_URL set, cancelled on that server (Cancel in the UI):
    no worker runs it to stop it, and it had trained on to its last epoch and published,
    the cancel ignored. fer's own check stops it: the run ends Cancelled, nothing is
    published, and fer exits 1 with one line saying so and the resume command above it."""
    runs, store = tmp_path / "runs", tmp_path / "artifacts"
    with fer_retrain_training(prefect_api, tiny_fer_zip, tmp_path,
                              epochs=2000) as (retrain_here, run):
        prefect_cli(prefect_api, "flow-run", "cancel", str(run.id))
        retrain_here.wait(timeout=90)  # two checks 15 s apart, then the stop
    stderr = (tmp_path / "stderr").read_text()
    assert retrain_here.returncode == 1, stderr[-3000:]
    assert re.search(r"^error: the run was cancelled: stopped by fer's own check of the "
                     r"run's state on the server", stderr, re.MULTILINE), stderr[-3000:]
    assert "Traceback" not in stderr
    (run_dir,) = runs.iterdir()
    assert f"training stopped; `fer train --resume {run_dir} --publish --storage {store}` " \
        "continues it" in stderr
    assert epochs_done(runs) < 2000
    assert not store.exists() or not any(store.rglob("manifest.json"))
    state = flow_run(run.id).state
    assert state.name == "Cancelled" and "fer's own check" in state.message, state


@integration
def test_a_run_whose_worker_died_before_its_first_heartbeat_is_marked_crashed(prefect_api,
                                                                             deployed):
    """A worker that takes a run (Pending) and dies before the run sends its first
    heartbeat: nothing had watched the run, which stayed Pending and held the pool (one
    flow at a time) for ever. Here the run is left Pending as such a worker leaves it."""
    ensure_crash_detection(crash_after_s=MIN_CRASH_AFTER_S)
    try:
        run = left_pending()
        left_at = time.monotonic()
        assert_marked_crashed(run.id, still="Pending", since=left_at)
    finally:
        ensure_crash_detection(crash_after_s=DEFAULT_CRASH_AFTER_S)


@integration
def test_a_run_whose_worker_died_before_the_rule_changed_is_still_marked_crashed(prefect_api,
                                                                               deployed):
    """`fer deploy --crash-after` with a new value (or an upgrade that changes the rule)
    gives the rule a new trigger, which had seen none of the heartbeats of the runs in
    progress: a run whose worker had died already was never marked Crashed and held the
    pool. Deploying sends each run in progress an event that starts its watch anew."""
    ensure_crash_detection(crash_after_s=DEFAULT_CRASH_AFTER_S)
    try:
        run = left_pending()
        # its Pending event reaches the rule as it was, as a dead run's did: stored, and 3 s
        # more for the automations' own reader of the events (else the new rule could see
        # it and the test pass without the watch event)
        assert stored_events("prefect.flow-run.Pending", run.id)
        time.sleep(3)
        ensure_crash_detection(crash_after_s=MIN_CRASH_AFTER_S)
        changed_at = time.monotonic()
        assert_marked_crashed(run.id, still="Pending", since=changed_at)
    finally:
        ensure_crash_detection(crash_after_s=DEFAULT_CRASH_AFTER_S)


@integration
def test_a_deploy_that_changes_nothing_still_watches_the_runs_in_progress(prefect_api,
                                                                         deployed):
    """A deploy whose watch events were lost (the server gone between the rule's update
    and them) is recovered by deploying again, which finds the rule unchanged: so every
    deploy sends each fer run in progress the watch event, once, without the wait a
    changed rule needs."""
    from prefect.states import Cancelled

    ensure_crash_detection(crash_after_s=DEFAULT_CRASH_AFTER_S)
    run = left_pending()
    try:
        started = time.monotonic()
        ensure_crash_detection(crash_after_s=DEFAULT_CRASH_AFTER_S)  # the rule as it is
        assert time.monotonic() - started < WATCH_RESEND_S
        assert len(stored_events(WATCH_EVENT, run.id)) == 1
    finally:  # Pending for the rule's 600 s would hold the pool the next tests' runs need
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelled(), force=True)


@integration
def test_triggered_and_scheduled_runs_never_overlap(worker, tiny_fer_zip, tmp_path):
    """A run of each deployment, started together, train one after the other."""
    parameters = {**TINY, "data": str(tiny_fer_zip), "out_dir": str(tmp_path)}
    first = trigger_retrain(parameters, wait=False)
    second = trigger_retrain(parameters, wait=False, deployment="retrain/retrain-weekly")
    assert first.state == second.state == "Scheduled"
    assert follow(first).state == follow(second).state == "Completed"
    earlier, later = sorted((flow_run(first.flow_run_id), flow_run(second.flow_run_id)),
                            key=lambda run: run.start_time)
    assert earlier.end_time <= later.start_time


def retrain_on_pool(pool: str, *, deployment: str) -> None:
    """Deployment retrain/<deployment> of the retrain flow on work pool ``pool``, which no
    worker polls."""
    ensure_work_pool(pool, concurrency_limit=None)
    with get_client(sync_client=True) as client:
        retrain_deployment = client.read_deployment_by_name("retrain/retrain")
        client.create_deployment(flow_id=retrain_deployment.flow_id, name=deployment,
                                 work_pool_name=pool, entrypoint=retrain_deployment.entrypoint)


@integration
def test_a_run_no_worker_picks_up_is_reported(deployed, prefect_api):
    """A deployment on a pool nobody polls: the error says which pool and how to start a worker."""
    retrain_on_pool("fer-idle", deployment="idle")
    with pytest.raises(RunStillGoing, match=r"no worker picked up flow run .* in 2s; start one with "
                                       r"`prefect worker start --pool fer-idle`"):
        trigger_retrain({}, wait=True, deployment="retrain/idle", poll_seconds=0.5,
                        pickup_timeout_s=2)


@integration
@pytest.mark.parametrize("paused", ["pool", "queue"])
def test_a_run_held_by_a_paused_pool_or_queue_says_how_to_resume_it(deployed, prefect_api,
                                                                    paused):
    """A paused pool or work queue: no worker takes the run however many poll, so the hint
    is the resume command, not to start a worker (a paused queue also kept the pool READY,
    and `--wait` waited for ever)."""

    pool = f"fer-paused-{paused}"
    retrain_on_pool(pool, deployment=f"paused-{paused}")
    with get_client(sync_client=True) as client:
        if paused == "pool":
            client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))
        else:
            queue = client.read_work_queue_by_name("default", work_pool_name=pool)
            client.update_work_queue(queue.id, is_paused=True)
    expected = (rf"work pool {pool} is paused: `prefect work-pool resume {pool}` resumes it"
                if paused == "pool" else
                rf"work queue default of pool {pool} is paused: `prefect work-queue resume "
                rf"default --pool {pool}` resumes it")
    with pytest.raises(RunStillGoing, match=rf"no worker picked up flow run .* in 2s; "
                                            rf"{expected} \(the run stays queued"):
        trigger_retrain({}, wait=True, deployment=f"retrain/paused-{paused}", poll_seconds=0.5,
                        pickup_timeout_s=2)


def follow_for_at_most(seconds: float, flow_run_id, **options
                       ) -> tuple[bool, list[BaseException]]:
    """follow_run in a thread given ``seconds``: whether it is still following (a test of
    a run it once waited on for ever fails instead of hanging), and what it raised."""
    outcome: list[BaseException] = []

    def follow_it():
        try:
            follow_run(flow_run_id, **options)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    # in this test's Prefect settings, which a new thread would not see
    following = threading.Thread(target=contextvars.copy_context().run, args=(follow_it,),
                                 daemon=True)
    following.start()
    following.join(timeout=seconds)
    return following.is_alive(), outcome


@integration
def test_a_run_sent_back_to_wait_for_a_slot_is_not_waited_for_without_a_worker(deployed,
                                                                              prefect_api):
    """A run a worker took (Pending), then sent back by the deployment's concurrency limit
    (AwaitingConcurrencySlot, for a worker to take again): with no worker polling its pool,
    following it ends as for a run never taken (it waited for ever)."""
    from prefect.states import AwaitingConcurrencySlot, Pending

    retrain_on_pool("fer-sent-back", deployment="sent-back")
    run = trigger_retrain({}, deployment="retrain/sent-back")
    flow_run_id = uuid.UUID(run.flow_run_id)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Pending(), force=True)
    seen = []

    def send_back(state: State) -> None:  # as the limit does once the run was seen taken
        seen.append(state.name)
        if state.name == "Pending":
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run_id, AwaitingConcurrencySlot(), force=True)

    still_following, outcome = follow_for_at_most(60, run.flow_run_id, poll_seconds=0.5,
                                                  pickup_timeout_s=2, on_state=send_back)
    with get_client(sync_client=True) as client:
        client.delete_flow_run(flow_run_id)  # never to run
    assert not still_following, "--wait waits for ever on a run sent back to wait"
    assert seen == ["Pending", "AwaitingConcurrencySlot"]
    assert isinstance(outcome[0], RunStillGoing)
    assert re.search(r"flow run .* was sent back by its concurrency limit and no worker has "
                     r"taken it again in 2s; start one with `prefect worker start --pool "
                     r"fer-sent-back`", str(outcome[0]))


@integration
def test_a_run_in_a_paused_queue_of_a_polled_pool_is_not_waited_for(worker):
    """A worker polls pool `fer` (READY), but the run's work queue is paused: no worker
    will take it, and following it says how to resume the queue (it waited for ever)."""
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("retrain/retrain")
        client.create_deployment(flow_id=retrain.flow_id, name="held", work_pool_name="fer",
                                 work_queue_name="held", entrypoint=retrain.entrypoint)
        queue = client.read_work_queue_by_name("held", work_pool_name="fer")
        client.update_work_queue(queue.id, is_paused=True)
    run = trigger_retrain({}, deployment="retrain/held")
    still_following, outcome = follow_for_at_most(120, run.flow_run_id, poll_seconds=0.5,
                                                  pickup_timeout_s=2)
    with get_client(sync_client=True) as client:
        client.delete_flow_run(uuid.UUID(run.flow_run_id))  # never to run
    assert not still_following, "--wait waits for ever on a paused queue"
    assert isinstance(outcome[0], RunStillGoing)
    assert ("work queue held of pool fer is paused: `prefect work-queue resume held --pool "
            "fer` resumes it") in str(outcome[0])


@integration
@pytest.mark.parametrize(("left", "doing"), [(Running, "is running"),
                                             (Pending, r"was taken by a worker \(Pending\)")])
def test_a_run_whose_worker_died_is_reported_not_waited_for(deployed, prefect_api, left, doing):
    """A run a worker claimed and started (or had taken, Pending, and was starting), on a
    pool no worker polls any more (the worker died with it): following it ends with what to
    do, instead of waiting for ever (a Pending one was waited for until the crash rule, or
    for ever without it)."""
    retrain_on_pool("fer-lost", deployment="lost")
    run = trigger_retrain({}, deployment="retrain/lost")
    with get_client(sync_client=True) as client:  # as its worker did before it died
        client.set_flow_run_state(uuid.UUID(run.flow_run_id), left(), force=True)
    def still_following(signum, frame):  # a follow that waits for ever fails, not hangs
        raise TimeoutError("follow_run still waiting after 120 s")

    before = signal.signal(signal.SIGALRM, still_following)
    signal.alarm(120)
    try:
        with pytest.raises(RunStillGoing, match=rf"{doing}, but no worker has polled pool "
                           rf"fer-lost for 2s: .*`prefect flow-run cancel {run.flow_run_id}`"):
            follow_run(run.flow_run_id, poll_seconds=0.5, worker_lost_s=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
        with get_client(sync_client=True) as client:  # never to run
            client.delete_flow_run(uuid.UUID(run.flow_run_id))


@integration
def test_following_a_run_deleted_from_the_server_is_one_line(prefect_api):
    """A run deleted in the UI while someone follows it: named, not a traceback."""
    missing = uuid.uuid4()
    with pytest.raises(FerError, match=rf"flow run {missing} is no longer on the server at "):
        follow_run(missing, poll_seconds=0.1)


@integration
def test_an_unknown_deployment_says_how_to_register_it(prefect_api):
    with pytest.raises(FerError, match=r"deployment 'retrain/nightly' not found at .*; register "
                                       r"it with `fer deploy`"):
        trigger_retrain({}, deployment="retrain/nightly")


@integration
def test_parameters_of_the_wrong_type_are_refused(deployed):
    with pytest.raises(FerError, match=r"deployment 'retrain/retrain' refused parameters "
                                       r"\{'epochs': 'many'\}: .*'many' is not of type 'integer'"):
        trigger_retrain({"epochs": "many"})


class _ErringPrefectApi(http.server.BaseHTTPRequestHandler):
    """A Prefect API that answers its health check (without a login, as Prefect's does) and
    fails other requests as the path's first part says: /login asks for credentials, as a
    server with PREFECT_SERVER_API_AUTH_STRING does; /proxy answers the read of the
    deployment 500, with a proxy's JSON string for a body; /drop closes the connection
    without an answer; /create serves the deployment and fails the run's creation, 500."""

    DEPLOYMENT = json.dumps({"id": str(uuid.uuid4()), "name": "retrain",
                             "flow_id": str(uuid.uuid4())}).encode()

    def do_GET(self):  # noqa: N802 (http.server's name)
        kind = self.path.split("/")[1]
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/health"):
            self._answer(200, b"true")
        elif kind == "login":
            self._answer(401, b'{"exception_message": "Unauthorized"}')
        elif "/csrf-token" in self.path:
            self._answer(404, b'{"detail": "Not Found"}')  # as a server without CSRF tokens
        elif self.path.endswith("/work_pools/filter"):
            self._answer(200, b"[]")
        elif kind == "proxy":
            self._answer(500, b'"upstream timed out"')
        elif kind == "create" and self.command == "GET":
            self._answer(200, self.DEPLOYMENT)
        elif kind == "create":
            self._answer(500, b'{"detail": "database is locked"}')
        elif kind == "readonly":
            self._answer(403, b'{"detail": "this role may not write"}')
        else:
            self.close_connection = True  # no answer at all

    do_POST = do_GET  # noqa: N815

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


_API = r"the Prefect API at http://127\.0\.0\.1:\d+/\w+/api"
_STARTING = r"while starting a run of deployment 'retrain/retrain'"
_MAY_EXIST = (r"the run may have been created: `prefect flow-run ls --flow-name retrain` "
              r"shows it, before you trigger another")


@pytest.mark.parametrize(("kind", "error", "expected"), [
    ("login", FerError, rf"{_API} refused our credentials \(401\) reading its work pools; set "
                        r"PREFECT_API_AUTH_STRING to its PREFECT_SERVER_API_AUTH_STRING"),
    ("proxy", FerError, rf"{_API} answered 500 {_STARTING}: upstream timed out$"),
    ("drop", FerError, rf"lost {_API} {_STARTING} \(.+\)$"),
    ("create", RunStillGoing, rf"{_API} answered 500 {_STARTING}: database is locked; "
                              rf"{_MAY_EXIST}"),
])
def test_a_server_failing_the_trigger_says_what_happened(kind, error, expected):
    """A refused login (which /health does not ask for), a 500 from a proxy, a dropped
    connection, a failed creation: each said as such, not as a refusal of the parameters
    (only the server's 400/409/422 is one) nor a traceback. Only where the request that
    creates the run failed may the run exist: the exit is then that of a run whose outcome
    is unknown (RunStillGoing), so that a script retrying on failure does not start a
    second training."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ErringPrefectApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{kind}/api"
    try:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}):
            with pytest.raises(FerError, match=expected) as raised:
                trigger_retrain(TINY)
    finally:
        server.shutdown()
        server.server_close()
    assert type(raised.value) is error


def test_deploying_with_a_role_that_may_only_read_is_one_line():
    """A key whose role reads but may not write (403 on creating the pool): `fer deploy`
    says so in one line, as the trigger does, instead of a traceback."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from flows.deploy import deploy_all

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ErringPrefectApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/readonly/api"
    try:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}):
            with pytest.raises(FerError, match=rf"the Prefect API at {re.escape(url)} refused "
                                               r"our credentials \(403\) setting up the work "
                                               r"pools and the crash automation; set "):
                deploy_all(Path(__file__).resolve().parents[1])
    finally:
        server.shutdown()
        server.server_close()


def test_triggering_without_a_server_says_how_to_start_one():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(FerError, match=r"PREFECT_API_URL is not set"):
            trigger_retrain(TINY)


def test_the_temporary_server_gets_time_to_migrate_its_database():
    """`fer retrain`'s temporary server runs `prefect server start`, which migrates the
    database before it answers: Prefect's own 20 s default failed a fresh PREFECT_HOME on a
    slow machine; a longer setting is kept."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT
    from prefect.settings import temporary_settings

    with temporary_settings(updates={TIMEOUT: 20}):
        assert local_server._startup_timeout_s() == 120
    with temporary_settings(updates={TIMEOUT: 300}):
        assert local_server._startup_timeout_s() == 300
