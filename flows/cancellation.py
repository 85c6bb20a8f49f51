"""A flow run that stops when it is cancelled, even after its Prefect server was away.

Prefect's worker stops a run that is cancelled by watching the server's events, falling back
to polling while the connection is down; the polling gives up after three failed checks (a
server restarting for about half a minute), and from then on nothing stops that run. With
Prefect 3.9.1, a training running while `docker compose restart prefect-server` took 50 s
was cancelled afterwards: it trained to its last epoch, published (possibly as the new
champion), and showed Cancelling for ever. So the run also asks the server itself, and
stops where Prefect's own stop did not come.
"""

from __future__ import annotations

import _thread
import threading
import uuid

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

CHECK_EVERY_S = 15.0
# Cancelling on this many checks in a row: Prefect's own stop, where it works, comes within
# seconds of the first, so the run stops itself only where Prefect's did not come.
SIGHTINGS_TO_STOP = 2


class CancellationWatch:
    """``with CancellationWatch(run_id) as watch:`` a thread reads the run's state every
    ``every_s`` and, once it has been Cancelling for SIGHTINGS_TO_STOP checks in a row,
    interrupts the main thread (a KeyboardInterrupt, as Ctrl-C) and sets ``watch.cancelled``.
    A server that does not answer is asked again at the next check. No interrupt is sent
    once the block has ended, so one raised comes within the block or its exit."""

    def __init__(self, flow_run_id: uuid.UUID | str, *, every_s: float = CHECK_EVERY_S) -> None:
        self.flow_run_id = uuid.UUID(str(flow_run_id))
        self.every_s = every_s
        self.cancelled = threading.Event()
        # the API as this thread's settings give it: the watching thread's own would be the
        # environment's alone, without a `temporary_settings` the caller runs under
        self._api = (PREFECT_API_URL.value(), PREFECT_API_KEY.value(),
                     PREFECT_API_AUTH_STRING.value())
        self._ended = threading.Event()
        self._deciding = threading.Lock()  # an interrupt is sent only while the block runs
        self._thread = threading.Thread(target=self._watch, name="fer-cancellation-watch",
                                        daemon=True)

    def __enter__(self) -> CancellationWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._deciding:
            self._ended.set()

    def _watch(self) -> None:
        sightings = 0
        while not self._ended.wait(self.every_s):
            state = self._state()
            sightings = sightings + 1 if state is not None and state.is_cancelling() else 0
            if sightings >= SIGHTINGS_TO_STOP:
                with self._deciding:
                    if not self._ended.is_set():
                        self.cancelled.set()
                        _thread.interrupt_main()
                return

    def _state(self) -> State | None:
        try:
            url, key, auth = self._api
            with SyncPrefectClient(url, api_key=key, auth_string=auth) as client:
                return client.read_flow_run(self.flow_run_id).state
        except Exception:  # the server away or restarting: asked again at the next check
            return None
