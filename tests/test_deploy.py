"""flows.deploy and the container: deployments as declared, one training at a time, a worker.

Runs against a real ``prefect server start`` (tests/prefect_server.py); the worker is started
with the exact command of docker/Dockerfile's CMD.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import WorkerStatus
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_server import Process
from s3server import free_port
from test_cli import run_fer, usage_error

from fer.errors import FerError
from flows.deploy import (
    CRASH_AUTOMATION,
    DEFAULT_CRASH_AFTER_S,
    PREFECT_FILE,
    deploy_all,
    moved_deployments,
    read_deployments,
)

# One real Prefect server for the session: fixtures prefect_api, deployed, start_fer_worker.
pytest_plugins = ["prefect_server"]
integration = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"


def copied_into_the_image() -> list[str]:
    """The paths docker/Dockerfile COPYs from the build context (the repository root)."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    return [source.rstrip("/") for line in dockerfile.splitlines()
            if line.startswith("COPY ") and "--from" not in line
            for source in line.split()[1:-1]]


def read(name: str):
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def copy_of_the_image(app: Path) -> Path:
    """What the image holds at /app, copied to ``app``."""
    app.mkdir()
    for source in copied_into_the_image():
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, app / source,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (app / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, app / source)
    return app


@integration
def test_deploy_registers_both_deployments_on_pool_fer(deployed):
    """Both deployments exist, run flows/retrain.py from this checkout, on pool `fer`."""
    assert deployed == ["retrain/retrain", "retrain/retrain-weekly"]
    for name in deployed:
        deployment = read(name)
        assert deployment.work_pool_name == "fer"
        assert deployment.entrypoint == "flows/retrain.py:retrain"
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert {"epochs", "batch_size", "model", "data", "storage"} <= set(deployment.parameters)
    assert read("retrain/retrain").schedules == []


@integration
def test_weekly_deployment_has_a_cron_schedule_in_utc(deployed):
    (schedule,) = read("retrain/retrain-weekly").schedules
    assert schedule.schedule.cron == "0 3 * * 1"
    assert schedule.schedule.timezone == "UTC"
    assert schedule.slug == "weekly-monday-0300" and schedule.active


@integration
def test_runs_are_limited_to_one_at_a_time_by_the_pool_alone(deployed, tmp_path):
    """The pool runs one flow at a time, whichever deployment it comes from. A deployment's
    own limit held its slot on a lease that the run renews every 225 s, and Prefect
    cancels a run whose renewal fails for 3 s: a server restarting then stopped a
    training. A deployment registered with one by an older fer loses it."""
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("fer")
    assert pool.type == "process" and pool.concurrency_limit == 1
    project = copy_of_the_image(tmp_path / "project")
    prefect_file = project / PREFECT_FILE
    config = yaml.safe_load(prefect_file.read_text())
    for entry in config["deployments"]:
        entry["concurrency_limit"] = {"limit": 1, "collision_strategy": "ENQUEUE"}
    prefect_file.write_text(yaml.safe_dump(config))
    try:
        deploy_all(project, names=["retrain"])
        assert read("retrain/retrain").global_concurrency_limit.limit == 1  # as older fers did
    finally:
        deploy_all(REPO, names=["retrain"])
    for name in deployed:
        assert read(name).global_concurrency_limit is None


@integration
def test_deploying_again_updates_in_place(deployed):
    """The schedule slug keeps one schedule; ids stay, so run history stays attached."""
    before = {name: read(name).id for name in deployed}
    assert deploy_all(REPO, names=["retrain-weekly"]) == ["retrain/retrain-weekly"]
    weekly = read("retrain/retrain-weekly")
    assert weekly.id == before["retrain/retrain-weekly"] and len(weekly.schedules) == 1
    assert read("retrain/retrain").id == before["retrain/retrain"]


