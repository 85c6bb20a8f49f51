"""A Prefect server for one ``fer retrain`` in a terminal, started in a session of its own.

Prefect's own temporary server shares the terminal's process group, so Ctrl-C stopped it
together with fer: the flow run could then not record its stop, and Prefect's client kept
retrying the dead server for minutes before a traceback. Started apart, the server outlives
the Ctrl-C until fer has recorded the run as stopped, then goes with the command.
"""

from __future__ import annotations

import contextlib
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
DRAIN_TIMEOUT_S = 10


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """Start ``prefect server start`` on a free loopback port, point this process's Prefect
    client at it while the block runs, then stop it; yields its API URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    with tempfile.TemporaryFile(mode="w+") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui", "--no-services"],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_until_healthy(server, url, output)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _send_what_is_queued()
        finally:
            server.terminate()
            try:
                server.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _send_what_is_queued() -> None:
    """The run's last log lines and events, sent while the server is there to take them
    (sent at exit instead, they met a stopped server: a minute of retries, then an error)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: the run's state is recorded
            worker.drain_all(timeout=DRAIN_TIMEOUT_S)


def _wait_until_healthy(server: subprocess.Popen, url: str, output) -> None:
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return
            time.sleep(0.2)
    output.seek(0)
    said = " ".join(output.read().split()[-40:])
    raise FerError(f"the temporary Prefect server at {url} did not start "
                   f"({said or 'no output'}); run `prefect server start` yourself and set "
                   "PREFECT_API_URL to use it")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
