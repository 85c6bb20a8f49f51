"""Start a run of the ``retrain`` deployment on a Prefect server and follow it to the end.

The server is the one ``PREFECT_API_URL`` names; a worker polling work pool ``fer`` runs the
flow. Problems a user can fix (no server, no deployment, no worker, a failed run) raise
``FerError`` with the one line that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, State, StateType, WorkPoolStatus
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL
from prefect.utilities.urls import url_for

from fer.errors import FerError, RunStillGoing
from fer.fetch import redacted
from flows.cancellation import CANCELLED_WHILE_PUBLISHING
from flows.retrain import METRICS_ARTIFACT, REPORT_ARTIFACT, parse_report_markdown

DEPLOYMENT = "retrain/retrain"
POLL_SECONDS = 5.0
PICKUP_TIMEOUT_S = 120.0
WORKER_LOST_S = 300.0  # the server takes ~2 min to notice a worker gone; then this much more
# SCHEDULED states that wait for a worker to take the run: not taken yet, or sent back by
# a deployment's concurrency limit (ENQUEUE: fer's have none since 2026-12-07, a user's
# may), for a worker to take again
_WAITING_FOR_WORKER = {"Scheduled", "Late", "AwaitingConcurrencySlot"}
_PARAMETERS_REFUSED = {400, 409, 422}  # how the server answers parameters it will not take
CREATED_OR_NOT = ("the run may have been created: `prefect flow-run ls --flow-name retrain` "
                  "shows it, before you trigger another")

StateCallback = Callable[[State], None]
"""Called with the state each time a followed run's state changes name."""


@dataclass(frozen=True)
class PostedReport:
    """The test report a retrain run posted to the server, whichever store it published to."""

    run_id: str
    text: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class RemoteRun:
    """A flow run on the server: where to see it, its state, and once complete its result and
    report."""

    flow_run_id: str
    name: str
    url: str
    state: str
    result: dict | None = None
    report: PostedReport | None = None


def require_api(*, otherwise: str = "") -> str:
    """The Prefect API URL, checked to answer and to take our credentials; a FerError naming
    the URL when it does not. ``otherwise``: what the user can do without a server, for the
    message when none is set."""
    url = PREFECT_API_URL.value()
    if not url:
        raise FerError(
            "PREFECT_API_URL is not set, so there is no Prefect server to talk to; start one "
            "with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
            + (f", or {otherwise}" if otherwise else "")
        )
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        if problem is not None:
            raise FerError(f"cannot reach the Prefect API at {url} ({problem}); check that the "
                           "server is running and PREFECT_API_URL is right")
        try:  # /health answers without a login: ask something that needs one
            client.read_work_pools(limit=1)
        except PrefectHTTPStatusError as exc:
            raise FerError(api_refused(url, exc, doing="reading its work pools")) from None
    return url


def _creating(request: httpx.Request) -> bool:
    """Whether ``request`` is the one that creates the flow run (run_deployment reads the
    deployment first: a failure there leaves no run behind)."""
    return request.method == "POST" and request.url.path.endswith("/create_flow_run")


def api_refused(url: str, exc: PrefectHTTPStatusError, *, doing: str) -> str:
    """A Prefect API's error answer in a line; a refused login says which setting to set."""
    status = exc.response.status_code
    if status in (401, 403):
        return (f"the Prefect API at {url} refused our credentials ({status}) {doing}; set "
                "PREFECT_API_AUTH_STRING to its PREFECT_SERVER_API_AUTH_STRING (user:password), "
                "or PREFECT_API_KEY for Prefect Cloud")
    return f"the Prefect API at {url} answered {status} {doing}: {_detail(exc)}"


