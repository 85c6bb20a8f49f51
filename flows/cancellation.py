"""A flow run that stops when it is cancelled, even after its Prefect server was away.

Prefect's worker stops a run that is cancelled by watching the server's events, falling back
to polling while the connection is down; the polling gives up after three failed checks (a
server restarting for about half a minute), and from then on nothing stops that run. With
Prefect 3.9.1, a training running while `docker compose restart prefect-server` took 50 s
was cancelled afterwards: it trained to its last epoch, published (possibly as the new
champion), and showed Cancelling for ever. So the run also asks the server itself, and
stops where Prefect's own stop did not come. A run no worker runs (`fer retrain`'s, in its
own process) has no stop of Prefect's at all: cancelled in the UI, it trained on and
published; this is its only stop.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.context import get_settings_context

log = logging.getLogger(__name__)

CHECK_EVERY_S = 15.0
# Cancelling on this many checks in a row: Prefect's own stop, where it works, comes within
# seconds of the first, so the run stops itself only where Prefect's did not come.
SIGHTINGS_TO_STOP = 2
# Sent to the main thread to stop it: a real signal wakes a sleep (a retry's delay) or a
# socket wait, which _thread.interrupt_main does not, and it is not SIGINT, which a worker
# started in the background of a script passes on ignored.
STOP_SIGNAL = signal.SIGUSR1
# How the message of a run cancelled while it published begins: it published all the same,
# so following it (`fer train --remote --wait`) does not offer a retry that trains on.
CANCELLED_WHILE_PUBLISHING = "cancelled while publishing"


class CancelledOnServer(BaseException):
    """Raised in the main thread once the run is seen Cancelling: a BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way swallows it."""


class CancellationWatch:
    """``with CancellationWatch(run_id) as watch:`` (in the main thread) a thread reads the
    run's state every ``every_s`` and, once it has been Cancelling for SIGHTINGS_TO_STOP
    checks in a row, raises CancelledOnServer in the main thread. A check the server does
    not answer is made again at the next. Nothing is raised once the block has ended."""

    def __init__(self, flow_run_id: uuid.UUID | str, *, every_s: float = CHECK_EVERY_S) -> None:
        self.flow_run_id = uuid.UUID(str(flow_run_id))
        self.every_s = every_s
        # the caller's Prefect settings (API URL, key, TLS): a thread starts without them
        self._settings = get_settings_context().model_copy()
        self._ended = threading.Event()
        self._deciding = threading.Lock()  # the stop is sent only while the block runs
        self._main_thread = threading.main_thread().ident
        self._previous_handler = None  # the handler STOP_SIGNAL had before the block
        self._watching = False
        self._thread = threading.Thread(target=self._watch, name="fer-cancellation-watch",
                                        daemon=True)

    def __enter__(self) -> CancellationWatch:
        if threading.current_thread() is not threading.main_thread():  # no signal handler
            log.warning("not watching flow run %s for cancellation: a signal can stop the "
                        "main thread only, and this is another", self.flow_run_id)
            return self
        self._previous_handler = signal.signal(STOP_SIGNAL, _raise_cancelled)
        self._watching = True
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._watching:
            return
        try:
            with self._deciding:
                self._ended.set()
        finally:  # a stop already sent but not yet handled must not kill the process
            previous = self._previous_handler
            signal.signal(STOP_SIGNAL, previous if callable(previous) else signal.SIG_IGN)

    def is_cancelling(self) -> bool:
        """One check now (False where the server does not answer)."""
        state = self._state()
        return state is not None and state.is_cancelling()

    def _watch(self) -> None:
        sightings = 0
        with self._settings:
            while not self._ended.wait(self.every_s):
                sightings = sightings + 1 if self.is_cancelling() else 0
                if sightings >= SIGHTINGS_TO_STOP:
                    with self._deciding:
                        if not self._ended.is_set():
                            signal.pthread_kill(self._main_thread, STOP_SIGNAL)
                    return

    def _state(self) -> State | None:
        try:
            with get_client(sync_client=True) as client:
                return client.read_flow_run(self.flow_run_id).state
        except Exception:  # the server away or restarting: asked again at the next check
            return None


def _raise_cancelled(signum, frame) -> None:
    raise CancelledOnServer("the run was cancelled on its Prefect server")
