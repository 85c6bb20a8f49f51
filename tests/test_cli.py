"""The `fer` CLI as a user runs it: one-line errors, and the end-to-end train/evaluate/predict."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import encode_image, shaded_image, write_image_tree
from s3server import free_port

from fer.data import file_sha256
from fer.errors import DataError, FerError, RunStillGoing
from fer.labels import CLASS_NAMES
from fer.train import RUN_FILES

FER = [str(Path(sys.executable).parent / "fer")]
# Click's boxes and help wrap at the terminal's width, and break a long temporary path
# mid-name (usage_error cannot join it again): wide enough for any message here
WIDE = {"COLUMNS": "400"}


def run_fer(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FER, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **WIDE, **(env or {})}, cwd=cwd, timeout=timeout,
                          check=False)


def usage_error(result: subprocess.CompletedProcess) -> str:
    """A usage error's message (exit code 2) as one line, out of Click's box of any width."""
    assert result.returncode == 2, result.stderr
    return " ".join(result.stderr.replace("│", " ").split())


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit code 1, a single 'error:' line on stderr matching pattern, no traceback."""
    import re

    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# Root (as these tests run) passes permission bits by its capabilities: without them, as
# setpriv runs a command here, a folder of mode 0 shuts it out as it does any user.
WITHOUT_OVERRIDES = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                     "--bounding-set=-dac_override,-dac_read_search"]


def run_fer_as_a_user(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """run_fer as a user whom permission bits stop."""
    if os.geteuid() != 0:
        return run_fer(*args, env=env)
    if shutil.which("setpriv") is None:
        needs = "needs setpriv (util-linux) to run fer as root without its overrides"
        if os.environ.get("CI"):  # as the S3 and dataset tests: a skip would prove little
            pytest.fail(needs)
        pytest.skip(needs)
    return subprocess.run([*WITHOUT_OVERRIDES, *FER, *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **WIDE, **(env or {})}, timeout=600,
                          check=False)


@pytest.fixture
def shut(tmp_path) -> Path:
    """A folder that this user may not list or enter (another user's home, say), holding a
    runs/ folder and a model file."""
    folder = tmp_path / "shut"
    (folder / "runs").mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"")
    folder.chmod(0)
    yield folder
    folder.chmod(0o755)


def test_a_path_in_a_folder_this_user_may_not_enter_is_one_error_line(shut, tmp_path):
    """`fer train --out /root/runs` as a user, a --model or FER_DATA_DIR in another user's
    home: Path.exists raised PermissionError there, and fer printed a traceback."""
    data = write_image_tree(tmp_path / "layout")
    env = {"FER_DATA_DIR": str(tmp_path / "data")}
    assert_one_line_error(run_fer_as_a_user("train", "--epochs", "1", "--data", data, "--out",
                                            shut / "runs", env=env),
                          rf"^error: --out {shut}/runs: {shut} is not writable by this user$")
    assert_one_line_error(run_fer_as_a_user("fetch-data", "--source", data,
                                            env={"FER_DATA_DIR": str(shut / "fer")}),
                          rf"^error: FER_DATA_DIR {shut}/fer: {shut} is not writable by this user$")
    assert_one_line_error(run_fer_as_a_user("train", "--epochs", "1", "--out", tmp_path / "runs",
                                            env={"FER_DATA_DIR": str(shut / "fer")}),
                          rf"^error: FER_DATA_DIR {shut}/fer: {shut} is not writable by this user$")
    (tmp_path / "runs").mkdir()  # compared with the store's runs/, which fer may not see
    assert_one_line_error(run_fer_as_a_user("train", "--epochs", "1", "--data", data, "--out",
                                            tmp_path / "runs", "--publish", "--storage",
                                            shut / "store", env=env),
                          rf"^error: cannot write {shut}/store/.fer-write-check: Permission "
                          r"denied; check the storage folder, its permissions and free space$")
    assert re.search(rf"File '{shut}/model.keras' cannot be reached: a folder above it is not "
                     r"readable by this user", usage_error(run_fer_as_a_user(
                         "evaluate", "--model", shut / "model.keras")))
    shut.chmod(0o444)  # listed, not entered: a resume would read nothing in it
    assert re.search(rf"Directory '{shut}' is not readable", usage_error(run_fer_as_a_user(
        "train", "--resume", shut, "--publish")))


def test_any_other_permission_error_is_one_error_line(monkeypatch, capsys):
    """A PermissionError from a path no check above foresaw is one `error:` line naming the
    file and exit 1, not a traceback; the hint about folders only where it is EACCES."""
    import fer_cli.main as cli

    monkeypatch.setattr(cli, "_configure_logging", lambda: None)  # this process's own
    monkeypatch.setattr(cli, "_stop_on_sigterm", lambda: [])
    for error, expected in (
            (PermissionError(13, "Permission denied", "/srv/fer/x"),
             "error: /srv/fer/x: Permission denied (this user may not read it, or enter a "
             "folder above it)\n"),
            (PermissionError(1, "Operation not permitted", "/srv/fer/y"),
             "error: /srv/fer/y: Operation not permitted\n")):
        def fail(error=error):
            raise error
        monkeypatch.setattr(cli, "app", fail)
        with pytest.raises(SystemExit) as exited:
            cli.main()
        assert exited.value.code == 1
        assert capsys.readouterr().err == expected


def test_train_help_shows_each_profiles_settings():
    """`fer train --help` states the epochs, batch size, learning rate, flip averaging and
    ensemble size each profile trains with, as fer.profiles defines them (the help once
    named a stale schedule)."""
    from fer.profiles import PROFILES

    result = run_fer("train", "--help")
    assert result.returncode == 0, result.stderr
    fast = PROFILES["fast"].train_options
    assert f"fast {fast['epochs']}," in result.stdout
    assert f"fast {fast['batch_size']}," in result.stdout
    assert f"fast {fast['learning_rate']:g})" in result.stdout
    assert f"best {PROFILES['best'].train_options['epochs']})" in result.stdout
    assert "(fast on, best on; else off)" in result.stdout  # --tta (the help once said best only)
    assert f"(best {PROFILES['best'].train_options['ensemble']}; else 1)" in result.stdout


def test_each_options_help_names_only_options_its_command_has():
    """An option's help that points to another option points to one of its own command's:
    `fer retrain --help` had offered `fer train`'s --remote, which retrain does not take."""
    import typer

    from fer_cli.main import app

    def commands(command, path=()):
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, (*path, name)) if hasattr(sub, "commands") else [
                (" ".join((*path, name)), sub)]

    found = list(commands(typer.main.get_command(app)))
    assert {"train", "retrain", "predict", "reports show"} <= {name for name, _ in found}
    for name, command in found:
        own = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}
        for param in command.params:
            named = set(re.findall(r"--[a-z][a-z0-9-]*", getattr(param, "help", None) or ""))
            assert named <= own, f"fer {name} {param.opts[0]}: help names {named - own}"


def test_bad_csv_is_one_line_error(tmp_path, data_dir):
    """`fer train --data bad.csv` names the file and line, exits 1, prints no traceback."""
    bad = tmp_path / "bad.csv"
    bad.write_text("emotion,pixels,Usage\n9," + " ".join(["1"] * 2304) + ",Training\n")
    assert_one_line_error(run_fer("train", "--data", bad), r"bad\.csv, line 2: emotion '9'")


def test_unknown_class_folder_is_one_line_error(tmp_path, data_dir):
    root = write_image_tree(tmp_path / "layout", per_class=1)
    (root / "train" / "bored").mkdir()
    (root / "train" / "bored" / "x.png").write_bytes(encode_image(shaded_image("sad")))
    assert_one_line_error(run_fer("train", "--data", root), r"unknown class folder 'bored'")


def test_zip_slip_is_one_line_error(tmp_path, data_dir):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("../../evil.png", b"x")
    assert_one_line_error(run_fer("fetch-data", "--source", archive), r"zip-slip")


@pytest.mark.parametrize(("option", "pattern"), [
    (["--model", "resnet"], r"unknown model 'resnet'"),
    (["--precision", "fp8"], r"--precision fp8: expected one of auto"),
    (["--learning-rate", "0"], r"--learning-rate 0\.0: expected a finite number above 0"),
    # an infinite rate trained a whole epoch (an hour of `best`) before stopping as diverged
    (["--learning-rate", "inf"], r"--learning-rate inf: expected a finite number above 0"),
    (["--split-seed", "-1"], r"--split-seed -1: expected a seed from 0 to 4294967295"),
])
@pytest.mark.parametrize("command", [["train"], ["train", "--remote"], ["retrain"]])
def test_bad_training_options_fail_before_any_data_is_read(tmp_path, data_dir, command, option,
                                                           pattern):
    """A typo costs no download, decode or server round trip: the data named does not exist,
    and the Prefect server named is not there (retrain had asked it first, and blamed it)."""
    result = run_fer(*command, "--data", tmp_path / "missing.csv", *option,
                     env={"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"})
    assert_one_line_error(result, pattern)