def trigger_retrain(
    parameters: Mapping[str, Any],
    *,
    wait: bool = False,
    deployment: str = DEPLOYMENT,
    poll_seconds: float = POLL_SECONDS,
    pickup_timeout_s: float = PICKUP_TIMEOUT_S,
    on_state: StateCallback | None = None,
) -> RemoteRun:
    """Start a run of ``deployment`` with ``parameters``; with ``wait``, follow it to the end.

    Never blocks on the server: the run is created and this returns at once unless ``wait``.
    """
    api_url = require_api(otherwise="train in-process with `fer retrain`")
    starting = f"while starting a run of deployment {deployment!r}"
    try:
        # one key for this request: the Prefect client resends it after a timeout or a 502/503,
        # and the server answers a resend with the run it created instead of a second one
        flow_run = run_deployment(deployment, parameters=dict(parameters), timeout=0,
                                  as_subflow=False, idempotency_key=uuid4().hex)
    except ObjectNotFound:
        raise FerError(f"deployment {deployment!r} not found at {api_url}; register it with "
                       "`fer deploy` (with the compose stack, with its deploy service)") from None
    except PrefectHTTPStatusError as exc:
        status = exc.response.status_code
        if status in _PARAMETERS_REFUSED:
            shown = {name: redacted(value) if isinstance(value, str) else value
                     for name, value in parameters.items()}  # a presigned --data URL
            raise FerError(f"deployment {deployment!r} refused parameters {shown}: "
                           f"{_detail(exc)}") from None
        if status < 500 or not _creating(exc.request):
            raise FerError(api_refused(api_url, exc, doing=starting)) from None
        # whether the run was created is not known: exit as for a run not followed to its end
        raise RunStillGoing(f"{api_refused(api_url, exc, doing=starting)}; "
                            f"{CREATED_OR_NOT}") from None
    except httpx.TransportError as exc:
        lost = f"lost the Prefect API at {api_url} {starting} ({exc or type(exc).__name__})"
        if not _creating(exc.request):
            raise FerError(lost) from None
        raise RunStillGoing(f"{lost}; {CREATED_OR_NOT}") from None
    if not wait:
        return _describe(flow_run)
    return follow_run(flow_run.id, poll_seconds=poll_seconds, pickup_timeout_s=pickup_timeout_s,
                      on_state=on_state)


def follow_run(
    flow_run_id: UUID | str,
    *,
    poll_seconds: float = POLL_SECONDS,
    pickup_timeout_s: float = PICKUP_TIMEOUT_S,
    worker_lost_s: float = WORKER_LOST_S,
    on_state: StateCallback | None = None,
) -> RemoteRun:
    """Poll a flow run until it is final; its result when it completed.

    Raises FerError when the run has waited for a worker for ``pickup_timeout_s`` (since it
    was created, or since its concurrency limit sent it back) and no worker polls its pool
    (a run queued behind another training, with a worker online, is waited for); when a
    claimed run is still pending or running but no worker has polled its pool for ``worker_lost_s``
    (its worker died: the server would show it running for ever); or when the run ends
    failed, crashed or cancelled.
    """
    waiting_since, seen, unpolled_since = time.monotonic(), None, None
    with get_client(sync_client=True) as client:
        while True:
            with _api_answers(flow_run_id):
                flow_run = client.read_flow_run(UUID(str(flow_run_id)))
            state = flow_run.state
            if state is not None and state.name != seen:
                seen = state.name
                if on_state:
                    on_state(state)
            if not _waiting_for_worker(flow_run):
                waiting_since = None
            elif waiting_since is None:
                waiting_since = time.monotonic()
            if state is not None and state.is_final():
                with _api_answers(flow_run_id, ended=state.name):
                    return _finish(client, flow_run)
            with _api_answers(flow_run_id):
                if (waiting_since is not None
                        and time.monotonic() - waiting_since > pickup_timeout_s):
                    paused = _paused(client, flow_run)
                    if paused or not _worker_online(client, flow_run.work_pool_name):
                        raise RunStillGoing(_not_picked_up(flow_run, pickup_timeout_s,
                                                           paused=paused))
                # Pending: a worker took it and is starting it; one that dies then leaves
                # it Pending as surely as a dead one leaves a run Running
                if state is not None and state.type in (StateType.RUNNING, StateType.PENDING):
                    if _worker_online(client, flow_run.work_pool_name, paused_counts=True):
                        unpolled_since = None
                    elif unpolled_since is None:
                        unpolled_since = time.monotonic()
                    elif time.monotonic() - unpolled_since > worker_lost_s:
                        raise RunStillGoing(_worker_lost(flow_run, worker_lost_s))
            time.sleep(poll_seconds)


