"""flows.cancellation: a run stops itself once the server says it is being cancelled."""

from __future__ import annotations

import time
import uuid

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Cancelling, Running

from flows.cancellation import SIGHTINGS_TO_STOP, CancellationWatch

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
    """Checks of a Running run interrupt nothing; once it is Cancelling, the block gets a
    KeyboardInterrupt (as Ctrl-C) after SIGHTINGS_TO_STOP checks, and says it was
    cancelled."""
    watch = CancellationWatch(run_id, every_s=CHECK_S)
    cancelling = False
    with pytest.raises(KeyboardInterrupt):
        with watch:
            time.sleep(CHECK_S * 6)  # Running: no interrupt
            set_state(run_id, Cancelling())
            cancelling = True
            time.sleep(CHECK_S * (SIGHTINGS_TO_STOP + 20))  # ample for the checks' requests
    assert cancelling and watch.cancelled.is_set()


@pytest.mark.integration
def test_checks_the_server_fails_are_made_again(run_id):
    """A check that fails (here the server answers 404 for a run it does not hold; a server
    away or restarting fails alike) interrupts nothing and ends nothing: the next checks,
    once they read the run Cancelling, interrupt the block."""
    set_state(run_id, Cancelling())
    watch = CancellationWatch(uuid.uuid4(), every_s=CHECK_S)
    readable = False
    with pytest.raises(KeyboardInterrupt):
        with watch:
            time.sleep(CHECK_S * 6)
            watch.flow_run_id = run_id
            readable = True
            time.sleep(CHECK_S * (SIGHTINGS_TO_STOP + 20))
    assert readable and watch.cancelled.is_set()