@pytest.mark.parametrize("command", [["fetch-data", "--source", ""], ["train", "--data", " "],
                                     ["train", "--remote", "--data", ""],
                                     ["retrain", "--data", ""],
                                     ["evaluate", "--model", "junk.keras", "--data", ""]])
def test_an_empty_data_source_is_refused(tmp_path, data_dir, command):
    """`--data "$DATA"` with the variable unset read the current folder as the dataset (and
    fetch-data made it the current one); refused first, before a model is read (evaluate's
    junk model here: its error had come first)."""
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    result = run_fer(*command, cwd=tmp_path)
    assert_one_line_error(result, r"data source '\s*' is empty: expected a path, an http\(s\) "
                                  r"URL or s3://bucket/key")


EMPTY_STORAGE = r"storage '\s*' is empty: expected a folder path, file://PATH or s3://BUCKET/PREFIX"


@pytest.mark.parametrize(("command", "message"), [
    (["publish", "runs/x", "--storage", ""], EMPTY_STORAGE),
    (["reports", "list", "--storage", " "], EMPTY_STORAGE),
    (["train", "--publish", "--storage", ""], EMPTY_STORAGE),
    (["reports", "list", "--endpoint-url", ""], r"endpoint URL '' is empty: expected an "
                                                r"http\(s\) URL"),
    (["train", "--remote", "--storage", ""], EMPTY_STORAGE),
    (["retrain", "--storage", ""], EMPTY_STORAGE)])
def test_an_empty_store_is_refused(tmp_path, data_dir, command, message):
    """`--storage "$STORE"` with the variable unset published to FER_STORAGE or ./artifacts
    and exited 0 (and an empty --endpoint-url fell back to AWS_ENDPOINT_URL or AWS); a
    remote run is not queued to fail on the worker, nor a server started for retrain."""
    (tmp_path / "runs" / "x").mkdir(parents=True)
    result = run_fer(*command, cwd=tmp_path, env={"FER_STORAGE": str(tmp_path / "prod")})
    assert_one_line_error(result, message)
    assert not (tmp_path / "prod").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("command", [["train"], ["train", "--remote"], ["retrain"],
                                     ["evaluate", "--model", "README.md"]])
def test_an_empty_out_is_refused(tmp_path, command):
    """`--out "$OUT"` with the variable unset wrote the run into the current folder (Path("")
    is "."), and a remote run sent out_dir "." to a worker whose working folder it may not
    write; refused before anything starts, as an empty --data or --storage is."""
    (tmp_path / "README.md").write_text("")
    message = usage_error(run_fer(*command, "--out", "", cwd=tmp_path))
    assert "Invalid value for '--out': '' is empty: expected a folder path" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md"]


@pytest.mark.parametrize("command", [["reports", "get", "latest", "--dest", ""],
                                     ["deploy", "--project-dir", ""],
                                     ["deploy", "--project-dir", " "],
                                     ["train", "--resume", ""]])
def test_an_empty_dest_or_project_dir_is_refused(tmp_path, command):
    """`fer reports get latest --dest "$DEST"` with the variable unset downloaded into the
    current folder, and `fer deploy --project-dir ""` registered its checkout, exit 0;
    `fer train --resume "$RUN"` resumed the run the shell stood in, or loaded TensorFlow to
    say there was nothing to resume."""
    message = usage_error(run_fer(*command, cwd=tmp_path,
                                  env={"FER_STORAGE": str(tmp_path / "store")}))
    assert re.search(r"Invalid value for '--(dest|project-dir|resume)': '\s*' is empty: "
                     r"expected a folder path", message), message


def test_remote_training_sends_the_options_to_the_deployment(monkeypatch):
    """`fer train --remote` hands the worker what the user chose, profile filled in."""
    from typer.testing import CliRunner

    import flows.remote
    from fer.profiles import PROFILES
    from fer_cli.main import app

    sent = {}

    def trigger(parameters, **options):
        sent.update(parameters)
        return flows.remote.RemoteRun("id", "run-name", "http://ui/run", "Scheduled")

    monkeypatch.setattr(flows.remote, "trigger_retrain", trigger)
    result = CliRunner().invoke(app, ["train", "--remote", "--profile", "best", "--epochs", "5",
                                      "--seed", "9", "--split-seed", "7",
                                      "--force-champion", "--out", "/srv/runs",
                                      "--storage", "s3://bucket/prefix"])
    assert result.exit_code == 0, result.output
    assert sent == {"epochs": 5, "batch_size": 64, "tta": True,
                    "model": PROFILES["best"].train_options["model"],
                    "ensemble": 3, "learning_rate": None, "seed": 9, "split_seed": 7,
                    "val_fraction": 0.1, "precision": "auto", "storage": "s3://bucket/prefix",
                    "out_dir": "/srv/runs", "force_champion": True}
    assert "http://ui/run" in result.output

    # the default profile sets no tta, ensemble or learning rate: the run must not take a
    # deployment's own values for them (`ensemble: 3` in its YAML), as it takes its data's
    sent.clear()
    result = CliRunner().invoke(app, ["train", "--remote"])
    assert result.exit_code == 0, result.output
    assert sent == {"epochs": 20, "batch_size": 64, "model": "default", "tta": False,
                    "ensemble": 1, "learning_rate": None, "seed": 1337, "split_seed": 1337,
                    "val_fraction": 0.1, "precision": "auto"}

    # --out given as the default's value is given: it had been left out, and a deployment's
    # own out_dir (`/data/runs` in its YAML) used instead
    sent.clear()
    result = CliRunner().invoke(app, ["train", "--remote", "--out", "runs"])
    assert result.exit_code == 0, result.output
    assert sent["out_dir"] == "runs"

    # a deployment's `force_champion: true` or `create_bucket: true` can be turned off for
    # one run (they could only be turned on: false was never sent)
    sent.clear()
    result = CliRunner().invoke(app, ["train", "--remote", "--no-force-champion",
                                      "--no-create-bucket"])
    assert result.exit_code == 0, result.output
    assert sent["force_champion"] is False and sent["create_bucket"] is False


def test_remote_only_options_are_usage_errors():
    """--wait follows a remote run; --endpoint-url cannot reach a remote worker; a remote
    run always publishes, so --no-publish cannot be honoured."""
    result = run_fer("train", "--wait")
    assert result.returncode == 2 and "only follows a run started with --remote" in result.stderr
    result = run_fer("train", "--remote", "--endpoint-url", "http://127.0.0.1:9")
    assert result.returncode == 2 and "own AWS_ENDPOINT_URL" in result.stderr
    result = run_fer("train", "--remote", "--no-publish")
    assert result.returncode == 2 and "a --remote run always publishes" in result.stderr


def _remote_run_that_follows_with(monkeypatch, outcome: BaseException, *,
                                  states=()) -> list[str]:
    """flows.remote as `fer train --remote --wait` uses it: the run starts, then following
    it sees ``states`` and raises ``outcome``; the list records the calls in order."""
    import flows.remote

    calls = []

    def trigger(parameters, **options):
        calls.append("trigger")
        return flows.remote.RemoteRun("run-id", "run-name", "http://ui/run", "Scheduled")

    def follow(flow_run_id, *, on_state, **options):
        calls.append(f"follow {flow_run_id}")
        for state in states:
            on_state(state)
        raise outcome

    monkeypatch.setattr(flows.remote, "trigger_retrain", trigger)
    monkeypatch.setattr(flows.remote, "follow_run", follow)
    return calls


def test_remote_wait_names_the_run_before_following_and_ctrl_c_leaves_it(monkeypatch):
    """The run's id and URL come first (a training takes an hour); Ctrl-C while following
    stops the following only, and says how to cancel the run that goes on."""
    from typer.testing import CliRunner

    from fer_cli.main import app

    calls = _remote_run_that_follows_with(monkeypatch, KeyboardInterrupt())
    result = CliRunner().invoke(app, ["train", "--remote", "--wait"])
    assert calls == ["trigger", "follow run-id"]
    assert result.exit_code != 0
    assert result.output.index("http://ui/run") < result.output.index("stopped following")
    assert ("stopped following flow run run-id; it goes on (cancel it with "
            "`prefect flow-run cancel run-id`)") in result.output


def test_ctrl_c_after_the_remote_run_ended_says_how_it_ended(monkeypatch):
    """Ctrl-C after `state: Completed` (while its report is read) had said the run "goes
    on" and how to cancel it: it has ended, and the message says how."""
    from prefect.states import Completed, Running
    from typer.testing import CliRunner

    from fer_cli.main import app

    _remote_run_that_follows_with(monkeypatch, KeyboardInterrupt(),
                                  states=[Running(), Completed()])
    result = CliRunner().invoke(app, ["train", "--remote", "--wait"])
    assert result.exit_code != 0
    assert "state: Running\nstate: Completed\n" in result.output
    assert ("stopped reading flow run run-id's report; the run ended Completed (see "
            "http://ui/run)") in result.output
    assert "goes on" not in result.output


