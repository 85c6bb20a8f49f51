"""A real Prefect server and real process workers for tests, plus a tiny training subset.

``prefect server start`` runs as a subprocess on a free loopback port with SQLite and
``PREFECT_HOME`` in a temp folder; workers run the exact command the Docker image runs.
Test modules load it as a plugin, ``pytest_plugins = ["prefect_server"]``, so the session
has one server however many modules use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import subset_of_shared_archive
from s3server import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
START_TIMEOUT_S = 120.0  # a cold SQLite migration on a slow CI runner takes a while
TINY_QUOTA = {"train": 20, "test": 10}  # images per class: a training takes seconds


def _die_with_parent() -> None:
    """In the child: SIGKILL it if pytest dies without running its teardown."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Process:
    """A child process in its own session, logging to a file, stopped with its whole group."""

    def __init__(self, command: list[str], *, env: dict[str, str], log_path: Path,
                 cwd: Path = REPO) -> None:
        self.command, self.env, self.log_path, self.cwd = command, env, log_path, cwd
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def kill_descendants(self) -> list[int]:
        """SIGKILL every process this one started (a worker's flow runs), as the kernel's
        out-of-memory killer would; the pids killed."""
        found = self._descendants()
        _kill(found)
        return found

    def kill_with_descendants(self) -> list[int]:
        """SIGKILL this process and every process it started together, as a machine that
        loses power stops them: nothing gets to report anything; the descendants' pids."""
        found = self._descendants()
        process, self._process = self._process, None
        _kill([process.pid, *found])
        process.wait(timeout=10)
        return found

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(stat.parent.name))
        found, pending = [], [self._process.pid]
        while pending:
            for child in children.get(pending.pop(), []):
                found.append(child)
                pending.append(child)
        return found

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, *, timeout: float, since: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the log from character ``since`` on (a length of
        ``log()`` taken earlier); fails with the log tail on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.log()[since:]):
                return match
            if not self.running():
                break
            time.sleep(0.5)
        tail = "\n".join(self.log().splitlines()[-40:])
        raise AssertionError(f"{pattern!r} not in the log of {self.command[:4]}; tail:\n{tail}")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class PrefectServer(Process):
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME and SQLite database."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.port = free_port()
        env = {
            **os.environ,
            **self.client_env(),
            # A queued run retries its deployment's concurrency slot every 2 s, not 30 s.
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        }
        super().__init__([sys.executable, "-m", "prefect", "server", "start", "--host",
                          "127.0.0.1", "--port", str(self.port)],
                         env=env, log_path=self.home / "server.log", cwd=self.home)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def client_env(self) -> dict[str, str]:
        """What a client process (CLI, worker, flow run) needs to use this server."""
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            # One result folder for workers and tests, so a run's result can be read back.
            "PREFECT_LOCAL_STORAGE_PATH": str(self.home / "storage"),
        }

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        super().start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            if not self.running() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prefect server did not come up in {START_TIMEOUT_S:.0f}s; "
                                   f"log:\n{self.log()[-3000:]}")
            time.sleep(0.5)


def worker_command() -> list[str]:
    """The command the Docker image runs (its CMD), with ``prefect`` taken from this venv."""
    instructions = [line for line in DOCKERFILE.read_text().splitlines()
                    if line.startswith("CMD ")]
    assert len(instructions) == 1, f"{DOCKERFILE}: expected exactly one CMD"
    command = json.loads(instructions[0].removeprefix("CMD "))
    assert command[0] == "prefect", f"{DOCKERFILE}: CMD should start a Prefect worker"
    return [str(Path(sys.executable).with_name("prefect")), *command[1:]]


def start_worker(server: PrefectServer, *, log_path: Path, env: dict[str, str]) -> Process:
    """A process worker for pool ``fer`` started as the container starts it."""
    worker_env = {
        **os.environ,
        **server.client_env(),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # poll every second instead of every 10
        # The image's healthcheck server binds a fixed port; give each test worker its own.
        "PREFECT_WORKER_WEBSERVER_PORT": str(free_port()),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **env,
    }
    return Process(worker_command(), env=worker_env, log_path=log_path).start()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One Prefect server for the session; this test process's client points at it."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home")).start()
    env = server.client_env()
    try:
        with temporary_settings(updates={
            PREFECT_API_URL: env["PREFECT_API_URL"],
            PREFECT_HOME: env["PREFECT_HOME"],
            PREFECT_LOCAL_STORAGE_PATH: env["PREFECT_LOCAL_STORAGE_PATH"],
        }):
            yield server
            _drain_prefect_workers()
    finally:
        server.stop()


def _drain_prefect_workers() -> None:
    """Send buffered logs and events now: after the server stops, they retry for minutes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # never started: nothing to send
        APILogWorker.instance().drain()
    EventsWorker.drain_all()


@pytest.fixture(scope="session")
def tiny_fer_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 train and 10 test images per class from ../shared/data/fer2013.zip, same layout."""
    return subset_of_shared_archive(tmp_path_factory.mktemp("tiny") / "fer2013-tiny.zip",
                                    train_per_class=TINY_QUOTA["train"],
                                    test_per_class=TINY_QUOTA["test"])


@pytest.fixture(scope="session")
def start_fer_worker(prefect_api: PrefectServer):
    """``start_fer_worker(log_path=..., env=...)``: a worker on the session's server."""
    return functools.partial(start_worker, prefect_api)


@pytest.fixture(scope="session")
def deployed(prefect_api: PrefectServer) -> list[str]:
    """Both deployments of deploy/prefect.yaml registered on the session's server."""
    from flows.deploy import deploy_all

    return deploy_all(REPO)