@contextlib.contextmanager
def _api_answers(flow_run_id, *, ended: str | None = None) -> Iterator[None]:
    """The server's failures while following, as one line naming the run: gone (deleted in
    the UI) is the end of it; unreachable or erroring leaves the run's outcome unknown,
    unless the run was seen ``ended`` already (its report could not be read)."""
    try:
        yield
    except ObjectNotFound:
        raise FerError(f"flow run {flow_run_id} is no longer on the server at "
                       f"{PREFECT_API_URL.value()} (deleted?)") from None
    except (httpx.TransportError, PrefectHTTPStatusError) as exc:
        if ended:
            raise FerError(f"flow run {flow_run_id} ended {ended}, but its report could not "
                           f"be read from {PREFECT_API_URL.value()} ({exc}); see it in the "
                           "Prefect UI") from None
        raise RunStillGoing(f"lost the Prefect API at {PREFECT_API_URL.value()} ({exc}) while "
                            f"following flow run {flow_run_id}; the run goes on without us: "
                            "see it in the Prefect UI") from None


def _waiting_for_worker(flow_run: FlowRun) -> bool:
    state = flow_run.state
    return state is None or (state.type == StateType.SCHEDULED
                             and state.name in _WAITING_FOR_WORKER)


def _worker_online(client, pool: str | None, *, paused_counts: bool = False) -> bool:
    """Whether any worker polls ``pool`` (the server marks a pool READY while one does). A
    PAUSED pool says nothing of its workers: ``paused_counts`` decides."""
    if pool is None:
        return False
    try:
        status = client.read_work_pool(pool).status
    except ObjectNotFound:
        return False
    return status == WorkPoolStatus.READY or (paused_counts and status == WorkPoolStatus.PAUSED)


def _paused(client, flow_run: FlowRun) -> str | None:
    """What holds the run back when its pool or its work queue is paused (a worker polls
    neither, however many run), with the command that resumes it; None when neither is."""
    pool, queue = flow_run.work_pool_name, flow_run.work_queue_name
    if pool is None:
        return None
    try:
        if client.read_work_pool(pool).status == WorkPoolStatus.PAUSED:
            return f"work pool {pool} is paused: `prefect work-pool resume {pool}` resumes it"
        if queue and client.read_work_queue_by_name(queue, work_pool_name=pool).is_paused:
            return (f"work queue {queue} of pool {pool} is paused: `prefect work-queue resume "
                    f"{queue} --pool {pool}` resumes it")
    except ObjectNotFound:
        return None
    return None


def _not_picked_up(flow_run: FlowRun, timeout_s: float, *, paused: str | None = None) -> str:
    pool = flow_run.work_pool_name or "fer"
    remedy = paused or (f"start one with `prefect worker start --pool {pool}` in the fer "
                        "checkout the deployments were registered from (with the compose "
                        "stack: `docker compose -f docker/compose.yaml --env-file docker/.env "
                        "up -d worker`)")
    if flow_run.state is not None and flow_run.state.name == "AwaitingConcurrencySlot":
        waited = (f"flow run {flow_run.name} ({flow_run.id}) was sent back by its concurrency "
                  f"limit and no worker has taken it again in {timeout_s:g}s")
    else:
        waited = f"no worker picked up flow run {flow_run.name} ({flow_run.id}) in {timeout_s:g}s"
    return (f"{waited}; "
            f"{remedy} (the run stays queued and starts then; cancel it with "
            f"`prefect flow-run cancel {flow_run.id}`)")