def test_ctrl_c_while_the_remote_run_is_created_says_it_may_exist(monkeypatch):
    """Prefect's client retries a struggling server for tens of seconds while it creates
    the run: Ctrl-C then had exited without a word, though the run might be on the server
    and train later, and a second trigger train it twice."""
    from typer.testing import CliRunner

    import flows.remote
    from fer_cli.main import app

    def trigger(parameters, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.remote, "trigger_retrain", trigger)
    result = CliRunner().invoke(app, ["train", "--remote", "--wait"])
    assert result.exit_code != 0
    assert ("stopped while starting the run; the run may have been created: `prefect flow-run "
            "ls --flow-name retrain` shows it, before you trigger another") in result.output


@pytest.mark.parametrize(("outcome", "code"), [
    (RunStillGoing("no worker picked up flow run run-name"), 3),
    (FerError("flow run run-name ended Failed"), 1),
])
def test_remote_wait_exit_code_tells_a_failed_run_from_one_not_ended(monkeypatch, capsys,
                                                                      outcome, code):
    """Exit 1: the run failed. Exit 3: following stopped while the run had not ended, so a
    script retrying on 1 does not queue a second training behind a live one."""
    import fer_cli.main

    _remote_run_that_follows_with(monkeypatch, outcome)
    monkeypatch.setattr(fer_cli.main, "_stop_on_sigterm", list)  # leave pytest's handlers be
    monkeypatch.setattr(sys, "argv", ["fer", "train", "--remote", "--wait"])
    with pytest.raises(SystemExit) as exited:
        fer_cli.main.main()
    assert exited.value.code == code
    assert capsys.readouterr().err.strip() == f"error: {outcome}"


def test_retrain_checks_the_server_it_was_pointed_at_first():
    """`fer retrain` with PREFECT_API_URL set runs the flow on that server: one that does not
    answer is a one-line error before anything starts, not a traceback."""
    result = run_fer("retrain", "--epochs", "1", env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert_one_line_error(result, r"cannot reach the Prefect API at http://127\.0\.0\.1:9/api")


def test_log_lines_show_fers_progress_bare_and_other_libraries_from_warnings_up():
    """On stderr, fer's INFO lines read as plain sentences and a Prefect run's lead with the
    run's name; another library's INFO (Prefect's server too) is left out, its warnings and
    errors say their level, and a logged traceback is kept."""
    from fer_cli.main import _LogLines
    from fer_cli.main import _shown_on_console as shown

    def record(name, level, message, exc_info=None, **extra):
        made = logging.LogRecord(name, level, __file__, 1, message, None, exc_info)
        made.__dict__.update(extra)
        return made

    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    lines = _LogLines()
    progress = record("fer.train", logging.INFO, "member 1 of 3 (seed 1337)")
    assert shown(progress) and lines.format(progress) == "member 1 of 3 (seed 1337)"
    task = record("prefect.task_runs", logging.INFO, "Finished", task_run_name="train-1a2",
                  flow_run_name="calm-otter")
    assert shown(task) and lines.format(task) == "Task run 'train-1a2' - Finished"
    flow = record("prefect.flow_runs", logging.INFO, "Beginning", flow_run_name="calm-otter")
    assert shown(flow) and lines.format(flow) == "Flow run 'calm-otter' - Beginning"
    assert not shown(record("prefect.server.api.server", logging.INFO, "Started"))
    assert not shown(record("httpx", logging.INFO, "HTTP Request: GET"))
    warned = record("tensorflow", logging.WARNING, "retracing")
    assert shown(warned) and lines.format(warned) == "warning: retracing"
    failed = lines.format(record("prefect.flow_runs", logging.ERROR, "task failed", failure))
    assert failed.startswith("error: task failed\nTraceback") and "ValueError: boom" in failed
    try:  # bad input, as Prefect logs a task or flow run that raised it: no traceback
        raise DataError("bad.csv: line 3: expected 2304 pixels")
    except DataError:
        bad_input = sys.exc_info()
    refused = record("prefect.task_runs", logging.ERROR, "Task run failed with exception: "
                     "DataError('bad.csv: line 3: expected 2304 pixels')", bad_input,
                     task_run_name="fetch_data-3c1")
    assert lines.format(refused) == ("error: Task run 'fetch_data-3c1' - Task run failed with "
                                     "exception: DataError('bad.csv: line 3: expected 2304 "
                                     "pixels')")
    from fer.errors import FileWriteError, writing

    try:  # a full disk, said in its message: no traceback either
        with writing(Path("runs/r1/model.keras")):
            raise OSError(28, "No space left on device")
    except FileWriteError:
        full_disk = sys.exc_info()
    stopped = record("prefect.task_runs", logging.ERROR, "Task run failed", full_disk,
                     task_run_name="train-9f0")
    assert lines.format(stopped) == "error: Task run 'train-9f0' - Task run failed"


def test_a_path_option_after_an_equals_sign_has_its_home_expanded(tmp_path):
    """`--model=~/m.keras` and `--resume=~/runs/x` reach fer with ~ as typed (a shell
    expands it only at a word's start): expanded, as --out's and --data's are, before the
    existence check, which had called them missing."""
    home = tmp_path / "home"
    (home / "runs").mkdir(parents=True)
    (home / "m.keras").write_bytes(b"not a zip")
    (tmp_path / "face.png").write_bytes(encode_image(np.zeros((48, 48), np.uint8)))
    env = {"HOME": str(home)}
    found = run_fer("predict", tmp_path / "face.png", "--model=~/m.keras", env=env)
    assert_one_line_error(found, r"m\.keras: not a zip archive")  # read: past the check
    missing = usage_error(run_fer("train", "--resume=~/runs/none", env=env))
    assert f"Directory'{home}/runs/none'doesnotexist." in missing.replace(" ", "")  # folded
    folder = usage_error(run_fer("evaluate", "--model=~/runs", env=env))
    assert "is a directory." in folder


def test_usage_errors_are_reported_by_click(tmp_path):
    """Out-of-range numbers and missing files are rejected before anything runs."""
    result = run_fer("train", "--epochs", "0")
    assert result.returncode == 2 and "Invalid value for '--epochs'" in result.stderr
    result = run_fer("train", "--ensemble", "0")
    assert result.returncode == 2 and "Invalid value for '--ensemble'" in result.stderr
    result = run_fer("predict", tmp_path / "none.jpg", "--model", tmp_path / "none.keras")
    assert result.returncode == 2 and "does not exist" in result.stderr
    # A mistyped huge batch (it had overflowed TensorFlow's int64, in a traceback).
    (tmp_path / "face.png").write_bytes(b"png")
    (tmp_path / "m.keras").write_bytes(b"zip")
    for command in (["train"], ["predict", tmp_path / "face.png", "--model", tmp_path / "m.keras"]):
        result = run_fer(*command, "--batch-size", "99999999999999999999")
        assert result.returncode == 2 and "Invalid value for '--batch-size'" in result.stderr


def test_evaluate_names_a_bad_model_before_reading_the_data(tmp_path, data_dir):
    """A --model that is not a fer model fails in one line before the data is fetched or
    decoded (minutes for FER2013's first download), not after."""
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    result = run_fer("evaluate", "--model", tmp_path / "junk.keras",
                     "--data", tmp_path / "nowhere.zip")
    assert_one_line_error(result, r"junk\.keras: not a zip archive, as a \.keras model is")


def test_evaluate_refuses_a_model_of_other_classes_before_reading_the_data(tmp_path):
    """A Keras model of fer's shape whose classes are not FER2013's (another project's)
    fails in one line before the data is fetched, not after scoring the whole test split."""
    from fer.models import get_spec

    model = get_spec("default").build()
    model.get_layer("class_names").class_names[-1] = "contempt"
    model.save(tmp_path / "other.keras")
    result = run_fer("evaluate", "--model", tmp_path / "other.keras",
                     "--data", tmp_path / "nowhere.zip")
    assert_one_line_error(result, r"the model's classes \['contempt'\] are not FER2013 classes")


def test_predict_and_evaluate_score_in_float32_where_float16_overflows(tmp_path):
    """A model whose logits pass float16's 65,504 scores NaN in mixed_float16 (a GPU's
    `auto`): `fer train` scored such a run in float32 with a warning, but `fer predict` and
    `fer evaluate` stopped with an error blaming the training. They fall back alike now,
    and evaluate's metrics.json records the precision it scored in."""
    from fer.models import get_spec

    model = get_spec("default").build()
    head = model.layers[-3]  # the logits: Dense, then softmax and the class names
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + np.where(np.arange(len(bias)) == 3, 1e5, 0.0)])
    model.save(tmp_path / "model.keras")
    data = write_image_tree(tmp_path / "faces", splits=("test",))
    face = next((data / "test" / "sad").iterdir())
    warning = "the model's scores overflow in mixed_float16 on the {}; scoring it in float32"
    predicted = run_fer("predict", face, "--model", tmp_path / "model.keras", "--json",
                        "--precision", "mixed_float16")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["emotion"] == "happy"
    assert warning.format("images") in predicted.stderr
    assert "inference_precision" not in predicted.stderr  # predict writes no report
    evaluated = run_fer("evaluate", "--model", tmp_path / "model.keras", "--data", data,
                        "--precision", "mixed_float16", env={"FER_DATA_DIR": str(tmp_path / "d")})
    assert evaluated.returncode == 0, evaluated.stderr
    assert warning.format("test split") in evaluated.stderr
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["inference_precision"] == "float32"
    assert metrics["accuracy"] == pytest.approx(1 / 7, abs=1e-4)  # all said happy
    assert metrics["test_images_seen_in_training"] is None  # no run beside it: cannot tell


