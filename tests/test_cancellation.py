"""flows.cancellation: a run stops itself once the server says it is being cancelled."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Cancelling, Running

from flows.cancellation import CancellationWatch, CancelledOnServer

pytest_plugins = ["prefect_server"]
CHECK_S = 0.2
STOPPED_WITHIN_S = 30  # the watch stops the block after two checks; ample on a loaded server


@flow
def idle() -> None:
    """A flow whose runs are made and moved from state to state by the tests, never run."""


@pytest.fixture
def run_id(prefect_api):
    """A flow run on the session's server, Running; Cancelled at the end."""
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(idle)
        client.set_flow_run_state(run.id, Running(), force=True)
    yield run.id
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelled(), force=True)


def set_state(run_id, state) -> None:
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)


@pytest.mark.integration
def test_a_running_run_is_left_alone_and_a_cancelling_one_interrupted(run_id):
    """Checks of a Running run interrupt nothing; once it is Cancelling, the block is stopped
    by CancelledOnServer after SIGHTINGS_TO_STOP checks, in a sleep too (a retry's delay)."""
    watch = CancellationWatch(run_id, every_s=CHECK_S)
    cancelling = False
    with pytest.raises(CancelledOnServer):
        with watch:
            time.sleep(CHECK_S * 6)  # Running: no interrupt
            set_state(run_id, Cancelling())
            cancelling = True
            time.sleep(STOPPED_WITHIN_S)
    assert cancelling


@pytest.mark.integration
def test_checks_the_server_fails_are_made_again(run_id):
    """A check that fails (here the server answers 404 for a run it does not hold; a server
    away or restarting fails alike) interrupts nothing and ends nothing: the next checks,
    once they read the run Cancelling, interrupt the block."""
    set_state(run_id, Cancelling())
    watch = CancellationWatch(uuid.uuid4(), every_s=CHECK_S)
    readable = False
    with pytest.raises(CancelledOnServer):
        with watch:
            time.sleep(CHECK_S * 6)
            watch.flow_run_id = run_id
            readable = True
            time.sleep(STOPPED_WITHIN_S)
    assert readable


@pytest.mark.integration
def test_one_sighting_of_cancelling_stops_nothing(run_id):
    """Cancelling on one check, then not on the next (Prefect's own stop came, or the run
    was set going again): the count starts again and nothing is raised."""
    watch = CancellationWatch(run_id, every_s=CHECK_S)
    sighted, set_going = threading.Event(), threading.Event()
    check = watch.is_cancelling

    def check_holding_each_sighting() -> bool:
        """A check that reads Cancelling waits until the test has set the run Running again,
        however slowly the server answers: the next check reads Running."""
        cancelling = check()
        if cancelling:
            sighted.set()
            set_going.wait(STOPPED_WITHIN_S)
            set_going.clear()
        return cancelling

    watch.is_cancelling = check_holding_each_sighting
    with watch:
        for _ in range(2):  # the second sighting stops it if the count was not started again
            set_state(run_id, Cancelling())
            assert sighted.wait(STOPPED_WITHIN_S)
            sighted.clear()
            set_state(run_id, Running())
            set_going.set()
            time.sleep(CHECK_S * 5)  # checks that read Running, none raising


def test_outside_the_main_thread_the_watch_watches_nothing(caplog):
    """A signal stops the main thread only: elsewhere the block runs unwatched, said so."""
    def enter() -> None:
        with CancellationWatch(uuid.uuid4(), every_s=CHECK_S):
            time.sleep(CHECK_S * 3)

    worker = threading.Thread(target=enter)
    with caplog.at_level("WARNING", logger="flows.cancellation"):
        worker.start()
        worker.join()
    assert "not watching flow run" in caplog.text