def _worker_lost(flow_run: FlowRun, lost_s: float) -> str:
    pool = flow_run.work_pool_name or "fer"
    doing = ("was taken by a worker (Pending)"
             if flow_run.state is not None and flow_run.state.type == StateType.PENDING
             else "is running")
    return (f"flow run {flow_run.name} ({flow_run.id}) {doing}, but no worker has polled "
            f"pool {pool} for {lost_s:g}s: its worker has probably died. The automation `fer "
            f"deploy` (or the compose stack) installs marks it Crashed once its heartbeats "
            f"have stopped for --crash-after seconds, which frees the pool; without it the "
            f"server shows the run running until `prefect flow-run cancel {flow_run.id}`. "
            f"Once a worker is "
            f"back, `prefect flow-run retry {flow_run.id}` runs it again")


def _finish(client, flow_run: FlowRun) -> RemoteRun:
    state = flow_run.state
    if not state.is_completed():
        retry = ("" if (state.message or "").startswith(CANCELLED_WHILE_PUBLISHING) else
                 f"; `prefect flow-run retry {flow_run.id}` runs it again, its training "
                 "continuing from the last finished epoch"
                 if state.type in (StateType.CRASHED, StateType.CANCELLED) else
                 f"; once its cause is fixed, `prefect flow-run retry {flow_run.id}` runs it "
                 "again")
        raise FerError(f"flow run {flow_run.name} ({flow_run.id}) ended {state.name}: "
                       f"{state.message or 'no message'}{retry}; logs: {_url(flow_run)}")
    return _describe(flow_run, result=_result(flow_run), report=_posted_report(client, flow_run))


def _posted_report(client, flow_run: FlowRun) -> PostedReport | None:
    """The report and metrics the flow posted as artifacts; None when it posted none."""
    posted = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    # oldest first, so that a retried run's own report wins over its earlier attempt's (ids
    # are random: ordered by them, either could)
    by_key = {artifact.key: artifact.data
              for artifact in sorted(posted, key=lambda artifact: artifact.created)
              if artifact.key}
    parsed = parse_report_markdown(by_key.get(REPORT_ARTIFACT) or "")
    if parsed is None:
        return None
    rows = json.loads(by_key.get(METRICS_ARTIFACT) or "[]")
    metrics = {row["metric"]: row["value"] for row in rows}
    return PostedReport(run_id=parsed[0], text=parsed[1], metrics=metrics)


def _result(flow_run: FlowRun) -> dict | None:
    """The flow's return value when its result storage is reachable from here, else None.

    A worker on another machine (the container) keeps results on its own disk.
    """
    try:
        value = flow_run.state.result(raise_on_failure=False, retry_result_failure=False)
    except Exception:  # missing or unreadable result storage: the run id is enough
        return None
    return value if isinstance(value, dict) else None


def _describe(flow_run: FlowRun, *, result: dict | None = None,
              report: PostedReport | None = None) -> RemoteRun:
    state = flow_run.state.name if flow_run.state else "Unknown"
    return RemoteRun(flow_run_id=str(flow_run.id), name=flow_run.name, url=_url(flow_run),
                     state=state, result=result, report=report)


def _url(flow_run: FlowRun) -> str:
    api_url = PREFECT_API_URL.value() or ""
    return (url_for(flow_run)
            or f"{api_url.removesuffix('/api')}/runs/flow-run/{flow_run.id}")


def _detail(exc: PrefectHTTPStatusError) -> str:
    """The server's reason, from a JSON body's ``detail`` (a proxy's page: its text)."""
    try:
        body = exc.response.json()
    except ValueError:
        body = exc.response.text
    if isinstance(body, dict):
        body = body.get("detail") or body.get("exception_message") or ""
    return " ".join(str(body).split()) or str(exc.response.status_code)