def test_a_model_broken_in_bfloat16_is_not_said_to_overflow(tmp_path):
    """bfloat16 has float32's range: non-finite scores in mixed_bfloat16 (an AVX512_BF16
    CPU's `auto`) are the model's, not the precision's. `fer predict` and `fer evaluate` had
    warned "the model's scores overflow in mixed_bfloat16; scoring it in float32", loaded
    and scored it again, then failed in float32."""
    from fer.models import get_spec

    model = get_spec("default").build()
    head = model.layers[-3]  # the logits
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + np.nan])
    model.save(tmp_path / "model.keras")
    data = write_image_tree(tmp_path / "faces", splits=("test",))
    face = next((data / "test" / "sad").iterdir())
    predicted = run_fer("predict", face, "--model", tmp_path / "model.keras",
                        "--precision", "mixed_bfloat16")
    evaluated = run_fer("evaluate", "--model", tmp_path / "model.keras", "--data", data,
                        "--precision", "mixed_bfloat16", env={"FER_DATA_DIR": str(tmp_path / "d")})
    for result in (predicted, evaluated):
        assert_one_line_error(result, r"non-finite scores .*\(did its training diverge\? see "
                                      r"its history\.csv\)$")
        assert "overflow" not in result.stderr


def test_predict_classifies_a_file_given_twice_once_however_it_is_spelt(tmp_path):
    """README: a file given twice is classified once, where first given; `a.png` beside
    its absolute path, a `..` spelling or a link to it had been classified each time."""
    from fer.models import get_spec

    get_spec("default").build().save(tmp_path / "model.keras")
    (tmp_path / "faces").mkdir()
    face = tmp_path / "faces" / "a.png"
    face.write_bytes(encode_image(shaded_image("happy")))
    (tmp_path / "link.png").symlink_to(face)
    result = run_fer("predict", "a.png", face, "../faces/a.png", tmp_path / "link.png",
                     "--model", tmp_path / "model.keras", "--json", cwd=tmp_path / "faces")
    assert result.returncode == 0, result.stderr
    assert [record["file"] for record in json.loads(result.stdout)] == ["a.png"]


def test_predict_names_each_file_as_it_was_given(tmp_path):
    """`./a.png` and `faces//b.png` are printed so, in --json records and text lines alike,
    and so is an unreadable `./notes.txt` in its error: `find . -name '*.png' -exec fer
    predict {} +` gives `./` names, and a script matching records to them found none while
    the command line's Path printed them as `a.png` and `faces/b.png`."""
    from fer.models import get_spec

    get_spec("default").build().save(tmp_path / "model.keras")
    (tmp_path / "faces").mkdir()
    for name in ("a.png", "faces/b.png"):
        (tmp_path / name).write_bytes(encode_image(shaded_image("happy")))
    (tmp_path / "notes.txt").write_text("hello")
    given, model = ["./a.png", "faces//b.png"], ("--model", tmp_path / "model.keras")
    as_json = run_fer("predict", *given, *model, "--json", cwd=tmp_path)
    as_text = run_fer("predict", *given, *model, cwd=tmp_path)
    refused = run_fer("predict", "./notes.txt", *model, cwd=tmp_path)
    assert as_json.returncode == 0 and as_text.returncode == 0, as_json.stderr + as_text.stderr
    assert [record["file"] for record in json.loads(as_json.stdout)] == given
    assert [line.split(": ")[0] for line in as_text.stdout.splitlines()] == given
    assert_one_line_error(refused, r"^error: \./notes\.txt: not a decodable image")


def test_predict_names_every_unreadable_image_before_loading_the_model(tmp_path):
    """`fer predict` reads the images before the model: here the model file is junk too,
    and the error is about the images, all of them, in lines without a traceback."""
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    result = run_fer("predict", tmp_path / "notes.txt", tmp_path / "empty.png",
                     "--model", tmp_path / "junk.keras")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[0] == "error: 2 of 2 files cannot be read as images:"
    assert "notes.txt: not a decodable image" in result.stderr
    assert "empty.png: not a decodable image" in result.stderr and "junk" not in result.stderr


def test_predict_prints_a_file_name_that_is_not_utf8(tmp_path):
    """An image saved by a tool writing Latin-1 names (`café.png` as bytes 63 61 66 e9): its
    line is printed with the byte escaped (printing it raised UnicodeEncodeError after the
    model had run, a traceback), and so is its --json record's `file` (it was a lone
    surrogate, `\\udce9`, which jq turns into U+FFFD and strict JSON parsers refuse)."""
    from conftest import encode_image, shaded_image

    from fer.models import get_spec

    get_spec("default").build().save(tmp_path / "model.keras")
    image = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(image, "wb") as handle:
        handle.write(encode_image(shaded_image("happy")))
    result = subprocess.run([*FER, "predict", os.fsdecode(image), "--model",
                             str(tmp_path / "model.keras")], capture_output=True,
                            env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith(f"{tmp_path}/caf\\xe9.png: ")
    as_json = subprocess.run([*FER, "predict", os.fsdecode(image), "--model",
                              str(tmp_path / "model.keras"), "--json"], capture_output=True,
                             env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
                             timeout=300, check=False)
    assert as_json.returncode == 0, as_json.stderr.decode()
    assert "\\ud" not in as_json.stdout.decode()
    assert [record["file"] for record in json.loads(as_json.stdout)] == [
        f"{tmp_path}/caf\\xe9.png"]


def test_resume_takes_no_options_of_its_own(tmp_path):
    """--resume continues with the options the run recorded; giving others is a usage error."""
    result = run_fer("train", "--resume", tmp_path, "--epochs", "3", "--seed", "2")
    assert result.returncode == 2, result.stderr
    assert "leave out --epochs, --seed" in " ".join(result.stderr.split())
    # named as typed: it had said "leave out --tta" to a user who typed --no-tta
    assert "leave out --no-tta" in usage_error(run_fer("train", "--resume", tmp_path, "--no-tta"))


def test_resume_refuses_an_endpoint_it_would_not_use(tmp_path):
    """A resumed run reads the local copy of its data, so --endpoint-url only serves
    --publish or an s3:// copy of the data; without them it would be accepted and ignored."""
    result = run_fer("train", "--resume", tmp_path, "--endpoint-url", "http://127.0.0.1:9",
                     "--data", tmp_path)
    assert ("the endpoint is used only to read an s3:// --data copy of the run's data, or with "
            "--publish" in usage_error(result))


def test_a_run_whose_data_is_gone_resumes_on_a_copy_named_with_data(tmp_path, monkeypatch):
    """The folder a stopped run trained on is gone where it is resumed (another machine,
    another FER_DATA_DIR): that had been a dead end, since --data was refused beside
    --resume. The error now says to pass a copy with --data; a copy whose sha256 differs is
    refused, and the run's own data moved elsewhere resumes it to the end."""
    from test_checkpoint import EpochSpy, stopped_run

    from fer.config import TrainConfig
    from fer.data import load_dataset

    data = write_image_tree(tmp_path / "faces", per_class=10)
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path / "runs", precision="float32")
    dataset = load_dataset(data, cache_dir=tmp_path / "cache")
    run_dir = stopped_run(tmp_path / "runs", dataset, config, EpochSpy(monkeypatch, stop_at=2))
    moved = data.rename(tmp_path / "faces-moved")
    env = {"FER_DATA_DIR": str(tmp_path / "cache")}
    assert_one_line_error(run_fer("train", "--resume", run_dir, env=env),
                          rf"the data it trained on, {re.escape(str(data))}, is gone; pass a "
                          r"copy of it \(data sha256 [0-9a-f]{12}\.\.\.\) with --data$")
    other = write_image_tree(tmp_path / "other", per_class=11)
    assert_one_line_error(run_fer("train", "--resume", run_dir, "--data", other, env=env),
                          r"it can only resume on the data it began with$")
    resumed = run_fer("train", "--resume", run_dir, "--data", moved, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"\nrun {run_dir.name}: test accuracy " in resumed.stdout  # after Keras' epoch 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_at_epochs"] == {"member 1": [1]}
    assert manifest["data"]["source"] == str(moved)


def test_a_run_resumed_on_a_copy_names_the_copy_if_it_stops_again(tmp_path, monkeypatch, caplog):
    """A second stop of a run resumed with --data logs a resume command that reads the same
    copy: without --data it would meet the recorded path, gone, again."""
    from test_checkpoint import EpochSpy, stopped_run

    from fer.config import Settings, TrainConfig
    from fer.data import load_dataset
    from fer_cli.main import _resume_locally

    data = write_image_tree(tmp_path / "faces", per_class=10)
    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path / "runs", precision="float32")
    dataset = load_dataset(data, cache_dir=tmp_path / "cache")
    run_dir = stopped_run(tmp_path / "runs", dataset, config, EpochSpy(monkeypatch, stop_at=2))
    moved = data.rename(tmp_path / "faces moved")
    EpochSpy(monkeypatch, stop_at=3)
    settings = Settings.from_env({"FER_DATA_DIR": str(tmp_path / "cache")})
    with caplog.at_level("INFO", logger="fer"), pytest.raises(KeyboardInterrupt):
        _resume_locally(run_dir, data=str(moved), settings=settings, resume_flags="--publish")
    assert f"`fer train --resume {run_dir} --publish --data '{moved}'`" in caplog.text


