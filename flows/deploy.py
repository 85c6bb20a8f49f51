"""Register the deployments of ``deploy/prefect.yaml`` with the server PREFECT_API_URL names.

Prefect's own ``prefect deploy`` reads the YAML, so it means exactly what Prefect documents.
This module adds what the YAML cannot say: each work pool it names exists (type process) and
runs at most one flow run at a time, which keeps the on-demand and the weekly deployment
from ever training at once; and an automation marks a fer flow run Crashed when its
heartbeats stop (its worker's machine rebooted), which would otherwise stay Running and hold
that one slot for ever, scheduled runs included.

``python -m flows.deploy [--project-dir DIR] [--name NAME ...]`` runs it from a shell (the
``deploy`` service of docker/compose.yaml does).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import Event, ResourceSpecification
from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_KEY, get_current_settings
from prefect.types import BANNED_CHARACTERS
from prefect.workers.process import ProcessWorker

from fer.errors import FerError
from flows.remote import api_refused, require_api
from flows.retrain import FER_TAG, check_parameters, retrain

PREFECT_FILE = Path("deploy") / "prefect.yaml"
POOL_CONCURRENCY_LIMIT = 1  # one training at a time per pool, whichever deployment asks
DEPLOY_TIMEOUT_S = 600
log = logging.getLogger("fer.deploy")  # under fer: `fer deploy` shows fer's progress lines
CRASH_AUTOMATION = "fer: mark flow runs whose heartbeats stopped Crashed"
# A flow run sends a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect's
# default 180, its minimum 30). Ten minutes of silence is three missed default heartbeats:
# a busy training is never taken for dead, and a dead one frees the pool within the hour.
DEFAULT_CRASH_AFTER_S = 600
MIN_CRASH_AFTER_S = 60  # two heartbeats at Prefect's shortest interval
FLOW_RUN_ENDS = {f"prefect.flow-run.{state}" for state in
                 ("Completed", "Failed", "Cancelled", "Crashed")}
FLOW_RUN_STARTS = {"prefect.flow-run.Pending", "prefect.flow-run.Running"}
# Sent by `fer deploy` for each fer run in progress: a created or changed rule's new trigger
# has seen none of their heartbeats, so one whose worker had died already would be watched
# by nothing and hold its pool for ever. (On an unchanged rule it restarts their windows.)
WATCH_EVENT = "fer.flow-run.watch"
# A trigger service apart from the API (not `prefect server start`'s, which loads a changed
# rule at once) loads it on its next 5 s reconcile, after an evaluation pass: sent again then.
WATCH_RESEND_S = 12
FER_TAG_RESOURCE = f"prefect.tag.{FER_TAG}"  # the tag as events name it


def deploy_all(project_dir: Path, *, names: Sequence[str] | None = None,
               crash_after_s: int | None = None) -> list[str]:
    """Create the work pools and the crash automation, and register the named deployments
    (all when None). ``crash_after_s`` None keeps the automation's current setting (600 s
    for a new one), so a deploy without it never undoes a user's choice.

    Returns the registered deployments as ``flow/deployment`` names, read back from the server.
    """
    project_dir = Path(project_dir).resolve()
    declared = read_deployments(project_dir / PREFECT_FILE)
    chosen = list(declared.pools) if names is None else _check_names(names, declared.pools)
    if crash_after_s is not None:
        _check_crash_after(crash_after_s)
    api_url = require_api()
    with _api_answers(api_url, doing="setting up the work pools and the crash automation"):
        for pool in sorted({declared.pools[name] for name in chosen}):
            ensure_work_pool(pool, concurrency_limit=POOL_CONCURRENCY_LIMIT)
        ensure_crash_detection(crash_after_s=crash_after_s)
        for name, directory, will_be in moved_deployments(
                chosen, project_dir=project_dir, pull_directories=declared.pull_directories):
            log.warning("deployment %s ran its flows from %s; from now on its runs start in "
                        "%s, which every worker must have (with the compose stack, register "
                        "from the images instead: README, Docker compose)", name, directory,
                        will_be)
    _prefect_deploy(project_dir, chosen, api_url=api_url, everything=names is None)
    with _api_answers(api_url, doing="reading the deployments back"):
        registered = _registered(chosen)
    with _api_answers(api_url, doing="matching the schedules to the YAML"):
        for name in chosen:
            match_schedules(f"{retrain.name}/{name}", declared.schedules.get(name))
    return registered


@contextlib.contextmanager
def _api_answers(api_url: str, *, doing: str) -> Iterator[None]:
    """The server's refusals (a role that may read but not write: 403) and a lost
    connection, after the checks of require_api, as one line."""
    try:
        yield
    except PrefectHTTPStatusError as exc:
        raise FerError(api_refused(api_url, exc, doing=doing)) from None
    except httpx.TransportError as exc:
        raise FerError(f"lost the Prefect API at {api_url} {doing} "
                       f"({exc or type(exc).__name__})") from None


@dataclass(frozen=True)
class DeclaredDeployments:
    """What deploy/prefect.yaml declares, read and checked once (by read_deployments)."""

    pools: dict[str, str]  # deployment name -> work pool name
    schedules: dict[str, dict[str, bool | None] | None]  # see _declared_schedules
    pull_directories: dict[str, str]  # see _pull_directories


def read_deployments(prefect_file: Path) -> DeclaredDeployments:
    """The deployments the YAML declares, each checked: a name and a work pool the server
    takes, and a retrain deployment's parameters as each of its runs will get them."""
    try:
        config = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FerError(f"cannot read {prefect_file} ({exc.strerror}); run from the fer checkout "
                       "or pass its folder") from None
    except yaml.YAMLError as exc:
        raise FerError(f"{prefect_file} is not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:  # a Latin-1 comment, say
        raise FerError(f"{prefect_file}: byte {exc.start} is not UTF-8; save the file as "
                       "UTF-8") from None
    if not isinstance(config or {}, dict):
        raise FerError(f"{prefect_file}: expected a mapping with a `deployments:` list at the "
                       f"top, got a {type(config).__name__}")
    deployments = (config or {}).get("deployments") or []
    if not isinstance(deployments, list):
        raise FerError(f"{prefect_file}: `deployments:` must be a list (each entry `- name: "
                       f"...`), got a {type(deployments).__name__}")
    pools = {}
    for index, deployment in enumerate(deployments):
        fields = deployment if isinstance(deployment, dict) else {}
        work_pool, name = fields.get("work_pool"), fields.get("name")
        pool = work_pool.get("name") if isinstance(work_pool, dict) else None
        if not isinstance(name, str) or not name or not isinstance(pool, str) or not pool:
            raise FerError(f"{prefect_file}: deployments[{index}] needs a name and a "
                           "work_pool.name (work_pool: {name: fer})")
        for field, value in (("name", name), ("work_pool.name", pool)):
            _refuse_banned_name(value, where=f"{prefect_file}: deployments[{index}] {field}")
        if pool.lower().startswith("prefect"):  # the server's answer (403) read as a login's
            raise FerError(f"{prefect_file}: deployments[{index}] work_pool.name {pool!r}: "
                           "names starting with 'prefect' are reserved for Prefect's own pools")
        if fields.get("entrypoint") == RETRAIN_ENTRYPOINT:
            _check_retrain_parameters(fields, where=f"{prefect_file}: deployments[{index}]")
        pools[name] = pool
    if not pools:
        raise FerError(f"{prefect_file} declares no deployments")
    return DeclaredDeployments(pools=pools, schedules=_declared_schedules(deployments),
                               pull_directories=_pull_directories(deployments, config.get("pull")))


RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain"


def _declared_schedules(deployments: list[dict]) -> dict[str, dict[str, bool | None] | None]:
    """Name of each deployment of fer's retrain flow -> each of its schedules' slug ->
    whether it is active (True where `active` is left out, as Prefect takes it; None
    where it is not a boolean: a template Prefect fills in), of the YAML's ``deployments``
    (read_deployments checked them). None where a schedule has no slug (Prefect
    then replaces the deployment's schedules with the YAML's itself, or refuses) or a
    templated one (`{{ $VAR }}`: known once Prefect fills it in)."""
    declared = {}
    for deployment in deployments:
        if deployment.get("entrypoint") != RETRAIN_ENTRYPOINT:  # another flow's: as Prefect has it
            continue
        if "schedule" in deployment:  # Prefect's older single `schedule:`: left as it has it
            declared[deployment["name"]] = None
            continue
        schedules = deployment.get("schedules") or []
        entries = [schedule if isinstance(schedule, dict) else {} for schedule in schedules]
        declared[deployment["name"]] = (
            None if any(not isinstance(entry.get("slug"), str) or "{{" in entry["slug"]
                        for entry in entries)
            else {entry["slug"]: _active(entry.get("active", True)) for entry in entries})
    return declared


def _active(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def match_schedules(full_name: str, declared: dict[str, bool | None] | None) -> None:
    """The deployment's schedules on the server made the YAML's: `prefect deploy` updates
    and adds schedules by slug but never removes one, so a schedule renamed (its slug
    with it), taken out of the YAML or left as `schedules: []` had kept firing beside the
    new one, and one paused with `active: false` stayed paused once that line went."""
    if declared is None:
        return
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(full_name)
        for schedule in deployment.schedules:
            if schedule.slug not in declared:
                client.delete_deployment_schedule(deployment.id, schedule.id)
                log.info("deployment %s: removed schedule %s, which %s does not declare",
                         full_name, schedule.slug or schedule.id, PREFECT_FILE)
            elif declared[schedule.slug] not in (None, schedule.active):
                client.update_deployment_schedule(deployment.id, schedule.id,
                                                  active=declared[schedule.slug])


def _check_retrain_parameters(deployment: dict, *, where: str) -> None:
    """The parameters each run of a retrain deployment gets: the deployment's, and each
    schedule's over them."""
    given = deployment.get("parameters") or {}
    schedules = deployment.get("schedules") or []
    if not isinstance(given, dict) or not isinstance(schedules, list):
        raise FerError(f"{where}: expected `parameters:` to be a mapping and `schedules:` a list")
    runs = [(f"{where} parameters", given)]
    for number, schedule in enumerate(schedules):
        extra = schedule.get("parameters") if isinstance(schedule, dict) else None
        if extra is not None:
            if not isinstance(extra, dict):
                raise FerError(f"{where} schedules[{number}] parameters: expected a mapping")
            runs.append((f"{where} schedules[{number}] parameters", {**given, **extra}))
    for label, parameters in runs:
        try:
            check_parameters(parameters)
        except FerError as exc:
            raise FerError(f"{label}: {exc}") from None


def _refuse_banned_name(value: str, *, where: str) -> None:
    """A name the server takes: Prefect refuses a blank one and one with any of
    BANNED_CHARACTERS (a validation traceback from its client, once the server was asked)."""
    if not value.strip("' \"") or any(banned in value for banned in BANNED_CHARACTERS):
        raise FerError(f"{where} {value!r}: expected a name that is not blank and has none of "
                       f"{' '.join(BANNED_CHARACTERS)}")


def ensure_work_pool(name: str, *, concurrency_limit: int | None) -> None:
    """Create process work pool ``name`` if missing, then set its concurrency limit."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type, concurrency_limit=concurrency_limit,
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # a worker may have created it first; keep its type
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))


def ensure_crash_detection(*, crash_after_s: int | None) -> AutomationCore:
    """Create or update the automation that marks a fer flow run Crashed once no heartbeat,
    and no end of the run, came for ``crash_after_s`` seconds (None: as the automation has
    it, or DEFAULT_CRASH_AFTER_S for a new one) after its last heartbeat, or after a worker
    took it (Pending) or it started.

    Prefect's server has no such rule of its own (Prefect documents this automation under
    "detect zombie flows"): a run whose worker died with it stays Running, and the pool,
    which runs one flow at a time, starts nothing else. Crashed frees it, and
    `prefect flow-run retry` resumes the run like any crashed one. Only runs tagged ``fer``
    (the tag every deployment of deploy/prefect.yaml gives its runs) are watched: each
    Pending or Running one from the deploy on (WATCH_EVENT; sent again after
    WATCH_RESEND_S when the rule was created or changed and runs are in progress).
    """
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(CRASH_AUTOMATION)
    if crash_after_s is None:
        crash_after_s = (int(existing[0].trigger.within.total_seconds()) if existing
                         else DEFAULT_CRASH_AFTER_S)
    automation = AutomationCore(
        name=CRASH_AUTOMATION,
        description="Marks a fer flow run Crashed when its heartbeats stop (its worker died); "
                    "managed by `fer deploy`.",
        trigger=EventTrigger(
            # from a worker's claim (Pending) too: a worker that dies before the run's
            # first heartbeat would otherwise leave it Pending, holding the pool, for ever
            after={"prefect.flow-run.heartbeat", WATCH_EVENT, *FLOW_RUN_STARTS},
            # (an event in both starts a new window: a retried run's Pending restarts it)
            expect={"prefect.flow-run.heartbeat", WATCH_EVENT, *FLOW_RUN_STARTS,
                    *FLOW_RUN_ENDS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": [FER_TAG_RESOURCE]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {crash_after_s} s: its worker, or the `fer retrain` "
                    "running it, or their machine stopped")],
    )
    with get_client(sync_client=True) as client:
        changed = not existing
        if changed:
            client.create_automation(automation)
        else:
            for duplicate in existing[1:]:  # two deploys racing each created one
                client.delete_automation(duplicate.id)
            current = existing[0]
            automation.enabled = current.enabled  # a pause set in the UI stays
            # The server gives an updated trigger a new id, and the timers of runs in
            # progress stay with the old one, so nothing is updated when nothing changed
            # (the compose stack's deploy step runs on every `up`, often just before a
            # worker is recreated).
            changed = _rule_of(current) != _rule_of(automation)
            if changed:
                client.update_automation(current.id, automation)
        # Every deploy: a deploy whose events were lost (the server gone between the
        # update and them) finds the rule unchanged when run again.
        watched = _watch_runs_in_progress(client)
        if watched and changed:
            log.info("crash automation %s; watching %d fer run(s) in progress from now (sent "
                     "again in %d s)", "updated" if existing else "created", len(watched),
                     WATCH_RESEND_S)
            time.sleep(WATCH_RESEND_S)
            _watch_runs_in_progress(client)
    return automation


def _watch_runs_in_progress(client) -> list[str]:
    """Send WATCH_EVENT for each fer flow run that is Pending or Running, so that the rule
    as it is now watches it from now (again: a window restarts); their names. (POSTed: the
    events websocket that Prefect's emit_event uses sends in the background and drops what
    it cannot send.)"""
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=[FER_TAG]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.PENDING, StateType.RUNNING]))))
    events = [Event(event=WATCH_EVENT,
                    resource={"prefect.resource.id": f"prefect.flow-run.{run.id}",
                              "prefect.resource.name": run.name},
                    related=[{"prefect.resource.id": FER_TAG_RESOURCE,
                              "prefect.resource.role": "tag"}]) for run in runs]
    if events:
        client.request("POST", "/events", json=[event.model_dump(mode="json")
                                                 for event in events])
    return [run.name for run in runs]


def _rule_of(automation: AutomationCore) -> dict:
    """What an automation does, without its ids and its on/off switch. Python objects, not
    JSON: the trigger's event names are sets, whose order in a JSON list differs between
    processes."""
    rule = automation.model_dump(exclude={"id", "enabled", "owner_resource"})
    rule["trigger"].pop("id", None)
    return rule


def _check_crash_after(crash_after_s: int) -> None:
    """At least two heartbeats at Prefect's shortest interval; a warning below three of the
    interval this machine's Prefect settings give (its default, 180 s, unless
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY says otherwise): the workers may send them that
    seldom, and a healthy run would be marked Crashed."""
    if crash_after_s < MIN_CRASH_AFTER_S:
        raise FerError(f"--crash-after {crash_after_s}: expected at least {MIN_CRASH_AFTER_S} "
                       "seconds (two heartbeats at Prefect's shortest interval, 30 s); "
                       f"default {DEFAULT_CRASH_AFTER_S}")
    heartbeat = get_current_settings().flows.heartbeat_frequency
    if heartbeat and crash_after_s < 3 * heartbeat:
        log.warning("--crash-after %d is less than three heartbeats at %d s "
                    "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY): set the workers' "
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY to %d or less, or a healthy run will be "
                    "marked Crashed", crash_after_s, heartbeat, crash_after_s // 3)


def _check_names(names: Sequence[str], pools: dict[str, str]) -> list[str]:
    unknown = [name for name in names if name not in pools]
    if unknown:
        raise FerError(f"no deployment named {', '.join(map(repr, unknown))} in {PREFECT_FILE}; "
                       f"expected one of {', '.join(pools)}")
    return list(dict.fromkeys(names))


def moved_deployments(names: Sequence[str], *, project_dir: Path,
                      pull_directories: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, folder, new folder) for each registered deployment of ``names`` whose runs
    start in another folder (its pull step's working directory) than registering it from
    ``project_dir`` will give it: a deploy from a host checkout against the compose stack's
    server sends the container's worker to a path it does not have, and every run fails at
    its pull step. The new folder is what ``project_dir``'s prefect.yaml declares
    (``pull_directories``, from read_deployments): the folder deployed from where it says
    ``{{ project.stdout }}`` (the YAML as shipped), its own folder where it names one (a
    Docker pool's /app: nothing moves)."""
    with get_client(sync_client=True) as client:
        found = _one_per_name(client, list(names))
    moved = []
    for _, deployment in found.values():
        will_be = _will_start_in(pull_directories.get(deployment.name),
                                 project_dir=project_dir)
        for directory in _working_directories(deployment.pull_steps):
            if (will_be is not None and "{{" not in directory  # known only when it runs
                    and Path(directory) != Path(will_be)):
                moved.append((deployment.name, directory, will_be))
    return moved


