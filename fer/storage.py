"""Publish training runs to object storage and read them back: a local folder or S3.

Both backends hold the same layout under their root or prefix::

    runs/<run-id>/<artifact>        each artifact the run's manifest lists (every file of
                                    the run folder if it lists none)
    runs/<run-id>/manifest.json     the run's manifest + ``files`` + ``metrics``; written LAST
    latest.json, champion.json      pointers; written after the manifest they name

A run without a remote manifest is incomplete and invisible to every reader, so a publish
that dies halfway leaves nothing a reader can pick up and can simply be repeated.
The backends only move bytes; publishing, listing and verification live once, above them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bce
from botocore.config import Config

from fer.errors import FerError, StorageError

MANIFEST = "manifest.json"
METRICS = "metrics.json"
REPORT = "classification_report.txt"
POINTERS = ("latest", "champion")
MULTIPART_THRESHOLD = 8 * 1024 * 1024

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


# --- the backend interface ------------------------------------------------------------------


class Store(Protocol):
    """Where published runs live. Keys are ``/``-separated and relative to the store's root."""

    location: str

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file; the object appears whole or not at all."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object (manifests, pointers) whole or not at all."""

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` when it does not exist."""

    def download(self, key: str, dest: Path) -> None:
        """Copy an object to a local file."""

    def run_ids(self) -> list[str]:
        """Every id under ``runs/``, complete or not (callers check for the manifest)."""

    def url(self, key: str) -> str:
        """Where a key lives, for messages and results."""


class LocalStore:
    """Runs in a local folder (the default ``./artifacts``); writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.location = str(self.root)

    def put_file(self, key: str, path: Path) -> None:
        self._write(key, lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        with _local_errors("read", path):
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

    def download(self, key: str, dest: Path) -> None:
        source = self._path(key)
        with _local_errors("read", source):
            shutil.copyfile(source, dest)

    def run_ids(self) -> list[str]:
        runs = self.root / "runs"
        with _local_errors("list", runs):
            if not runs.is_dir():
                return []
            return sorted(entry.name for entry in runs.iterdir() if entry.is_dir())

    def url(self, key: str) -> str:
        return str(self._path(key))

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(key).parts)

    def _write(self, key: str, fill: Callable[[Path], object]) -> None:
        # Write beside the target and rename: readers never see half a file.
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with _local_errors("write", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fill(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


@contextmanager
def _local_errors(verb: str, path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StorageError(
            f"cannot {verb} {path}: {reason}; check the storage folder, its permissions "
            "and free space"
        ) from exc


class S3Store:
    """Runs in an S3 bucket (AWS, MinIO, SeaweedFS) under a key prefix.

    Credentials come only from the standard AWS chain (environment, profile, instance role);
    fer never accepts, stores or prints them.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        max_attempts: int = 3,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._read_timeout = read_timeout
        self._client = _s3_client(
            endpoint_url,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self.endpoint = _without_userinfo(self._client.meta.endpoint_url)

    def ensure_bucket(self, *, create: bool = False) -> None:
        """Fail early and clearly when the bucket is missing, or create it when asked."""
        if self._bucket_exists():
            return
        if not create:
            raise StorageError(self._missing_bucket())
        with self._errors(f"creating bucket '{self.bucket}'"):
            self._client.create_bucket(Bucket=self.bucket, **self._bucket_location())

    def _bucket_exists(self) -> bool:
        with self._errors(f"checking bucket '{self.bucket}'"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except bce.ClientError as exc:
                if _error_code(exc) in {"404", "NoSuchBucket"}:
                    return False
                raise
        return True

    def _missing_bucket(self) -> str:
        return (f"bucket '{self.bucket}' does not exist at {self.endpoint}; "
                "create it or pass --create-bucket")

    def put_file(self, key: str, path: Path) -> None:
        with self._errors(f"uploading {self._key(key)}"):
            self._client.upload_file(str(path), self.bucket, self._key(key),
                                     Config=_transfer_config())

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(f"writing {self._key(key)}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        with self._errors(f"reading {self._key(key)}"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except bce.ClientError as exc:
                if _error_code(exc) in {"NoSuchKey", "404"}:
                    return None
                raise
            return response["Body"].read()

    def download(self, key: str, dest: Path) -> None:
        with self._errors(f"downloading {self._key(key)}"):
            self._client.download_file(self.bucket, self._key(key), str(dest),
                                       Config=_transfer_config())

    def run_ids(self) -> list[str]:
        runs = self._key("runs/")
        ids = []
        with self._errors(f"listing {runs}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=runs, Delimiter="/"
            )
            for page in pages:
                ids += [p["Prefix"][len(runs):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(ids)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _bucket_location(self) -> dict[str, Any]:
        region = self._client.meta.region_name
        if region in (None, "us-east-1", "aws-global"):
            return {}
        return {"CreateBucketConfiguration": {"LocationConstraint": region}}

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn any boto3/botocore failure into one StorageError line without secrets."""
        try:
            yield
        except (bce.ClientError, bce.BotoCoreError, Boto3Error) as exc:
            raise StorageError(self._explain(exc, action),
                               transient=_is_transient(_root_cause(exc))) from exc

    def _explain(self, exc: BaseException, action: str) -> str:
        cause = _root_cause(exc)
        where = self.endpoint
        if isinstance(cause, bce.NoCredentialsError | bce.PartialCredentialsError):
            return (f"no usable AWS credentials for {where} while {action}; set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if isinstance(cause, bce.ReadTimeoutError):
            return (f"S3 endpoint {where} did not answer within {self._read_timeout:g}s while "
                    f"{action}; check that the server is healthy and retry")
        if isinstance(cause, bce.ConnectionError | bce.HTTPClientError):
            return (f"cannot reach S3 endpoint {where} while {action} "
                    f"({_connection_reason(cause)}); check --endpoint-url / AWS_ENDPOINT_URL "
                    "and that the server is running")
        if isinstance(cause, bce.ClientError):
            return self._explain_client_error(cause, action)
        return f"S3 error at {where} while {action}: {_one_line(str(cause))}"

    def _explain_client_error(self, exc: Any, action: str) -> str:
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return self._missing_bucket()
        if code in _AUTH_CODES:
            return (f"S3 at {self.endpoint} denied access while {action} ({code}); check the "
                    "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and "
                    f"their permissions on bucket '{self.bucket}'")
        message = exc.response.get("Error", {}).get("Message", "")
        return f"S3 at {self.endpoint} refused {action}: {code} {_one_line(message)}".rstrip()


_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable",
                    "SlowDown", "RequestTimeout"}


def _is_transient(cause: BaseException) -> bool:
    """Whether trying again later may succeed: the server was unreachable, slow or failing."""
    if isinstance(cause, bce.ClientError):
        return _error_code(cause) in _TRANSIENT_CODES
    return not isinstance(cause, bce.NoCredentialsError | bce.PartialCredentialsError
                          | bce.SSLError | bce.ParamValidationError)


_AUTH_CODES = {
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed", "AllAccessDisabled",
}


def _s3_client(endpoint_url: str | None, *, max_attempts: int, connect_timeout: float,
               read_timeout: float):
    """A boto3 client that fails fast: few retries, short timeouts, path-style addressing."""
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"},
        # botocore >= 1.36 adds CRC checksums to every upload; some S3-compatible servers
        # reject them, so send checksums only where the API requires them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
    except (bce.BotoCoreError, ValueError) as exc:
        raise StorageError(f"cannot set up the S3 client: {_one_line(str(exc))}") from exc


def _transfer_config():
    # "classic" keeps our retry and timeout settings even when awscrt is installed.
    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_THRESHOLD,
        max_concurrency=4,
        preferred_transfer_client="classic",
    )


def _root_cause(exc: BaseException) -> BaseException:
    """The botocore error under boto3's transfer wrappers (which flatten it into text)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, bce.ClientError | bce.BotoCoreError):
            return current
        seen.add(id(current))
        current = getattr(current, "last_exception", None) or current.__cause__ or (
            current.__context__
        )
    return exc


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _connection_reason(exc: BaseException) -> str:
    if isinstance(exc, bce.ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, bce.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, bce.EndpointConnectionError):
        return "connection failed"
    return "connection broken"


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def open_store(url: str, *, endpoint_url: str | None = None,
               create_bucket: bool = False) -> Store:
    """The store behind a URL: a folder path or ``file://PATH``, or ``s3://BUCKET/PREFIX``.

    An S3 bucket is checked here, so a wrong bucket, endpoint or key fails before any upload.
    """
    if "://" not in url:
        return LocalStore(Path(url))
    scheme, _, rest = url.partition("://")
    if scheme == "file":
        return LocalStore(Path(rest))
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        store = S3Store(_check_bucket(bucket, url=url), prefix=prefix, endpoint_url=endpoint_url)
        store.ensure_bucket(create=create_bucket)
        return store
    raise StorageError(
        f"unsupported storage URL {url!r} (scheme {scheme!r}); expected a folder path, "
        "file://PATH or s3://BUCKET/PREFIX"
    )


def _check_bucket(bucket: str, *, url: str) -> str:
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(
            f"storage URL {url!r} has bucket name {bucket!r}; expected 3-63 lowercase letters, "
            "digits, '.' or '-' as in s3://BUCKET/PREFIX"
        )
    return bucket


# --- publishing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishResult:
    """What ``publish_run`` did: where the run went and whether it is now the champion."""

    run_id: str
    became_champion: bool
    location: str


@dataclass(frozen=True)
class _LocalRun:
    folder: Path
    run_id: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    files: dict[str, dict[str, Any]]


def publish_run(run_dir: Path, store: Store, *, force_champion: bool = False) -> PublishResult:
    """Upload a run folder, then its manifest, then move the pointers; safe to repeat.

    ``latest`` moves to the newest run by ``created``; ``champion`` moves when the run was
    trained on the same data as the current champion and its saved model's validation
    accuracy is at least the champion's, or always with ``force_champion``. Choosing on test
    accuracy would be choosing the model on the test set; across different data neither
    figure compares.
    """
    run = _read_run_folder(Path(run_dir))
    remote = {**run.manifest, "files": run.files, "metrics": run.metrics}
    published = _load_manifest(store, run.run_id)
    if published is None:
        _upload(run, remote, store)
    elif published.get("files") != run.files:
        raise StorageError(
            f"run '{run.run_id}' is already published at {store.url(_run_key(run.run_id, ''))} "
            "with different files; published runs never change, so give this run a new id"
        )
    became_champion = _move_pointers(store, remote, force_champion=force_champion)
    return PublishResult(run.run_id, became_champion, store.url(_run_key(run.run_id, "")))


def _upload(run: _LocalRun, remote: dict[str, Any], store: Store) -> None:
    # Artifacts first, manifest last: until the manifest lands the run does not exist.
    for name in run.files:
        store.put_file(_run_key(run.run_id, name), run.folder / name)
    store.put_bytes(_run_key(run.run_id, MANIFEST), _dump(remote))


def _move_pointers(store: Store, remote: dict[str, Any], *, force_champion: bool) -> bool:
    record = _pointer_record(remote)
    latest = _read_pointer(store, "latest")
    if latest is None or _when(record["created"]) >= _when(latest.get("created")):
        store.put_bytes("latest.json", _dump(record))
    champion = _champion_record(store)
    becomes = force_champion or champion is None or _beats(record, champion)
    if becomes:
        store.put_bytes("champion.json", _dump(record))
    return becomes


def _pointer_record(remote: dict[str, Any]) -> dict[str, Any]:
    """What a pointer holds: enough to compare runs without reading their manifests."""
    metrics, data = remote["metrics"], remote.get("data") or {}
    return {
        "run_id": remote["run_id"],
        "created": remote["created"],
        "model": remote.get("model"),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics.get("macro_f1"),
        "val_accuracy": _validation_accuracy(metrics),
        "data_sha256": data.get("sha256"),
        "validation": data.get("validation"),
    }


def _validation_accuracy(metrics: dict[str, Any]) -> float | None:
    """The saved model's validation accuracy (averaged models record it apart), if known."""
    for key in ("saved_model_val_accuracy", "best_val_accuracy"):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _champion_record(store: Store) -> dict[str, Any] | None:
    """The champion pointer; one written before pointers held validation accuracy is rebuilt
    from its run's manifest (None when that run is gone)."""
    champion = _read_pointer(store, "champion")
    if champion is None or "validation" in champion:
        return champion
    run_id = champion.get("run_id")
    manifest = _load_manifest(store, run_id) if isinstance(run_id, str) else None
    return _pointer_record(manifest) if manifest is not None else None


def _beats(record: dict[str, Any], champion: dict[str, Any]) -> bool:
    """Same data, same validation split (fraction and seed) and validation accuracy at least
    the champion's; unknowns never win."""
    for key in ("data_sha256", "validation"):
        if record[key] is None or record[key] != champion.get(key):
            return False
    ours, theirs = record["val_accuracy"], champion.get("val_accuracy")
    return ours is not None and (theirs is None or ours >= theirs)


def _read_run_folder(folder: Path) -> _LocalRun:
    """Check a run folder has what publishing needs; name the folder and file when not."""
    if not folder.is_dir():
        raise FerError(f"run folder {folder} does not exist; pass the folder `fer train` wrote")
    manifest = _read_json_file(folder, MANIFEST)
    metrics = _read_json_file(folder, METRICS)
    run_id = _check_run_id(manifest.get("run_id"), source=folder / MANIFEST)
    _check_created(manifest.get("created"), source=folder / MANIFEST)
    _check_accuracy(metrics.get("accuracy"), source=folder / METRICS)
    names = _artifact_names(folder, manifest.get("artifacts"))
    return _LocalRun(folder, run_id, manifest, metrics, _describe_files(folder, names))


def _read_json_file(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise FerError(
            f"run folder {folder} has no {name}; only complete runs written by `fer train` "
            "can be published"
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FerError(f"{path} is not valid JSON ({exc}); re-run training to rewrite it") from exc
    if not isinstance(value, dict):
        raise FerError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _check_run_id(value: Any, *, source: Path | str) -> str:
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value) or value in POINTERS:
        raise FerError(
            f"{source}: run_id {value!r} is not a valid run id; expected letters, digits, "
            "'.', '_', '+' or '-' (at most 128), and not 'latest' or 'champion'"
        )
    return value


def _check_created(value: Any, *, source: Path) -> str:
    try:
        _parse_time(value)
    except (TypeError, ValueError):
        raise FerError(
            f"{source}: created {value!r} is not an ISO-8601 time such as "
            "'2024-05-01T12:00:00+00:00'"
        ) from None
    return value


def _check_accuracy(value: Any, *, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise FerError(f"{source}: accuracy {value!r} must be a number between 0 and 1")
    return float(value)


def _artifact_names(folder: Path, listed: Any) -> list[str]:
    """The files to publish: those the manifest lists as artifacts, else every file.

    Listing keeps later additions out of the published run, e.g. the `evaluation/` folder
    `fer evaluate` writes beside the model by default.
    """
    if listed is None:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise FerError(f"{folder / MANIFEST}: artifacts {listed!r} must be a list of file names")
    outside = [name for name in listed if _escapes_run_folder(name)]
    if outside:
        raise FerError(f"{folder / MANIFEST}: artifacts {outside} point outside the run folder")
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise FerError(f"run folder {folder} has no {', '.join(missing)} (listed in {MANIFEST}); "
                       "only complete runs written by `fer train` can be published")
    return sorted(listed)


def _describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named artifact (the manifest is not one), by relative name."""
    return {
        name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in names
        if name != MANIFEST
    }


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """One row of a run listing: what a user needs to pick a run."""

    run_id: str
    created: str
    model: str | None
    epochs: int | None
    accuracy: float
    macro_f1: float | None
    val_accuracy: float | None  # what the champion is chosen on
    is_champion: bool
    is_latest: bool


@dataclass(frozen=True)
class PublishedRun:
    """A complete published run: its remote manifest (local manifest + files + metrics)."""

    run_id: str
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


@dataclass(frozen=True)
class RunReport:
    """The classification report of a published run, with its metrics."""

    run_id: str
    text: str
    metrics: dict[str, Any]


def list_runs(store: Store) -> list[RunSummary]:
    """Every complete run, newest first; one manifest read per run."""
    latest = _pointer_run_id(store, "latest")
    champion = _pointer_run_id(store, "champion")
    manifests = (_load_manifest(store, run_id) for run_id in store.run_ids())
    summaries = [
        _summary(manifest, latest=latest, champion=champion)
        for manifest in manifests
        if manifest is not None
    ]
    return sorted(summaries, key=lambda s: (_when(s.created), s.run_id), reverse=True)


def _summary(manifest: dict[str, Any], *, latest: str | None, champion: str | None) -> RunSummary:
    metrics = manifest.get("metrics", {})
    epochs = metrics.get("epochs", manifest.get("parameters", {}).get("epochs"))
    return RunSummary(
        run_id=manifest["run_id"],
        created=manifest["created"],
        model=manifest.get("model"),
        epochs=epochs,
        accuracy=metrics["accuracy"],
        macro_f1=metrics.get("macro_f1"),
        val_accuracy=_validation_accuracy(metrics),
        is_champion=manifest["run_id"] == champion,
        is_latest=manifest["run_id"] == latest,
    )


def resolve_run(store: Store, ref: str) -> PublishedRun:
    """The complete run a reference names: a run id, ``latest`` or ``champion``."""
    if ref in POINTERS:
        run_id = _pointer_run_id(store, ref)
        if run_id is None:
            raise StorageError(f"no run is marked '{ref}' in {store.location} yet; publish a run")
    else:
        run_id = _check_ref(ref, store=store)
    manifest = _load_manifest(store, run_id)
    if manifest is None:
        raise StorageError(
            f"run '{run_id}' not found in {store.location}; list the published runs to see "
            "which exist"
        )
    return PublishedRun(run_id, manifest)


def _check_ref(ref: str, *, store: Store) -> str:
    try:
        return _check_run_id(ref, source=store.location)
    except FerError as exc:
        raise StorageError(
            f"{ref!r} is not a run id, 'latest' or 'champion' (looking in {store.location})"
        ) from exc


def read_report(store: Store, ref: str) -> RunReport:
    """The ``classification_report.txt`` text and metrics of a published run, verified."""
    run = resolve_run(store, ref)
    if REPORT not in run.files:
        raise StorageError(f"run '{run.run_id}' in {store.location} was published without {REPORT}")
    data = store.get_bytes(_run_key(run.run_id, REPORT))
    if data is None:
        raise StorageError(f"{store.url(_run_key(run.run_id, REPORT))} is missing; publish again")
    _verify(hashlib.sha256(data).hexdigest(), run=run, name=REPORT)
    return RunReport(run.run_id, data.decode("utf-8"), run.metrics)


def download_run(store: Store, ref: str, *, dest: Path) -> Path:
    """Download every artifact of a run into ``dest/<run-id>/``, checking each sha256."""
    run = resolve_run(store, ref)
    target = Path(dest) / run.run_id
    with _local_errors("create", target):
        target.mkdir(parents=True, exist_ok=True)
    for name in run.files:
        _download_verified(store, run, name, target=target)
    with _local_errors("write", target / MANIFEST):
        (target / MANIFEST).write_bytes(_dump(run.manifest))
    return target


def _download_verified(store: Store, run: PublishedRun, name: str, *, target: Path) -> None:
    path = target.joinpath(*_safe_parts(name, run=run))
    partial = path.with_name(path.name + ".part")
    with _local_errors("write", path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        store.download(_run_key(run.run_id, name), partial)
        _verify(_sha256(partial), run=run, name=name)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _safe_parts(name: str, *, run: PublishedRun) -> tuple[str, ...]:
    """A manifest's file name as path parts, refusing anything that escapes the run folder."""
    if _escapes_run_folder(name):
        raise StorageError(f"manifest of run '{run.run_id}' names an unsafe file path {name!r}")
    return PurePosixPath(name).parts


def _escapes_run_folder(name: str) -> bool:
    """Whether a file name from a manifest is empty, absolute or climbs out with '..'."""
    path = PurePosixPath(name)
    return not path.parts or path.is_absolute() or ".." in path.parts


def _verify(digest: str, *, run: PublishedRun, name: str) -> None:
    expected = run.files[name]["sha256"]
    if digest != expected:
        raise StorageError(
            f"{name} of run '{run.run_id}' is corrupt: sha256 {digest} does not match the "
            f"manifest's {expected}; publish the run again"
        )


# --- shared helpers -------------------------------------------------------------------------


def _run_key(run_id: str, name: str) -> str:
    return f"runs/{run_id}/{name}"


def _load_manifest(store: Store, run_id: str) -> dict[str, Any] | None:
    """The remote manifest of a complete run, or ``None`` for a missing or incomplete one."""
    return _load_json(store, _run_key(run_id, MANIFEST))


def _read_pointer(store: Store, name: str) -> dict[str, Any] | None:
    return _load_json(store, f"{name}.json")


def _pointer_run_id(store: Store, name: str) -> str | None:
    pointer = _read_pointer(store, name)
    return None if pointer is None else pointer.get("run_id")


def _load_json(store: Store, key: str) -> dict[str, Any] | None:
    data = store.get_bytes(key)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict):
        raise StorageError(f"{store.url(key)} is not a JSON object; it was not written by fer")
    return value


def _dump(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _parse_time(value: Any) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _when(created: Any) -> datetime:
    """A run's creation time for ordering; unreadable times sort oldest."""
    try:
        return _parse_time(created)
    except (TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)