def test_a_run_begun_with_a_fraction_outside_todays_range_resumes(tmp_path, monkeypatch):
    """A flow run begun with val_fraction 0.95 (flows took (0, 1) before the range) and
    stopped: `fer train --resume` had refused it for a fraction the user never gave."""
    from test_checkpoint import EpochSpy, stopped_run

    import fer.options
    from fer.checkpoint import is_complete
    from fer.config import Settings, TrainConfig
    from fer.data import load_dataset
    from fer_cli.main import _resume_locally

    monkeypatch.setattr(fer.options, "VAL_FRACTION_RANGE", (0.01, 0.99))  # the older fer's
    data = write_image_tree(tmp_path / "faces", per_class=20)
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path / "runs", val_fraction=0.95,
                         precision="float32")
    dataset = load_dataset(data, val_fraction=0.95, cache_dir=tmp_path / "cache")
    run_dir = stopped_run(tmp_path / "runs", dataset, config, EpochSpy(monkeypatch, stop_at=2))
    monkeypatch.setattr(fer.options, "VAL_FRACTION_RANGE", (0.01, 0.9))  # this fer's
    settings = Settings.from_env({"FER_DATA_DIR": str(tmp_path / "cache")})
    _resume_locally(run_dir, data=None, settings=settings)
    assert is_complete(run_dir)


@pytest.mark.parametrize("command", [
    ["train", "--data", "{folder}"],
    ["train"],
    ["fetch-data", "--source", "{folder}"],
    ["fetch-data", "--source", "https://127.0.0.1:9/fer2013.zip"],
    ["evaluate", "--model", "{file}", "--data", "{folder}"],
])
def test_an_endpoint_nothing_reaches_is_refused(tmp_path, command):
    """--endpoint-url reaches S3 only for an s3:// source (or train's --publish); given with
    a local folder or an http(s) URL it was accepted and ignored, so a user who meant to read
    the dataset from the store got another one without a word."""
    (tmp_path / "model.keras").write_bytes(b"")
    paths = {"{folder}": str(tmp_path), "{file}": str(tmp_path / "model.keras")}
    result = run_fer(*(paths.get(word, word) for word in command),
                     "--endpoint-url", "http://127.0.0.1:9", env={"FER_DATA_DIR": str(tmp_path)})
    assert re.search(r"Invalid value for --endpoint-url: the endpoint is used only to read an "
                     r"s3:// --(data|source)", usage_error(result))


@pytest.mark.parametrize("command", [
    ["publish", "{folder}"],
    ["reports", "list"],
    ["reports", "show"],
    ["reports", "get", "latest"],
    ["train", "--publish", "--data", "{folder}"],
    ["retrain", "--data", "{folder}"],
])
def test_an_endpoint_beside_a_folder_store_is_refused(tmp_path, command):
    """--endpoint-url with the store a folder (--storage, FER_STORAGE or ./artifacts): it
    was ignored, and the folder was published to or read (`no published runs`) instead of
    the S3 store the user meant; a train's s3:// --data would still use it."""
    paths = {"{folder}": str(tmp_path)}
    result = run_fer(*(paths.get(word, word) for word in command),
                     "--endpoint-url", "http://127.0.0.1:9", cwd=tmp_path,
                     env={"FER_DATA_DIR": str(tmp_path), "FER_STORAGE": str(tmp_path / "store")})
    assert re.search(r"Invalid value for --endpoint-url: the store, .*store, is a folder; the "
                     r"endpoint is used only for an s3:// store or data \(the store from "
                     r"FER_STORAGE\)", usage_error(result))
    assert not (tmp_path / "store").exists()


def test_a_blank_fer_storage_is_named_as_the_default_it_reads_as(tmp_path):
    """FER_STORAGE of whitespace reads as unset: the store is ./artifacts, which the
    message names as the default, not as FER_STORAGE's."""
    result = run_fer("reports", "list", "--endpoint-url", "http://127.0.0.1:9", cwd=tmp_path,
                     env={"FER_STORAGE": " "})
    assert re.search(r"the store, \./artifacts, is a folder; .* \(the store from the "
                     r"default\)", usage_error(result))


def test_an_endpoint_beside_a_folder_store_still_reads_an_s3_data(tmp_path):
    """Train's s3:// --data is read through the endpoint: not refused with a folder store
    (here it fails on the dead endpoint instead, credentials given)."""
    result = run_fer("train", "--publish", "--data", "s3://bucket/fer2013.zip", "--endpoint-url",
                     "http://127.0.0.1:9", cwd=tmp_path,
                     env={"FER_DATA_DIR": str(tmp_path), "FER_STORAGE": str(tmp_path / "store"),
                          "AWS_ACCESS_KEY_ID": "fer", "AWS_SECRET_ACCESS_KEY": "fer-secret"})
    assert_one_line_error(result, r"cannot reach S3 endpoint http://127\.0\.0\.1:9 while "
                                  r"reading fer2013\.zip")


def test_an_empty_data_beside_an_endpoint_is_named_as_empty():
    """`--data "$DATA" --endpoint-url "$E"` with DATA unset: the empty source is the
    mistake, not the endpoint it left unused."""
    result = run_fer("train", "--data", "", "--endpoint-url", "http://127.0.0.1:9")
    assert_one_line_error(result, r"data source '' is empty: expected a path")


@pytest.mark.parametrize(("command", "problem"), [
    (["train", "--out", "{file}"], r"--out .*taken: .*taken is a file, not a folder"),
    (["evaluate", "--model", "{file}", "--out", "{file}/reports"],
     r"--out .*taken/reports: .*taken is a file, not a folder"),
    (["retrain", "--out", "{file}/runs"], r"--out .*taken/runs: .*taken is a file"),
    # `--out=~/...`, which the shell leaves as it is: the home folder's, checked as such
    (["train", "--out=~/taken"], r"--out .*taken: .*taken is a file, not a folder"),
    (["evaluate", "--model", "{file}", "--out=~/taken/reports"],
     r"--out .*taken/reports: .*taken is a file, not a folder"),
    (["retrain", "--out=~/taken/runs"], r"--out .*taken/runs: .*taken is a file"),
])
def test_an_unwritable_folder_is_one_line_before_any_work(tmp_path, data_dir, command, problem):
    """--out that is a file (or under one) fails in a line naming the option, before the
    data is fetched, not with a traceback after the training."""
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    result = run_fer(*[arg.replace("{file}", str(taken)) for arg in command],
                     "--data", tmp_path / "nowhere.zip", env={"HOME": str(tmp_path)})
    assert_one_line_error(result, problem)