def _working_directories(pull_steps: Any) -> list[str]:
    """The directories of a pull section's set_working_directory steps."""
    directories = []
    for step in pull_steps if isinstance(pull_steps, list) else []:
        for kind, options in (step.items() if isinstance(step, dict) else ()):
            directory = options.get("directory") if isinstance(options, dict) else None
            if kind.endswith("set_working_directory") and isinstance(directory, str):
                directories.append(directory)
    return directories


def _pull_directories(deployments: list[dict], file_pull: Any) -> dict[str, str]:
    """Deployment name -> the working directory its pull steps declare (its own pull
    section, else the file's ``file_pull``), as written, of the YAML's ``deployments``
    (read_deployments checked them); a deployment without one is left out."""
    shared = _working_directories(file_pull)
    declared = {}
    for deployment in deployments:
        own = _working_directories(deployment.get("pull")) if "pull" in deployment else shared
        if own:
            declared[deployment["name"]] = own[-1]  # the last step sets it
    return declared


def _will_start_in(declared: str | None, *, project_dir: Path) -> str | None:
    """The folder a deployment's runs will start in once registered from ``project_dir``;
    None when unknown here (no pull step, or another template than the project's folder)."""
    if declared is None:
        return None
    if "{{" not in declared:
        return declared
    return str(project_dir) if declared.strip() == "{{ project.stdout }}" else None


