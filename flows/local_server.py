"""A Prefect server for one ``fer retrain`` in a terminal, started in a session of its own.

Prefect's own temporary server shares the terminal's process group, so Ctrl-C stopped it
together with fer: the flow run could then not record its stop, and Prefect's client kept
retrying the dead server for minutes before a traceback. Started apart, the server outlives
the Ctrl-C until fer has recorded the run as stopped, then goes with the command.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from fer.errors import FerError

STOP_TIMEOUT_S = 10
MIN_STARTUP_S = 120.0  # a database migration on a slow machine (the tests' servers too)
DRAIN_TIMEOUT_S = 10
STARTS = 3  # another program may take the free port before the server binds it


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """Start ``prefect server start`` on a free loopback port, point this process's Prefect
    client at it while the block runs, then stop it; yields its API URL."""
    with tempfile.TemporaryFile(mode="w+") as output:
        server, url = _start(output)
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _send_what_is_queued()
        finally:
            _stop(server)


def _start(output) -> tuple[subprocess.Popen, str]:
    """A healthy server and its API URL; a new port when one exits while starting."""
    for _ in range(STARTS):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui"],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_stop_with_parent,
            # Prefect's own temporary mode: only the services a run in this process needs
            # (no scheduler creating runs of the deployments in the same database)
            env={**os.environ, "PREFECT__SERVER_EPHEMERAL": "1"})
        try:
            if _healthy(server, url):
                return server, url
        except BaseException:
            _stop(server)
            raise
    output.seek(0)
    said = " ".join(output.read().split()[-40:])
    raise FerError(f"the temporary Prefect server did not start ({said or 'no output'}); run "
                   "`prefect server start` yourself and set PREFECT_API_URL to use it")


def _startup_timeout_s() -> float:
    """Prefect's startup timeout for its own temporary server (20 s), but at least 2 min:
    `prefect server start` migrates the database first (a fresh PREFECT_HOME, an upgrade),
    which Prefect's in-process one does not wait for."""
    return max(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), MIN_STARTUP_S)


def _healthy(server: subprocess.Popen, url: str) -> bool:
    """Whether the server answers; False once it has exited; a FerError when it neither
    answers nor exits in the startup timeout."""
    deadline = time.monotonic() + _startup_timeout_s()
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return True
            time.sleep(0.2)
    raise FerError(f"the temporary Prefect server at {url} did not answer within "
                   f"{_startup_timeout_s():g} s; run "
                   "`prefect server start` yourself and set PREFECT_API_URL to use it")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _stop_with_parent() -> None:
    """In the server's process: Linux sends it SIGTERM when fer dies by a signal that skips
    fer's own cleanup (SIGKILL, a hangup), so no server is left behind on its port."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _send_what_is_queued() -> None:
    """The run's last log lines and events, sent while the server is there to take them
    (sent at exit instead, they met a stopped server: a minute of retries, then an error)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: the run's state is recorded
            worker.drain_all(timeout=DRAIN_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