def test_a_read_only_data_folder_serves_its_current_dataset(tmp_path, data_dir, monkeypatch):
    """A data folder provisioned read-only after `fer fetch-data` (a volume mounted `:ro`)
    was refused by `fer evaluate` before its current dataset was read. Tests run as root,
    whom no permission bit stops, so the data folder's check is made to refuse it, as it
    does for another user: evaluate reads the dataset all the same, and only a command that
    would fetch into the folder is refused."""
    from typer.testing import CliRunner

    import fer.fetch
    from fer.errors import FerError as Refused
    from fer.models import get_spec
    from fer_cli.main import app

    fer.fetch.fetch_data(str(write_image_tree(tmp_path / "faces")), data_dir=data_dir)
    get_spec("default").build().save(tmp_path / "model.keras")

    import fer_cli.main
    from fer.config import check_writable

    def read_only(folder, what):  # the data folder only: --out is written
        if what == "FER_DATA_DIR":
            raise Refused(f"{what} {folder}: not writable by this user")
        return check_writable(folder, what)

    for module in (fer.fetch, fer_cli.main):
        monkeypatch.setattr(module, "check_writable", read_only)
    result = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "model.keras")])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path / "model.keras"),
                                      "--data", "https://127.0.0.1:9/fer.zip"])
    assert "FER_DATA_DIR" in str(result.exception) and "not writable" in str(result.exception)


def test_an_unwritable_data_folder_is_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    result = run_fer("fetch-data", "--source", tmp_path / "x.zip", env={"FER_DATA_DIR": str(taken)})
    assert_one_line_error(result, r"FER_DATA_DIR .*taken: .*taken is a file, not a folder")


@pytest.mark.integration
@pytest.mark.parametrize("stop, publishing", [(signal.SIGTERM, False), (signal.SIGHUP, True)],
                         ids=["sigterm", "sighup-publishing"])
def test_sigterm_stops_a_training_as_ctrl_c_does(tmp_path, data_dir, fer_subset, stop,
                                                  publishing):
    """`kill`, `timeout` or `docker stop` (SIGTERM), or a closed terminal or ssh session
    (SIGHUP), mid-training: the log names the resume command (Python's default would die
    silently) and the exit status is the signal's, 143 or 129. A run that was to be
    published is told to resume with its publishing options: the run does not record them,
    and `--resume` alone would train it and publish nothing."""
    from run_folders import epochs_done

    runs = tmp_path / "runs"
    flags = (["--publish", "--storage", str(tmp_path / "my store"), "--force-champion"]
             if publishing else [])
    process = subprocess.Popen([*FER, "train", "--epochs", "30", "--data", str(fer_subset),
                                "--out", str(runs), *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               # as from a terminal, even where this runs under nohup
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while epochs_done(runs) < 1 and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    (run_dir,) = runs.iterdir()
    assert process.returncode == 128 + stop, stderr
    again = (f" --publish --storage '{tmp_path / 'my store'}' --force-champion"
             if publishing else "")
    assert f"`fer train --resume {run_dir}{again}` continues it" in stderr
    assert "Traceback" not in stderr
    assert epochs_done(runs) >= 1


@pytest.mark.parametrize("command", [["train", "--data", "missing.csv"],
                                     ["evaluate", "--model", "model.keras",
                                      "--data", "missing.csv"]])
def test_an_out_folder_that_links_to_nothing_is_named(tmp_path, data_dir, command):
    """--out a link to a folder that is not there (an unmounted disk): named before any data
    is read; train had failed after decoding, on "every run id tried was taken", and
    evaluate with a FileExistsError traceback after scoring the test split."""
    (tmp_path / "model.keras").write_bytes(b"not read")
    (tmp_path / "runs").symlink_to(tmp_path / "mnt" / "runs")
    result = run_fer(*command, "--out", "runs/sub", cwd=tmp_path)
    assert_one_line_error(result, r"--out runs/sub: runs is a link to .*mnt/runs, which does "
                                  r"not exist \(a disk not mounted\?\)")


def test_an_error_naming_a_file_whose_name_is_not_utf8_prints_it_escaped(tmp_path):
    """A Latin-1 `café` in an error's path is printed as `caf\\xe9`, as fer's other output
    prints such names (the error line printed `caf\\udce9`)."""
    import os

    latin1 = os.fsdecode(b"caf\xe9")
    (tmp_path / latin1).write_text("a file, not a folder")
    result = run_fer("train", "--out", f"{latin1}/runs", "--data", "missing.csv", cwd=tmp_path)
    assert_one_line_error(result, r"--out caf\\xe9/runs: caf\\xe9 is a file, not a folder")


def test_train_publish_to_a_store_it_cannot_write_fails_before_training(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = run_fer("train", "--epochs", "1", "--data", tmp_path / "no-data.zip", "--publish",
                     "--storage", tmp_path / "taken" / "store",
                     env={"FER_DATA_DIR": str(tmp_path / "data")})
    assert_one_line_error(result, r"cannot write .*taken/store/\.fer-write-check: ")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_train_publish_into_the_folder_stores_runs_fails_before_training(tmp_path):
    """FER_STORAGE=. with the default --out runs (or --out <store>/runs): the run folder
    would be read as a published run there; publishing failed after the training. A resume
    of a run in there is refused as well."""
    result = run_fer("train", "--epochs", "1", "--data", tmp_path / "no-data.zip", "--publish",
                     env={"FER_DATA_DIR": str(tmp_path / "data"), "FER_STORAGE": "."},
                     cwd=tmp_path)
    assert_one_line_error(result, r"runs: is where the store \. keeps its published runs; a "
                                  r"run folder there cannot be published to it")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    (tmp_path / "runs" / "20250101-000000-default-aaaa").mkdir(parents=True)
    result = run_fer("train", "--resume", "runs/20250101-000000-default-aaaa", "--publish",
                     env={"FER_STORAGE": str(tmp_path)}, cwd=tmp_path)
    assert_one_line_error(result, r"keeps its published runs")
    # `--out=~/runs` (the shell leaves that ~ as it is) is the home folder's runs/
    result = run_fer("train", "--epochs", "1", "--data", tmp_path / "no-data.zip", "--publish",
                     "--out=~/runs", env={"HOME": str(tmp_path), "FER_STORAGE": str(tmp_path)},
                     cwd=tmp_path / "runs")
    assert_one_line_error(result, rf"^error: {re.escape(str(tmp_path / 'runs'))}: is where the "
                                  "store")


def test_fer_models_lists_the_registry():
    from fer.models import REGISTRY

    listed = run_fer("models")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(REGISTRY)
    assert {"seed", "mini-xception", "default"} <= set(REGISTRY)


@pytest.mark.parametrize("options", [["--force-champion"], ["--storage", "s3://b/p"],
                                     ["--create-bucket", "--force-champion"]])
def test_publishing_options_without_publish_are_refused(options):
    """They would be ignored: the user believes the run goes to the store, or becomes the
    champion, and it stays in runs/."""
    message = usage_error(run_fer("train", "--epochs", "1", *options))
    assert "no effect unless the run is published; add --publish" in message
    assert all(option in message for option in options if option.startswith("--"))


def test_the_no_forms_of_publishing_flags_are_accepted_without_publish(tmp_path):
    """`--no-force-champion` / `--no-create-bucket` (for a --remote run) turn off what a
    local run without --publish has off anyway: harmless, not refused as "--force-champion
    has no effect", a flag the user never typed; the command goes on to its data."""
    result = run_fer("train", "--epochs", "1", "--no-force-champion", "--no-create-bucket",
                     "--data", tmp_path / "nowhere.zip", env={"FER_DATA_DIR": str(tmp_path / "d")})
    assert_one_line_error(result, r"nowhere\.zip: data source not found")


@pytest.mark.integration
@pytest.mark.parametrize("given_by", ["--storage", "FER_STORAGE"])
def test_a_publish_failing_after_training_names_the_command_that_publishes_the_run(
        tmp_path, monkeypatch, given_by):
    """The store takes the check before training, then refuses the run's files (here its
    runs/ is a file): the error says the run is whole and which command publishes it; that
    command does, once the store is mended, from a shell without FER_STORAGE too (a store
    the environment named was left out of it, so it published to ./artifacts)."""

    from run_folders import make_run
    from typer.testing import CliRunner

    import fer_cli.main
    from fer.train import RunResult

    run_dir = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.7)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    monkeypatch.setattr(fer_cli.main, "_train_locally", lambda *args, **kwargs: RunResult(
        run_dir.name, run_dir, {**metrics, "macro_f1": 0.6}))
    monkeypatch.setattr(fer_cli.main, "_tensorflow_for_training", lambda: None)
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path / "data"))
    store = tmp_path / "my store"
    store.mkdir()
    (store / "runs").write_text("not a folder")
    if given_by == "FER_STORAGE":
        monkeypatch.setenv("FER_STORAGE", str(store))
    result = CliRunner().invoke(fer_cli.main.app, [
        "train", "--out", str(tmp_path / "runs"), "--publish",
        *(["--storage", str(store)] if given_by == "--storage" else [])])
    assert result.exit_code == 1 and isinstance(result.exception, FerError)
    named = f"`fer train --resume {run_dir} --publish --storage '{store}'`"
    assert str(result.exception).endswith(f"; the run is complete in {run_dir}: once the "
                                          f"cause is fixed, {named} publishes it"
                                          ), result.exception
    (store / "runs").unlink()
    monkeypatch.delenv("FER_STORAGE", raising=False)
    again = run_fer(*shlex.split(named.strip("`"))[1:], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"published {run_dir.name}" in again.stdout


def test_a_stop_while_publishing_names_the_command_that_publishes_the_run(tmp_path,
                                                                          monkeypatch, caplog):
    """Ctrl-C (or SIGTERM) during the upload after training: the log names the command that
    publishes the complete run, as a stop during training names its resume (it said
    nothing)."""
    from run_folders import make_run
    from typer.testing import CliRunner

    import fer_cli.main
    from fer.train import RunResult

    run_dir = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.7)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    monkeypatch.setattr(fer_cli.main, "_train_locally", lambda *args, **kwargs: RunResult(
        run_dir.name, run_dir, {**metrics, "macro_f1": 0.6}))
    monkeypatch.setattr(fer_cli.main, "_tensorflow_for_training", lambda: None)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fer_cli.main, "_publish", interrupted)
    monkeypatch.setenv("FER_DATA_DIR", str(tmp_path / "data"))
    store = tmp_path / "store"
    with caplog.at_level("WARNING", logger="fer"):
        result = CliRunner().invoke(fer_cli.main.app, [
            "train", "--out", str(tmp_path / "runs"), "--publish", "--storage", str(store)])
    assert result.exit_code != 0
    assert (f"publishing stopped; the run is complete in {run_dir}: `fer train --resume "
            f"{run_dir} --publish --storage {store}` publishes it") in caplog.text


