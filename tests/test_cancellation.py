"""flows.cancellation: a run stops itself once the server says it is being cancelled."""

from __future__ import annotations

import time
import uuid

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Cancelling, Running

from flows.cancellation import SIGHTINGS_TO_STOP, CancellationWatch, CancelledOnServer

pytest_plugins = ["prefect_server"]
CHECK_S = 0.2


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
            time.sleep(CHECK_S * (SIGHTINGS_TO_STOP + 20))  # ample for the checks' requests
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
            time.sleep(CHECK_S * (SIGHTINGS_TO_STOP + 20))
    assert readable


@pytest.mark.integration
def test_one_sighting_of_cancelling_stops_nothing(run_id):
    """Cancelling on one check, then not on the next (Prefect's own stop came, or the run
    was set going again): the count starts again and nothing is raised."""
    every_s = 1.0
    with CancellationWatch(run_id, every_s=every_s):
        time.sleep(every_s / 2)
        set_state(run_id, Cancelling())  # the check at 1 s sees it
        time.sleep(every_s)
        set_state(run_id, Running())  # the check at 2 s does not
        time.sleep(every_s * 4)


def test_outside_the_main_thread_the_watch_watches_nothing(caplog):
    """A signal stops the main thread only: elsewhere the block runs unwatched, said so."""
    import threading

    def enter() -> None:
        with CancellationWatch(uuid.uuid4(), every_s=CHECK_S):
            time.sleep(CHECK_S * 3)

    worker = threading.Thread(target=enter)
    with caplog.at_level("WARNING", logger="flows.cancellation"):
        worker.start()
        worker.join()
    assert "not watching flow run" in caplog.text