def _prefect_deploy(project_dir: Path, names: list[str], *, api_url: str,
                    everything: bool) -> None:
    """``prefect --no-prompt deploy`` in the project folder, against ``api_url``."""
    selection = ["--all"] if everything else [arg for name in names for arg in ("--name", name)]
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy",
               "--prefect-file", str(PREFECT_FILE), *selection]
    # the settings this process read (a prefect.toml or .env where fer ran: an auth string,
    # TLS), which `prefect deploy` in the project folder would not find, then the API's
    env = {**os.environ,
           **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_API_URL": api_url}
    if api_key := PREFECT_API_KEY.value():
        env["PREFECT_API_KEY"] = api_key.get_secret_value()
    try:
        done = subprocess.run(command, cwd=project_dir, env=env, capture_output=True, text=True,
                              timeout=DEPLOY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise FerError(f"`prefect deploy` in {project_dir} did not finish in "
                       f"{DEPLOY_TIMEOUT_S}s; check the server at {api_url}") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()
        raise FerError(f"`prefect deploy` in {project_dir} failed (exit {done.returncode}): "
                       + " | ".join(line.strip() for line in output[-5:] if line.strip()))


def _one_per_name(client, names: list[str]) -> dict[str, tuple[str, Any]]:
    """Name -> (flow name, deployment) of the registered deployments of ``names``; fer's
    retrain flow's where another flow on a shared server has one of that name too."""
    found = client.read_deployments(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
    flows = {d.flow_id: client.read_flow(d.flow_id).name for d in found}
    chosen: dict[str, tuple[str, Any]] = {}
    for deployment in found:
        if deployment.name not in chosen or flows[deployment.flow_id] == retrain.name:
            chosen[deployment.name] = (flows[deployment.flow_id], deployment)
    return chosen


def _registered(names: list[str]) -> list[str]:
    """``flow/deployment`` for each name, from the server: proof that the deploy took effect."""
    with get_client(sync_client=True) as client:
        found = _one_per_name(client, names)
    full = {name: f"{flow}/{name}" for name, (flow, _) in found.items()}
    missing = [name for name in names if name not in full]
    if missing:
        raise FerError(f"`prefect deploy` finished but {', '.join(missing)} is not registered; "
                       "check the output of `prefect --no-prompt deploy --prefect-file "
                       f"{PREFECT_FILE} --all`")
    return [full[name] for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.deploy``: register the deployments, print one line per deployment."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy",
        description="Register the deployments of deploy/prefect.yaml with the Prefect server "
                    "at PREFECT_API_URL, creating work pool fer if needed.")
    parser.add_argument("--project-dir", type=Path, default=Path.cwd(),
                        help="folder holding deploy/prefect.yaml (default: the current one)")
    parser.add_argument("--name", action="append", dest="names",
                        help="deploy only this deployment (repeatable; default: all)")
    parser.add_argument("--crash-after", type=int, default=None, metavar="SECONDS",
                        help="mark a fer flow run Crashed after this many seconds without a "
                             "heartbeat (default: keep the current setting; "
                             f"{DEFAULT_CRASH_AFTER_S} for a new automation)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")  # (where Prefect set up no handler first)
    logging.getLogger("fer").setLevel(logging.INFO)
    try:
        deployed = deploy_all(args.project_dir, names=args.names,
                              crash_after_s=args.crash_after)
    except FerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in deployed:
        print(f"deployed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