def test_train_resume_continues_a_stopped_run(tmp_path, data_dir, fer_subset, monkeypatch):
    """A run stopped by Ctrl-C after epoch 1 of 3, then `fer train --resume runs/<id>` as a
    user types it: it reads the data the run recorded, trains epochs 2-3, scores the test
    split and leaves the complete run folder."""
    from test_checkpoint import EpochSpy

    from fer.config import TrainConfig
    from fer.data import load_dataset
    from fer.train import train

    # another split seed than the default: the resume must carve the split the run recorded
    # (its pixel check refuses another)
    dataset = load_dataset(fer_subset, cache_dir=data_dir, seed=11)
    EpochSpy(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        train(dataset, TrainConfig(epochs=3, seed=3, split_seed=11, out_dir=tmp_path / "runs"),
              verbose=0)
    (run_dir,) = (tmp_path / "runs").iterdir()

    # `fer train --resume`, recording whether TensorFlow was loaded when fer asked for its
    # oneDNN kernels (it reads the switch once, at import; a CPU without AVX512 then trains
    # without them, 1.5x slower): the run's record alone cannot tell on a CPU that has them
    asked = tmp_path / "onednn-asked-with-tensorflow-loaded"
    fer_spying = (
        "import sys, fer.precision as precision\n"
        "original = precision.prefer_onednn\n"
        "def spy(*args, **kwargs):\n"
        f"    open({str(asked)!r}, 'a').write(str('tensorflow' in sys.modules) + '\\n')\n"
        "    return original(*args, **kwargs)\n"
        "precision.prefer_onednn = spy\n"
        "from fer_cli.main import main\n"
        "sys.argv = ['fer', *sys.argv[1:]]\n"
        "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run([sys.executable, "-c", fer_spying, "train", "--resume",
                             str(run_dir)], capture_output=True, text=True, env=env,
                            timeout=600, check=False)

    assert result.returncode == 0, result.stderr
    assert asked.read_text().splitlines()[0] == "False"
    assert "resuming after epoch 1 of 3" in result.stderr
    assert f"run {run_dir.name}: test accuracy" in result.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_at_epochs"] == {"member 1": [1]}
    assert manifest["data"]["source"] == str(fer_subset)
    assert "seed 11," in manifest["data"]["validation"]


@pytest.mark.integration
def test_a_full_disk_at_a_checkpoint_is_one_error_line_and_the_run_resumes(tmp_path, data_dir,
                                                                            fer_subset):
    """A write limit the weights file exceeds (as a full disk would refuse it; h5py's error is
    a multi-line dump without the file's name): the error line names the checkpoint file and
    the cause, the log names the resume command, no traceback; with room again, the resume
    finishes the run."""
    import resource

    def one_megabyte_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    stopped = subprocess.run(
        [*FER, "train", "--epochs", "2", "--batch-size", "32", "--data", str(fer_subset),
         "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600,
        env=os.environ, preexec_fn=one_megabyte_files, check=False)

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert stopped.returncode == 1, stopped.stderr
    assert "Traceback" not in stopped.stderr + stopped.stdout
    assert f"`fer train --resume {run_dir}` continues it" in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: the run stopped: {re.escape(str(run_dir))}/checkpoint/\S+"
                        r"\.weights\.h5: File too large; make room .*", last), last
    resumed = run_fer("train", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)