@integration
def test_the_schedules_on_the_server_are_the_yamls(deployed, tmp_path, monkeypatch):
    """`prefect deploy` updates and adds schedules by slug but never removes one: a
    schedule renamed (slug and all) had kept firing beside the new one, one taken out of
    the YAML kept firing, and one paused stayed paused once `active: false` went. After
    `fer deploy` the server has the YAML's schedules, no others: a templated slug is
    known once Prefect fills it in, and another flow's deployment of the same name on a
    shared server is not fer's to change."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    with get_client(sync_client=True) as client:
        other = client.create_deployment(
            flow_id=client.create_flow_from_name("another-project"), name="retrain-weekly",
            schedules=[DeploymentScheduleCreate(schedule=CronSchedule(cron="0 4 * * *"),
                                                slug="theirs")])
    project = copy_of_the_image(tmp_path / "project")
    prefect_file = project / PREFECT_FILE
    config = yaml.safe_load(prefect_file.read_text())
    (weekly,) = [entry for entry in config["deployments"] if entry["name"] == "retrain-weekly"]

    def deployed_as(schedules: list[dict]) -> list[tuple[str, str, bool]]:
        weekly["schedules"] = schedules
        prefect_file.write_text(yaml.safe_dump(config))
        deploy_all(project, names=["retrain-weekly"])
        return sorted((schedule.slug, schedule.schedule.cron, schedule.active)
                      for schedule in read("retrain/retrain-weekly").schedules)

    friday = {"cron": "0 3 * * 5", "timezone": "UTC", "slug": "weekly-friday-0300"}
    try:
        assert deployed_as([{**friday, "active": False}]) == [
            ("weekly-friday-0300", "0 3 * * 5", False)]
        assert deployed_as([friday]) == [("weekly-friday-0300", "0 3 * * 5", True)]
        assert deployed_as([]) == []
        monkeypatch.setenv("FER_TEST_SLUG", "weekly-friday-0300")
        assert deployed_as([{**friday, "slug": "{{ $FER_TEST_SLUG }}"}]) == [
            ("weekly-friday-0300", "0 3 * * 5", True)]
    finally:
        deploy_all(REPO, names=["retrain-weekly"])
        with get_client(sync_client=True) as client:
            theirs = client.read_deployment_schedules(other)
            client.delete_deployment(other)
    assert [(schedule.slug, schedule.active) for schedule in
            read("retrain/retrain-weekly").schedules] == [("weekly-monday-0300", True)]
    assert [schedule.slug for schedule in theirs] == ["theirs"]


def test_a_schedule_under_prefects_older_single_key_is_left_to_prefect(tmp_path):
    """`schedule:` (one, Prefect's older key, which it still reads as `schedules`): read as
    no schedules, the one `prefect deploy` had just registered was deleted."""
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({"deployments": [
        {"name": "weekly", "entrypoint": "flows/retrain.py:retrain",
         "work_pool": {"name": "fer"}, "schedule": {"cron": "0 3 * * 1"}},
        {"name": "daily", "entrypoint": "flows/retrain.py:retrain",
         "work_pool": {"name": "fer"}, "schedules": [{"cron": "0 3 * * *", "slug": "daily"}]}]}))
    assert read_deployments(prefect_file).schedules == {
        "weekly": None, "daily": {"daily": True}}


def moved_from(project_dir: Path, names: list[str]) -> list[tuple[str, str, str]]:
    """moved_deployments as deploy_all asks it: with project_dir's own prefect.yaml."""
    declared = read_deployments(project_dir / PREFECT_FILE)
    return moved_deployments(names, project_dir=project_dir,
                             pull_directories=declared.pull_directories)


def crash_automations():
    with get_client(sync_client=True) as client:
        return client.read_automations_by_name(CRASH_AUTOMATION)


@integration
def test_deploy_registers_one_crash_automation_and_updates_it(deployed):
    """`fer deploy` leaves exactly one automation that marks a fer run Crashed after
    --crash-after seconds without a heartbeat; deploying again with another value changes
    that one instead of adding a second, and deploying without one (the compose stack's
    deploy step) keeps the value chosen (test_flows checks that it fires)."""
    (automation,) = crash_automations()
    assert automation.enabled
    assert automation.trigger.within.total_seconds() == DEFAULT_CRASH_AFTER_S
    assert automation.trigger.posture == "Proactive"
    assert automation.trigger.match_related["prefect.resource.id"] == ["prefect.tag.fer"]
    assert automation.actions[0].state == "CRASHED"
    try:
        deploy_all(REPO, names=["retrain"], crash_after_s=900)
        (updated,) = crash_automations()
        assert updated.id == automation.id and updated.trigger.within.total_seconds() == 900
        deploy_all(REPO, names=["retrain"])
        (kept,) = crash_automations()
        assert kept.id == automation.id and kept.trigger.within.total_seconds() == 900
    finally:
        deploy_all(REPO, names=["retrain"], crash_after_s=DEFAULT_CRASH_AFTER_S)
    assert crash_automations()[0].trigger.within.total_seconds() == DEFAULT_CRASH_AFTER_S


def server_side_trigger_id(automation_id) -> str:
    """The id the server gave the automation's trigger (the client's model drops it); the
    server times each run's heartbeats under it."""
    with get_client(sync_client=True) as client:
        response = client.request("GET", "/automations/{id}", path_params={"id": automation_id})
    return response.json()["trigger"]["id"]


@integration
def test_deploying_again_unchanged_keeps_the_crash_rules_trigger_and_a_pause(deployed):
    """Deploying again without a change leaves the automation's trigger as it is: an update
    gives it a new id on the server, and the runs in progress, timed under the old one, would
    not be marked Crashed if their worker died before their next heartbeat (the compose
    deploy step runs on every `up`, often just before it recreates the worker). A pause set
    in the UI survives a deploy, even one that changes --crash-after."""
    (automation,) = crash_automations()
    trigger_id = server_side_trigger_id(automation.id)
    deploy_all(REPO, names=["retrain"])
    assert server_side_trigger_id(automation.id) == trigger_id
    with get_client(sync_client=True) as client:
        client.pause_automation(automation.id)
    try:
        deploy_all(REPO, names=["retrain"], crash_after_s=900)
        (changed,) = crash_automations()
        assert changed.trigger.within.total_seconds() == 900 and not changed.enabled
    finally:
        with get_client(sync_client=True) as client:
            client.resume_automation(automation.id)
        deploy_all(REPO, names=["retrain"], crash_after_s=DEFAULT_CRASH_AFTER_S)
    assert crash_automations()[0].enabled


@integration
def test_deploying_from_another_folder_is_warned_of(deployed, tmp_path):
    """A deployment records the folder its runs start in: registered from a host checkout
    against the compose stack's server, it would send the container's worker to a path it
    does not have. The folder a registered deployment starts in, read back from the
    server, differs from another checkout's (fer deploy warns then) and not from its own;
    nor from a checkout whose prefect.yaml names that folder itself (a Docker pool's /app:
    registering from anywhere keeps it, and the warning had said it moved)."""
    (tmp_path / "deploy").mkdir()
    shutil.copy2(REPO / "deploy" / "prefect.yaml", tmp_path / "deploy" / "prefect.yaml")
    assert moved_from(tmp_path, ["retrain-weekly"]) == [
        ("retrain-weekly", str(REPO), str(tmp_path))]  # the fixture deployed from REPO
    assert moved_from(REPO.resolve(), ["retrain-weekly"]) == []
    templated = (tmp_path / "deploy" / "prefect.yaml").read_text()
    assert templated.count('directory: "{{ project.stdout }}"') == 1
    (tmp_path / "deploy" / "prefect.yaml").write_text(
        templated.replace('"{{ project.stdout }}"', json.dumps(str(REPO))))
    assert moved_from(tmp_path, ["retrain-weekly"]) == []


def test_fer_deploy_help_states_the_crash_times_flows_deploy_uses():
    """`fer deploy --help` writes the minimum and the default out (the CLI does not import
    Prefect to print its help): they are flows.deploy's."""
    from flows.deploy import DEFAULT_CRASH_AFTER_S, MIN_CRASH_AFTER_S

    done = run_fer("deploy", "--help")
    assert done.returncode == 0, done.stderr
    assert f"at least {MIN_CRASH_AFTER_S};" in done.stdout
    assert f"{DEFAULT_CRASH_AFTER_S} for a new automation" in done.stdout


def test_a_crash_time_shorter_than_two_heartbeats_is_refused():
    """Before the server is asked anything, by the library and by `fer deploy` alike (the
    library's API is a dead port here: asked first, it would say it cannot be reached)."""
    dead = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        with pytest.raises(FerError, match=r"--crash-after 30: expected at least 60 seconds"):
            deploy_all(REPO, crash_after_s=30)
    # the command line declares the range (a usage error, as README says of declared ranges)
    from flows.deploy import MIN_CRASH_AFTER_S

    assert (f"Invalid value for '--crash-after': Input should be greater than or equal to "
            f"{MIN_CRASH_AFTER_S}" in usage_error(run_fer("deploy", "--crash-after", "30",
                                                          cwd=REPO)))


@integration
def test_python_m_flows_deploy_is_the_compose_deploy_step(prefect_api, tmp_path):
    """The command docker/compose.yaml's `deploy` service runs, in a copy of what the image
    holds at /app. It writes nothing there: /app is root's, and the step runs as user 10001."""
    command = yaml.safe_load(COMPOSE.read_text())["services"]["deploy"]["command"]
    assert command[:3] == ["python", "-m", "flows.deploy"]
    app = copy_of_the_image(tmp_path / "app")
    before = _contents(app)
    try:
        done = subprocess.run([sys.executable, *command[1:], "--name", "retrain"], cwd=app,
                              env={**os.environ, **prefect_api.client_env(),
                                   "PYTHONDONTWRITEBYTECODE": "1"},  # as the image sets it
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "deployed retrain/retrain"
        assert _contents(app) == before  # no file added, removed or rewritten
    finally:  # later tests' runs of `retrain` start in the checkout, not in this copy
        deploy_all(REPO, names=["retrain"])
    assert moved_from(REPO.resolve(), ["retrain"]) == []


def compose_prefect_server(volume: Path, log_path: Path) -> tuple[Process, str, dict]:
    """The compose `prefect-server` command with its environment, its prefect-data volume
    at ``volume``, on a free loopback port, started and answering: the process, the
    address it serves and that environment."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["prefect-server"]
    mounted = {name: value.replace("/data/", f"{volume}/") if value.startswith("/data/")
               else value for name, value in service["environment"].items()}
    port = free_port()
    command = [str(Path(sys.executable).with_name("prefect")), *service["command"][1:]]
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    server = Process(command, env={**os.environ, **mounted}, log_path=log_path)
    server.start()
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5):
                return server, f"http://127.0.0.1:{port}", mounted
        except OSError:
            if not server.running() or time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"the compose prefect-server did not come up: {server.log()[-2000:]}")
            time.sleep(1)


@integration
def test_the_compose_prefect_server_serves_its_ui_from_its_volume(tmp_path):
    """The compose `prefect-server` command, with its environment (the prefect-data volume
    under tmp), serves the UI as well as the API: the image runs it as user 10001, who
    cannot write where Prefect copies the UI by default (site-packages), so the copy goes
    to the volume."""
    volume = tmp_path / "data"
    server, address, environment = compose_prefect_server(volume, tmp_path / "server.log")
    try:
        with urllib.request.urlopen(f"{address}/", timeout=30) as page:
            html = page.read().decode()
    finally:
        server.stop()
    static = Path(environment["PREFECT_SERVER_UI_STATIC_DIRECTORY"])
    assert static.is_relative_to(volume)
    assert "<html" in html.lower()
    assert any(static.rglob("index.html"))


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b""
            for p in folder.rglob("*")}


@integration
def test_container_command_starts_a_worker_polling_pool_fer(deployed, start_fer_worker,
                                                            tmp_path):
    """The image's CMD comes up, registers with pool `fer`, and answers its healthcheck."""
    worker = start_fer_worker(log_path=tmp_path / "worker.log", env={})
    try:
        name = worker.wait_for_log(r"Worker '(ProcessWorker [0-9a-f-]+)' started!", timeout=90)[1]
        with get_client(sync_client=True) as client:
            workers = {w.name: w for w in client.read_workers_for_work_pool("fer")}
        assert workers[name].status == WorkerStatus.ONLINE
        port = worker.env["PREFECT_WORKER_WEBSERVER_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as health:
            assert health.status == 200
    finally:
        worker.stop()


@pytest.mark.parametrize("names, message", [
    (["nightly"], r"no deployment named 'nightly' in deploy/prefect.yaml; expected one of "
                  r"retrain, retrain-weekly"),
    (["retrain", "weekly"], r"no deployment named 'weekly'"),
])
def test_unknown_deployment_names_are_refused(names, message):
    with pytest.raises(FerError, match=message):
        deploy_all(REPO, names=names)


RETRAIN = ("deployments:\n  - name: retrain\n    entrypoint: flows/retrain.py:retrain\n"
           "    work_pool: {name: fer}\n")


@pytest.mark.parametrize("text, message", [
    ("deployments: [", r"prefect\.yaml is not valid YAML"),
    ("name: fer\n", r"prefect\.yaml declares no deployments"),
    ("deployments:\n  - name: retrain\n", r"deployments\[0\] needs a name and a work_pool\.name"),
    # the shapes a hand edit gets wrong had been AttributeError tracebacks
    ("deployments:\n  - name: retrain\n    work_pool: fer\n",
     r"deployments\[0\] needs a name and a work_pool\.name \(work_pool: \{name: fer\}\)"),
    ("deployments:\n  - retrain\n", r"deployments\[0\] needs a name and a work_pool\.name"),
    ("deployments:\n  retrain:\n    work_pool: {name: fer}\n",
     r"`deployments:` must be a list \(each entry `- name: \.\.\.`\), got a dict"),
    ("- deployments\n", r"expected a mapping with a `deployments:` list at the top, got a list"),
    ("deployments:\n  - name: [a, b]\n    work_pool: {name: fer}\n",
     r"deployments\[0\] needs a name and a work_pool\.name"),
    # names Prefect refuses: its client's validation traceback, once the server was asked
    ("deployments:\n  - name: retrain\n    work_pool: {name: fer/gpu}\n",
     r"deployments\[0\] work_pool\.name 'fer/gpu': expected a name that is not blank and has "
     r"none of / % & > <$"),
    ("deployments:\n  - name: retrain\n    work_pool: {name: fer}\n  - name: 'a&b'\n"
     "    work_pool: {name: fer}\n", r"deployments\[1\] name 'a&b': expected a name"),
    ("deployments:\n  - name: retrain\n    work_pool: {name: Prefect-gpu}\n",
     r"work_pool\.name 'Prefect-gpu': names starting with 'prefect' are reserved"),
    ("deployments:\n  - name: \"' '\"\n    work_pool: {name: fer}\n",
     r"deployments\[0\] name \"' '\": expected a name that is not blank"),
    # parameters a run would refuse: the scheduled run had failed when it fired, unseen
    (RETRAIN + "    parameters: {epoch: 20}\n",
     r"deployments\[0\] parameters: unknown parameter 'epoch' \(the retrain flow takes epochs, "),
    (RETRAIN + "    parameters: {epochs: 0}\n",
     r"deployments\[0\] parameters: epochs: 0: expected at least 1"),
    (RETRAIN + "    parameters: {precision: fp16, val_fraction: 0.1}\n",
     r"deployments\[0\] parameters: precision: fp16: expected one of auto, "),
    (RETRAIN + "    parameters: {batch_size: sixty-four}\n",
     r"deployments\[0\] parameters: batch_size: 'sixty-four': Input should be a valid integer"),
    (RETRAIN + "    parameters: {model: default}\n    schedules:\n      - cron: '0 3 * * 1'\n"
     "        parameters: {model: defualt}\n",
     r"deployments\[0\] schedules\[0\] parameters: unknown model 'defualt' \(expected one of "),
])
def test_malformed_prefect_yaml_is_explained(tmp_path, text, message):
    (tmp_path / PREFECT_FILE).parent.mkdir()
    (tmp_path / PREFECT_FILE).write_text(text)
    with pytest.raises(FerError, match=message):
        deploy_all(tmp_path)


def test_deploy_loads_no_tensorflow():
    """fer deploy checks the deployments' parameters (model names included) without
    TensorFlow: its start-up lines would bury the deploy's one-line answers, and it costs
    seconds on a machine that only registers deployments. The check itself runs here (an
    import inside it would not show at import time)."""
    done = subprocess.run([sys.executable, "-c", "import sys, flows.deploy; from pathlib "
                           "import Path; flows.deploy.read_deployments(Path("
                           f"{str(REPO / PREFECT_FILE)!r})); "
                           "print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stderr


def test_missing_prefect_yaml_names_the_file(tmp_path):
    with pytest.raises(FerError, match=r"cannot read .*deploy/prefect\.yaml \(No such file"):
        read_deployments(tmp_path / PREFECT_FILE)


def test_a_prefect_yaml_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    """A comment saved as Latin-1 (`# café`) is one error naming the file and the byte, not
    a UnicodeDecodeError traceback from `fer deploy`."""
    (tmp_path / PREFECT_FILE).parent.mkdir()
    (tmp_path / PREFECT_FILE).write_bytes(b"# caf\xe9\ndeployments: []\n")
    with pytest.raises(FerError, match=r"deploy/prefect\.yaml: byte 5 is not UTF-8"):
        read_deployments(tmp_path / PREFECT_FILE)


def test_deploy_without_a_server_says_how_to_start_one():
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(FerError, match=r"PREFECT_API_URL is not set.*prefect server start"):
            deploy_all(REPO)


def test_deploy_to_a_dead_server_names_its_url():
    dead = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        with pytest.raises(FerError, match=rf"cannot reach the Prefect API at {re.escape(dead)}"):
            deploy_all(REPO)


def test_compose_variables_are_all_in_env_example():
    """Every ${VAR} compose.yaml reads has a local default in docker/.env.example."""
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    example = Path(REPO / "docker" / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z0-9_]+)=", example, flags=re.MULTILINE))
    assert used and used <= defined, f"missing in .env.example: {sorted(used - defined)}"


def test_env_example_credentials_are_long_enough_for_minio():
    """MinIO refuses a user name under 3 characters and a password under 8 (minio would not
    start, minio-init would fail): the example's values, which users copy, meet both."""
    example = Path(REPO / "docker" / ".env.example").read_text()
    values = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", example, flags=re.MULTILINE))
    for user, password in (("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
                           ("FER_S3_ACCESS_KEY", "FER_S3_SECRET_KEY")):
        assert len(values[user]) >= 3 and len(values[password]) >= 8, (user, password)


def test_compose_refuses_to_start_without_the_credentials():
    """Each credential is required (`${VAR:?hint}`): without docker/.env, Compose stops with
    the hint instead of starting MinIO on its default root login and a worker whose
    account was never made, whose every retrain then fails at the store."""
    text = COMPOSE.read_text()
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FER_S3_ACCESS_KEY",
                 "FER_S3_SECRET_KEY"):
        modifiers = re.findall(r"\$\{" + name + r"\b([^}]*)\}", text)  # each use's ":?hint"
        assert modifiers and all(m.startswith(":?") for m in modifiers), (name, modifiers)


def test_compose_worker_gets_what_fer_and_prefect_read():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    environment = services["worker"]["environment"]
    assert environment["FER_STORAGE"] == "s3://fer-artifacts/prod"
    assert environment["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert environment["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(environment)
    assert "command" not in services["worker"]  # it runs the image's CMD, tested above


def test_compose_keeps_the_workers_run_folders_on_a_volume():
    """A retried flow run resumes from the checkpoint in its run folder: the worker's run
    folders (TrainConfig's out_dir under the image's WORKDIR, where its flows run) are a
    named volume, so they outlive a recreated container."""
    from fer.config import TrainConfig

    workdir = re.search(r"^WORKDIR (\S+)$", (REPO / "docker" / "Dockerfile").read_text(),
                        flags=re.MULTILINE)[1]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {target: source for source, target in
              (volume.split(":")[:2] for volume in compose["services"]["worker"]["volumes"])}
    assert mounts.get(f"{workdir}/{TrainConfig.out_dir}") in compose["volumes"]


def test_the_image_build_context_holds_every_package_it_installs():
    """Each COPY source passes .dockerignore, and every package pyproject installs is copied.

    No Docker engine here, so this is the check that a moved or new package reaches the image.
    """
    copied = copied_into_the_image()
    admitted = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.startswith("!")}
    assert set(copied) <= admitted, set(copied) - admitted
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"include = \[(.*)\]", pyproject)[1]
    top_level = {name.strip(' "').split(".")[0] for name in packages.split(",")}
    assert top_level <= set(copied), top_level - set(copied)


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_images_pinned_requirements_satisfy_pyproject(machine):
    """docker/requirements.lock pins a version of each direct runtime requirement (fer's and
    the orchestration extra's; the image's pip check covers the rest), inside pyproject.toml's
    ranges, on x86_64 and on arm64 (Docker on Apple silicon) alike, and holds no test tool.
    A dependency added to pyproject.toml without regenerating the lock fails here, not in
    a `docker build` nobody runs on CI."""
    import tomllib

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    environment = {**default_environment(), "platform_machine": machine, "extra": ""}
    pinned = {}
    for line in (REPO / "docker" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                (version,) = [spec.version for spec in requirement.specifier]
                pinned[canonicalize_name(requirement.name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["orchestration"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not in docker/requirements.lock"
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])
    tools = {canonicalize_name(Requirement(line).name)
             for line in project["optional-dependencies"]["dev"]} - {"prefect"}
    assert not tools & set(pinned)
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert dockerfile.index("pip install --no-cache-dir -r docker/requirements.lock") < \
        dockerfile.index("COPY fer/ fer/")  # a code change rebuilds no dependency layer


def test_the_images_lock_pins_what_its_packages_require():
    """Every package a pinned package requires (markers and extras as this machine installs
    them) is pinned too, so a rebuild gets no version the lock does not name. A plain
    `pip freeze` leaves setuptools (TensorFlow requires it) and wheel (astunparse does) out,
    and `pip check` in the Dockerfile passes on whatever version the base image brings.
    Read from the packages installed here (the lock's, as CI installs it): the other
    platform's TensorFlow, not installed, is not checked."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = {canonicalize_name(Requirement(line).name)
              for line in (REPO / "docker" / "requirements.lock").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    unpinned = set()
    for name in pinned:
        try:
            requirements = distribution(name).requires or []
        except PackageNotFoundError:  # the other platform's TensorFlow
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                if canonicalize_name(requirement.name) not in pinned:
                    unpinned.add(f"{requirement.name} (required by {name})")
    assert not unpinned, sorted(unpinned)


def test_the_image_builds_fer_with_the_locks_setuptools(tmp_path):
    """The Dockerfile installs fer without build isolation, so the build backend is the
    lock's setuptools (with isolation pip fetched the newest one from the index on every
    build); that build, from what the image copies, works offline with the setuptools
    installed here (the lock's, as CI installs it)."""
    from importlib.metadata import version

    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    (install,) = re.findall(r"^RUN pip install .*\./\[orchestration\].*$", dockerfile, re.MULTILINE)
    assert "--no-build-isolation" in install.split()
    lock = (REPO / "docker" / "requirements.lock").read_text()
    assert f"setuptools=={version('setuptools')}" in lock.splitlines(), (
        "install with the lock as constraints, as .ci/run and README do")
    app = copy_of_the_image(tmp_path / "app")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                           "--no-build-isolation", "--wheel-dir", str(tmp_path / "wheels"),
                           f"{app}[orchestration]"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [path.name.split("-")[0] for path in (tmp_path / "wheels").iterdir()] == ["fer"]


def test_prefect_deploy_gets_the_settings_fer_read(monkeypatch):
    """Settings fer read from a prefect.toml or .env where it ran (an auth string for a
    server that asks for a login) reach `prefect deploy`, which runs in the project folder
    and would not find them; the API URL is the one fer checked."""
    from prefect.settings import PREFECT_API_AUTH_STRING

    import flows.deploy

    seen = {}

    def recorded(command, *, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(flows.deploy.subprocess, "run", recorded)
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: "admin:pw",
                                     PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        flows.deploy._prefect_deploy(REPO, ["retrain"], api_url="http://127.0.0.1:2/api",
                                     everything=False)
    assert seen["PREFECT_API_AUTH_STRING"] == "admin:pw"
    assert seen["PREFECT_API_URL"] == "http://127.0.0.1:2/api"