@pytest.mark.integration
def test_a_run_file_that_cannot_be_written_is_one_error_line_and_the_run_resumes(
        tmp_path, data_dir, fer_subset, monkeypatch):
    """The run's own files after training (curves) and after scoring (the report), and
    `fer evaluate`'s reports: a write that fails (a directory in the file's place here, a
    full disk alike) is one line naming the file, without a traceback (Keras', matplotlib's
    and open()'s errors name no file, or not in one line), and the run resumes once the
    cause is gone."""
    from test_checkpoint import EpochSpy

    from fer.config import TrainConfig
    from fer.data import load_dataset
    from fer.train import train

    EpochSpy(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        train(load_dataset(fer_subset, cache_dir=data_dir),
              TrainConfig(epochs=2, batch_size=32, out_dir=tmp_path / "runs"), verbose=0)
    (run_dir,) = (tmp_path / "runs").iterdir()

    for blocked, logged in (("curves.png", "training stopped; `fer train --resume {}` "
                                           "continues it"),
                            ("classification_report.txt", "scoring stopped; `fer train "
                                                          "--resume {}` finishes the run")):
        (run_dir / blocked).mkdir()
        failed = run_fer("train", "--resume", run_dir)
        assert failed.returncode == 1, failed.stderr
        assert "Traceback" not in failed.stderr + failed.stdout
        assert logged.format(run_dir) in failed.stderr, failed.stderr
        assert failed.stderr.strip().splitlines()[-1] == (
            f"error: the run stopped: {run_dir / blocked}: Is a directory; make room (or fix "
            "the cause), then resume it as logged above")
        (run_dir / blocked).rmdir()
    resumed = run_fer("train", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)

    evaluation = tmp_path / "evaluation"
    (evaluation / "confusion_matrix.png").mkdir(parents=True)
    refused = run_fer("evaluate", "--model", run_dir / "model.keras", "--data", fer_subset,
                      "--out", evaluation)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {evaluation / 'confusion_matrix.png'}: Is a directory")


@pytest.mark.integration
def test_end_to_end_train_evaluate_predict(tmp_path, data_dir, fer_subset, monkeypatch):
    """fetch-data, train 1 epoch, evaluate and predict on a real FER2013 subset."""
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)  # the CLI's own choice
    fetched = run_fer("fetch-data", "--source", fer_subset)
    assert fetched.returncode == 0, fetched.stderr
    # The sha256 printed for the file is the one --sha256 accepts next time.
    archive_sha256 = file_sha256(fer_subset)
    assert (f"sha256 of fer2013-subset.zip: {archive_sha256} (what --sha256 checks)"
            in fetched.stdout), fetched.stdout
    again = run_fer("fetch-data", "--source", fer_subset, "--sha256", archive_sha256)
    assert again.returncode == 0, again.stderr
    data_sha256 = re.search(r"^data sha256: ([0-9a-f]{64}) ", fetched.stdout, re.MULTILINE)[1]

    storage = {"FER_STORAGE": str(tmp_path / "artifacts")}
    trained = run_fer("train", "--epochs", "1", "--batch-size", "32", "--out", tmp_path / "runs",
                      "--seed", "9", "--publish", env=storage)
    assert trained.returncode == 0, trained.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    assert "val_accuracy" in trained.stdout  # per-epoch progress with validation accuracy
    # what trains, its precision and why, and what the run chose, on stderr, unprefixed
    assert re.search(r"^training model default: 1 epoch, batch size 32, (float32|mixed_b?float16) "
                     r"\(auto: ",
                     trained.stderr, re.MULTILINE), trained.stderr
    assert re.search(r"^best validation accuracy 0\.\d{4} at epoch 1 of 1$", trained.stderr,
                     re.MULTILINE), trained.stderr
    shown = run_fer("reports", "show", "latest", env=storage)
    assert shown.returncode == 0 and f"run {run_dir.name}" in shown.stdout
    assert (run_dir / "classification_report.txt").read_text().strip() in shown.stdout

    with zipfile.ZipFile(fer_subset) as handle:
        test_counts = {n: sum(1 for e in handle.namelist() if e.startswith(f"test/{n}/"))
                       for n in CLASS_NAMES}
    report = json.loads((run_dir / "classification_report.json").read_text())
    assert {n: int(report[n]["support"]) for n in CLASS_NAMES} == test_counts
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["epochs"] == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["parameters"]["batch_size"] == 32
    # another training seed, the same split as every run of the default split seed: the
    # champion rule compares runs within one split
    assert (manifest["parameters"]["seed"], manifest["parameters"]["split_seed"]) == (9, 1337)
    assert "seed 1337" in manifest["data"]["validation"]
    assert manifest["data"]["sha256"] == data_sha256  # as fetch-data printed it
    # where the data came from as the user named it, not only fer's copy under FER_DATA_DIR
    assert manifest["data"]["origin"] == str(fer_subset)
    assert manifest["data"]["source"].startswith(str(data_dir))
    assert manifest["machine"]["onednn"] is True  # asked for before TensorFlow was imported

    evaluated = run_fer("evaluate", "--model", run_dir / "model.keras", "--data", fer_subset,
                        "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr
    for name in ("classification_report.txt", "classification_report.json",
                 "confusion_matrix.png", "metrics.json"):
        assert (tmp_path / "eval" / name).exists()
    # The same model and images: the same score, up to one image whose two top classes tie
    # within rounding (training scored with oneDNN's kernels, which `fer evaluate` leaves
    # to TensorFlow's default: off on CPUs without AVX512_BF16).
    evaluation = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(evaluation["accuracy"] - metrics["accuracy"]) <= 1 / metrics["test_samples"] + 1e-9
    # what was scored on what, since a later evaluation into the folder replaces it
    assert evaluation["model"] == str((run_dir / "model.keras").resolve())
    assert evaluation["data"] == {"source": str(fer_subset.resolve()),
                                  "origin": str(fer_subset.resolve()),
                                  "sha256": file_sha256(fer_subset)}
    assert evaluation["test_images_seen_in_training"] == 0  # its images (the zip, not fer's copy)
    in_float32 = run_fer("evaluate", "--model", run_dir / "model.keras", "--data", fer_subset,
                         "--out", tmp_path / "eval32", "--precision", "float32")
    assert in_float32.returncode == 0, in_float32.stderr
    assert json.loads((tmp_path / "eval32" / "metrics.json").read_text())[
        "inference_precision"] == "float32"
    bad = run_fer("evaluate", "--model", run_dir / "model.keras", "--data", fer_subset,
                  "--precision", "fp8")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --precision fp8: expected")
    into_run = run_fer("evaluate", "--model", run_dir / "model.keras", "--data", fer_subset,
                       "--out", run_dir)  # would replace the run's own metrics and reports
    assert_one_line_error(into_run, r"--out .*: is a run folder, .*pass another folder")
    beside = run_fer("evaluate", "--model", run_dir / "model.keras", "--data", fer_subset)
    assert beside.returncode == 0 and (run_dir / "evaluation" / "metrics.json").is_file()
    again = run_fer("publish", run_dir, env=storage)  # evaluation/ is not part of the run
    assert again.returncode == 0, again.stderr

    with zipfile.ZipFile(fer_subset) as handle:
        face = handle.read(next(n for n in handle.namelist() if n.startswith("test/happy/")))
    import cv2

    gray = cv2.imdecode(np.frombuffer(face, np.uint8), cv2.IMREAD_GRAYSCALE)
    big = cv2.copyMakeBorder(cv2.resize(gray, (192, 192)), 64, 64, 64, 64,
                             cv2.BORDER_CONSTANT, value=128)
    (tmp_path / "face.png").write_bytes(encode_image(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)))
    (tmp_path / "small.jpg").write_bytes(face)
    predicted = run_fer("predict", tmp_path / "face.png", tmp_path / "small.jpg",
                        tmp_path / "face.png", "--model", run_dir / "model.keras", "--json")
    assert predicted.returncode == 0, predicted.stderr
    records = json.loads(predicted.stdout)  # in the order given, a repeated file once
    assert [Path(r["file"]).name for r in records] == ["face.png", "small.jpg"]
    assert all(r["emotion"] in CLASS_NAMES for r in records)

    faces = run_fer("predict", tmp_path / "face.png", "--model", run_dir / "model.keras",
                    "--faces", "--json")
    assert faces.returncode == 0, faces.stderr
    for record in json.loads(faces.stdout):
        assert len(record["box"]) == 4 and record["emotion"] in CLASS_NAMES
    # a file without a face is named, not silently left out
    (tmp_path / "blank.png").write_bytes(encode_image(np.full((200, 200), 128, np.uint8)))
    mixed = run_fer("predict", tmp_path / "blank.png", tmp_path / "face.png",
                    "--model", run_dir / "model.keras", "--faces")
    assert mixed.returncode == 0, mixed.stderr
    lines = mixed.stdout.splitlines()
    assert lines[0] == f"{tmp_path / 'blank.png'}: no face found"
    assert len(lines) >= 2 and all(" face at x=" in line for line in lines[1:])
    mixed_json = run_fer("predict", tmp_path / "blank.png", tmp_path / "face.png",
                         "--model", run_dir / "model.keras", "--faces", "--json")
    assert mixed_json.returncode == 0, mixed_json.stderr
    blank, *found = json.loads(mixed_json.stdout)  # the JSON alone tells which had no face
    assert blank == {"file": str(tmp_path / "blank.png"), "emotion": None,
                     "probabilities": None, "box": None}
    assert found and all(Path(r["file"]).name == "face.png" and r["box"] for r in found)
    assert f"{tmp_path / 'blank.png'}: no face found" in mixed_json.stderr


def test_a_run_records_the_origin_of_the_dataset_it_trained_on(tmp_path, data_dir, image_tree,
                                                               monkeypatch):
    """`fer train` without --data read the current dataset's path, decoded it, and then read
    FER_DATA_DIR's pointer again for the manifest's origin: a `fer fetch-data` of another
    source in between (a scheduled fetch on the same machine) made the run claim that
    source. Path and origin now come from one read."""
    from typer.testing import CliRunner

    import fer.data
    from fer.fetch import current_source, fetch_data
    from fer_cli.main import app

    other = write_image_tree(tmp_path / "other", per_class=2)
    fetch_data(str(image_tree), data_dir=data_dir)
    load_dataset = fer.data.load_dataset

    def fetch_other_meanwhile(*args, **kwargs):
        fetch_data(str(other), data_dir=data_dir)
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(fer.data, "load_dataset", fetch_other_meanwhile)
    result = CliRunner().invoke(app, ["train", "--epochs", "1", "--batch-size", "8",
                                      "--val-fraction", "0.3", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert current_source(data_dir).origin == str(other)  # the fetch meanwhile did happen
    assert manifest["data"]["origin"] == str(image_tree)


NO_SUCH_USER = "~fer-no-such-user-4f2a"


@pytest.mark.parametrize("args, env, what", [
    (["reports", "list", "--storage", f"{NO_SUCH_USER}/artifacts"], {}, "storage folder"),
    (["fetch-data", "--source", f"{NO_SUCH_USER}/fer.zip"], {}, "data source"),
    (["fetch-data", "--source", "missing.zip"], {"FER_DATA_DIR": f"{NO_SUCH_USER}/data"},
     "FER_DATA_DIR"),
])
def test_a_home_that_cannot_be_expanded_is_one_line(args, env, what, tmp_path):
    """A ~user typo reaches fer as typed (the shell leaves an unknown user's ~ alone), and
    Python's expanduser raises RuntimeError for it: one line naming the option or
    variable, not a traceback."""
    result = run_fer(*args, env=env, cwd=tmp_path)
    assert_one_line_error(result, rf"{what} '{NO_SUCH_USER}/\w+(\.zip)?': cannot expand its ~ "
                                  r"\(.*\); expected an existing user's ~ or a path without one")


def test_commands_that_read_no_data_ignore_the_data_folder(tmp_path):
    """FER_DATA_DIR is resolved by the commands that read data only: a mistyped one in the
    environment does not stop `fer reports list`, which never touches it."""
    result = run_fer("reports", "list", "--storage", tmp_path / "artifacts",
                     env={"FER_DATA_DIR": f"{NO_SUCH_USER}/data"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no published runs" in result.stdout.lower()


def test_paths_that_are_not_utf8_are_printed_escaped(tmp_path, fer_subset):
    """A Latin-1 folder name (bytes that are not UTF-8) in the lines fetch-data prints after
    its work: escaped as predict's file names are, not a UnicodeEncodeError traceback and
    exit 1 once the dataset was fetched."""
    latin1 = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    latin1.mkdir()
    shutil.copy(fer_subset, latin1 / "fer.zip")
    result = run_fer("fetch-data", "--source", latin1 / "fer.zip",
                     env={"FER_DATA_DIR": str(latin1 / "data"), "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert "caf\\xe9/data" in result.stdout and "Traceback" not in result.stderr
