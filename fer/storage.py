"""Where published runs are kept: a local folder or an S3 bucket (AWS, MinIO, SeaweedFS).

The backends only move bytes under ``/``-separated keys, each object appearing whole or not
at all; what the keys mean (the run layout, pointers, verification) is fer.runs, above them.
Errors are one-line StorageErrors that say whether retrying may help, never with secrets.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bce
from botocore.config import Config

from fer.errors import (
    FerError,
    MissingObjectError,
    StorageError,
    expand_home,
    http_status_passes,
)
from fer.files import remove_abandoned, temporaries_of, written_whole
from fer.locks import taking_turns

MULTIPART_THRESHOLD = 8 * 1024 * 1024
# How messages name where the endpoint comes from: the CLI, a flow, the environment.
ENDPOINT_OPTION = "--endpoint-url, a flow's endpoint_url, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL"

log = logging.getLogger(__name__)

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
        """The object's bytes, or None when it does not exist."""

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and a token naming this version of it; (None, None) when it
        does not exist. Hand the token to ``put_bytes_if``."""

    def put_bytes_if(self, key: str, data: bytes, *, version: str | None) -> bool:
        """Write a small object only if it is still at ``version`` (None: only if it does not
        exist); False, writing nothing, when another writer changed it first. This is how
        two publishers at the same moment both see their pointer moves counted. Where the
        store cannot make the compare and the write one step (an S3 server without
        conditional writes, a folder without locks) it warns, and a writer in between may
        be overwritten."""

    def download(self, key: str, dest: Path) -> None:
        """Copy an object to a local file; MissingObjectError when there is none."""

    def run_ids(self) -> list[str]:
        """Every id under ``runs/``, complete or not (callers check for the manifest)."""

    def url(self, key: str) -> str:
        """Where a key lives, for messages and results."""


class LocalStore:
    """Runs in a local folder (the default ``./artifacts``); writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = expand_home(root, what="storage folder")
        self.location = str(self.root)

    def put_file(self, key: str, path: Path) -> None:
        try:  # opened first: a run file it cannot read is not the storage folder's fault
            source = open(path, "rb")  # noqa: SIM115 - closed below, after the write
        except OSError as exc:
            raise _unreadable(path, exc) from None
        with source:
            self._write(key, lambda tmp: _copy_into(source, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        with local_errors("read", path):
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        data = self.get_bytes(key)
        return data, _content_version(data)

    def put_bytes_if(self, key: str, data: bytes, *, version: str | None) -> bool:
        with self._writers_take_turns():
            if _content_version(self.get_bytes(key)) != version:
                return False
            self.put_bytes(key, data)
            return True

    @contextmanager
    def _writers_take_turns(self) -> Iterator[None]:
        """The compare and the write of ``put_bytes_if`` under an flock on
        ``.fer-pointers.lock`` at the root; readers need none (writes are renames)."""
        lock = self.root / ".fer-pointers.lock"
        with local_errors("write", self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        with local_errors("lock", lock), taking_turns(
                lock, waiting="another publisher is moving a pointer here; waiting for it",
                unprotected="two publishers at the same moment may overwrite each other's "
                            "pointer"):
            yield

    def download(self, key: str, dest: Path) -> None:
        source = self._path(key)
        with local_errors("read", source):
            try:
                reader = open(source, "rb")  # noqa: SIM115 - closed below; a write error is the caller's
            except FileNotFoundError:
                raise MissingObjectError(f"{source} is not in the store") from None
        with reader, open(dest, "wb") as writer:
            while True:
                with local_errors("read", source):  # the store's fault, not the destination's
                    chunk = reader.read(1 << 20)
                if not chunk:
                    break
                writer.write(chunk)

    def run_ids(self) -> list[str]:
        runs = self.root / "runs"
        with local_errors("list", runs):
            if not runs.is_dir():
                return []
            return sorted(entry.name for entry in runs.iterdir() if entry.is_dir())

    def url(self, key: str) -> str:
        return str(self._path(key))

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(key).parts)

    def _write(self, key: str, fill: Callable[[Path], object]) -> None:
        """Write beside the target, flush it to disk, and rename: readers never see half a
        file, and a power loss never leaves an empty one in its place (a pointer read as
        empty would stop every later publish). A killed writer's temporary, a day old, is
        removed by the next write of the same file."""
        path = self._path(key)
        with local_errors("write", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned(temporaries_of(path, suffix=".tmp"))
            with written_whole(path, suffix=".tmp") as tmp:
                fill(tmp)


def _copy_into(source: BinaryIO, target: Path) -> None:
    """``source`` into ``target``; a read that fails partway (EIO) is the source's error,
    not the storage folder's."""
    with open(target, "wb") as out:
        while True:
            try:
                chunk = source.read(1 << 20)
            except OSError as exc:
                raise _unreadable(Path(source.name), exc) from None
            if not chunk:
                return
            out.write(chunk)


def _unreadable(path: Path, exc: OSError) -> StorageError:
    """A local file an upload cannot read (gone, unreadable) named as such, by both stores."""
    return StorageError(f"cannot read {path} to upload it ({exc.strerror or exc})")


def _content_version(data: bytes | None) -> str | None:
    """A local object's version: its content's digest (None when there is none)."""
    return None if data is None else hashlib.sha256(data).hexdigest()


@contextmanager
def local_errors(verb: str, path: Path, *, folder: str = "the storage folder") -> Iterator[None]:
    """An OSError on ``path`` as one StorageError naming the action, the path and what to
    check (``folder``: where it is, as the user knows it)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StorageError(
            f"cannot {verb} {path}: {reason}; check {folder}, its permissions and free space"
        ) from exc


_MISSING_CODES = {"NoSuchKey", "404"}  # an object that is not there (GET, HEAD)
_DENIED_CODES = {"403", "AccessDenied"}  # a HEAD's 403 has no body, so no code of its own
# A HEAD's bare 400 or 301: the bucket is in another region than the request was signed for
# (AuthorizationHeaderMalformed, PermanentRedirect), or the request is malformed; a listing's
# answer says which.
_UNEXPLAINED_HEAD_CODES = {"400", "301"}


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
            try:
                self._client.create_bucket(Bucket=self.bucket, **self._bucket_location())
            except bce.ClientError as exc:
                if _error_code(exc) != "BucketAlreadyOwnedByYou":  # another run just made it
                    raise

    def _bucket_exists(self) -> bool:
        with self._errors(f"checking bucket '{self.bucket}'"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except bce.ClientError as exc:
                code = _error_code(exc)
                if code in {"404", "NoSuchBucket"}:
                    return False
                if code in _DENIED_CODES or code in _UNEXPLAINED_HEAD_CODES:
                    return self._prefix_listable()
                raise
        return True

    def _prefix_listable(self) -> bool:
        """Whether the bucket exists, asked by listing fer's prefix: HeadBucket needs
        s3:ListBucket on the whole bucket, which a policy scoped to fer's prefix (an
        s3:prefix condition) refuses though every call fer makes is allowed; asked too after
        a HEAD's bare 400 or 301. A refusal here is the one to report: a listing's error
        names its cause (a bad key, the bucket's region), a HEAD's has no body."""
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
        except bce.ClientError as exc:
            if _error_code(exc) == "NoSuchBucket":
                return False
            raise
        return True

    def _missing_bucket(self) -> str:
        # reports list/show/get have no --create-bucket: name the commands that do
        return (f"bucket '{self.bucket}' does not exist at {self.endpoint}; check the storage "
                "URL and endpoint, or create it (fer publish, fer train --publish or --remote "
                "and fer retrain do with --create-bucket; a deployment with create_bucket: "
                "true)")

    def put_file(self, key: str, path: Path) -> None:
        try:
            with self._errors(f"uploading {self._key(key)}"):
                self._client.upload_file(str(path), self.bucket, self._key(key),
                                         ExtraArgs={"ContentType": content_type(key)},
                                         Config=_transfer_config())
        except OSError as exc:  # reading the local file (botocore's timeouts, OSErrors too,
            # are StorageErrors by now); the folder store names it too
            raise _unreadable(path, exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(f"writing {self._key(key)}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                    ContentType=content_type(key))

    def get_bytes(self, key: str) -> bytes | None:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        with self._errors(f"reading {self._key(key)}"):
            response = self._missing_as_none(self._client.get_object, key)
            if response is None:
                return None, None
            # A proxy may weaken the ETag (W/"..."); If-Match compares the strong one.
            etag = (response.get("ETag") or "").removeprefix("W/")
            # closed even where the read fails partway: its connection is not left to the GC
            with closing(response["Body"]) as body:
                return body.read(), etag

    def put_bytes_if(self, key: str, data: bytes, *, version: str | None) -> bool:
        # S3's conditional writes (AWS since 2024, MinIO, SeaweedFS): If-Match on the ETag
        # read, If-None-Match for an object that did not exist.
        if version == "":  # the server sent no ETag to compare with
            self._write_unconditionally(key, data, why="sends no ETag")
            return True
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        with self._errors(f"writing {self._key(key)}"):
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                        ContentType=content_type(key), **condition)
            except bce.ClientError as exc:
                code = _error_code(exc)
                if code in _CHANGED_MEANWHILE:
                    return False  # another writer changed (or deleted) it first
                if code not in _CONDITIONS_REFUSED:
                    raise
                self._write_unconditionally(key, data, why=f"refuses conditional writes ({code})")
        return True

    def _write_unconditionally(self, key: str, data: bytes, *, why: str) -> None:
        log.warning("S3 at %s %s; writing %s unconditionally: two publishers at the same "
                    "moment may write over each other", self.endpoint, why, self._key(key))
        self.put_bytes(key, data)

    def version(self, key: str) -> str | None:
        """What changes when the object does (its ETag and size); None if there is none."""
        with self._errors(f"reading {self._key(key)}"):
            head = self._missing_as_none(self._client.head_object, key)
        return None if head is None else f"{head.get('ETag', '')} {head.get('ContentLength', '')}"

    def _missing_as_none(self, call, key: str) -> dict | None:
        """``call`` (get_object, head_object) on ``key``'s object; None if there is none."""
        try:
            return call(Bucket=self.bucket, Key=self._key(key))
        except bce.ClientError as exc:
            if self._is_missing(exc, key):
                return None
            raise

    def _is_missing(self, exc: bce.ClientError, key: str) -> bool:
        """Whether a read of ``key`` failed because there is no such object. AWS answers a
        read of a missing object with 403, not 404, where the caller's s3:ListBucket does
        not cover the read (a policy that grants it under fer's prefix only, by an s3:prefix
        condition, which a read does not carry); a listing of the key itself tells missing
        from refused."""
        code = _error_code(exc)
        if code in _MISSING_CODES:
            return True
        if code not in _DENIED_CODES:
            return False
        name = self._key(key)
        try:
            listing = self._client.list_objects_v2(Bucket=self.bucket, Prefix=name, MaxKeys=1)
        except bce.ClientError:
            return False  # refused as well: the read's own refusal is the one to report
        return all(item.get("Key") != name for item in listing.get("Contents", []))

    def download(self, key: str, dest: Path) -> None:
        with self._errors(f"downloading {self._key(key)}"):
            try:
                self._client.download_file(self.bucket, self._key(key), str(dest),
                                           Config=_transfer_config())
            except bce.ClientError as exc:
                if self._is_missing(exc, key):
                    raise MissingObjectError(f"{self.url(key)} is not in the store") from None
                raise

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
            error = StorageError(self._explain(exc, action),
                                 transient=_is_transient(_root_cause(exc)))
            # botocore's text names the endpoint as given, a password in it too, and a
            # flow run's logged traceback prints the cause: chained only without one
            given = self._client.meta.endpoint_url
            raise error from (exc if userinfo_dropped(given) == given else None)

    def _explain(self, exc: BaseException, action: str) -> str:
        cause = _root_cause(exc)
        where = self.endpoint
        if isinstance(cause, bce.NoCredentialsError | bce.PartialCredentialsError):
            return (f"no usable AWS credentials for {where} while {action}; set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if isinstance(cause, _CREDENTIAL_SOURCE_ERRORS):
            return _credential_source_failed(cause, f"for {where} while {action}")
        if isinstance(cause, bce.ReadTimeoutError):
            return (f"S3 endpoint {where} did not answer within {self._read_timeout:g}s while "
                    f"{action}; check that the server is healthy and retry")
        if isinstance(cause, bce.ConnectionError | bce.HTTPClientError):
            return (f"cannot reach S3 endpoint {where} while {action} "
                    f"({_connection_reason(cause)}); check the endpoint ({ENDPOINT_OPTION}) "
                    "and that the server is running")
        if isinstance(cause, bce.ClientError):
            return self._explain_client_error(cause, action)
        return f"S3 error at {where} while {action}: {_one_line(str(cause))}"

    def _explain_client_error(self, exc: Any, action: str) -> str:
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return self._missing_bucket()
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "AuthorizationHeaderMalformed":  # signed for another region than the bucket's
            region = self._client.meta.region_name
            signed = (f"region '{region}'" if region not in (None, "aws-global")
                      else "us-east-1, no region being set")
            # boto3 reads AWS_DEFAULT_REGION; AWS_REGION, other SDKs' name, it does not
            return (f"S3 at {self.endpoint} refused {action}: {code} {_one_line(message)}; "
                    f"the request was signed for {signed}: set AWS_DEFAULT_REGION (or the "
                    "AWS profile's region) to the bucket's")
        if code in _AUTH_CODES:
            return (f"S3 at {self.endpoint} denied access while {action} ({code}); check the "
                    "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and "
                    f"their permissions on bucket '{self.bucket}'")
        return f"S3 at {self.endpoint} refused {action}: {code} {_one_line(message)}".rstrip()


# A conditional write refused: the ETag differs (412), a concurrent conditional write is in
# progress (409, AWS), or the object read was deleted since (404 on If-Match, AWS).
_CHANGED_MEANWHILE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409",
                      "NoSuchKey", "404"}

# A server that does not implement conditional writes, or rejects their headers.
_CONDITIONS_REFUSED = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}

# Named by code where a server answers with another status than its usual one; an answer
# whose status may pass (fer.errors.http_status_passes: 408, 429, a 5xx outage) is transient
# too, whatever its code (MinIO's 503 SlowDownWrite, 503 XMinioServerNotInitialized while it
# starts), unless its code says waiting will not help: a full disk or a quota (MinIO's 507
# XMinioStorageFull, SeaweedFS' 500 of the same code) would fail the publish after the
# training instead of the store check before it.
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable",
                    "SlowDown", "SlowDownRead", "SlowDownWrite", "RequestTimeout",
                    "TooManyRequests", "Throttling", "ThrottlingException"}
_LASTING_CODES = {"XMinioStorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded"}


# A credential source that failed: an expired SSO session, a credential_process or an
# assume-role that errs, a profile that does not exist. Waiting does not renew them.
_CREDENTIAL_SOURCE_ERRORS = (bce.CredentialRetrievalError, bce.TokenRetrievalError,
                             bce.SSOError, bce.NoAuthTokenError, bce.ProfileNotFound,
                             bce.RefreshWithMFAUnsupportedError, bce.UnknownCredentialError)


def _is_transient(cause: BaseException) -> bool:
    """Whether trying again later may succeed: the server was unreachable, slow or failing."""
    if isinstance(cause, bce.ClientError):
        code = _error_code(cause)
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code not in _LASTING_CODES and (code in _TRANSIENT_CODES
                                               or http_status_passes(status))
    return not isinstance(cause, (bce.NoCredentialsError, bce.PartialCredentialsError,
                                  bce.SSLError, bce.ParamValidationError,
                                  *_CREDENTIAL_SOURCE_ERRORS))


def _credential_source_failed(cause: BaseException, context: str) -> str:
    return (f"the AWS credentials {context} could not be loaded ({type(cause).__name__}: "
            f"{_one_line(str(cause))}); renew them (an SSO session: `aws sso login`) or fix "
            "AWS_PROFILE and its credential source")


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
    except _CREDENTIAL_SOURCE_ERRORS as exc:  # a profile's source runs when the client is made
        raise StorageError(userinfo_dropped(_credential_source_failed(
            exc, f"for {endpoint_url or 'S3'}"))) from exc
    except (bce.BotoCoreError, ValueError) as exc:  # "Invalid endpoint: <the URL as given>":
        raise StorageError(userinfo_dropped(  # not chained, or a flow run's logged
            f"cannot set up the S3 client: {_one_line(str(exc))}")) from None  # traceback has it


def userinfo_dropped(message: str) -> str:
    """``message`` without the ``user:password@`` of any URL in it (up to the last ``@``
    before the host: a password may hold one): an endpoint given with its credentials is
    printed without them, as everywhere else."""
    return re.sub(r"(://)\S*@", r"\1", message)  # a secret may hold `/` too


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


# What fer publishes, by suffix; anything else (model.keras, a checkpoint) is a byte stream.
# A fixed table, not the mimetypes module's, which reads the machine's own (/etc/mime.types,
# Windows' registry: .csv as application/vnd.ms-excel there).
CONTENT_TYPES = {".png": "image/png", ".txt": "text/plain; charset=utf-8",
                 ".csv": "text/csv; charset=utf-8", ".json": "application/json"}


def content_type(key: str) -> str:
    """The Content-Type an object is stored with, by its name: a browser opening a published
    run's curves.png or classification_report.txt (a MinIO console link, a presigned URL)
    shows it instead of downloading an octet stream, which every object had been."""
    return CONTENT_TYPES.get(PurePosixPath(key).suffix.lower(), "application/octet-stream")


def _without_userinfo(url: str) -> str:
    parts = urlsplit(userinfo_dropped(url))  # urlsplit ends userinfo at a `/` in a secret
    host = parts.hostname or ""
    if ":" in host:  # IPv6: urlsplit's hostname drops the brackets the URL needs
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # botocore checks the host only: `localhost:9OOO`, `:90000`
        raise StorageError(f"endpoint ({ENDPOINT_OPTION}) {host}: its port "
                           f"{parts.netloc.rpartition(':')[2]!r} is not a number from 0 to "
                           "65535") from None
    netloc = f"{host}:{port}" if port else host
    return parts._replace(netloc=netloc).geturl()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def open_store(url: str, *, endpoint_url: str | None = None,
               create_bucket: bool = False) -> Store:
    """The store behind a URL: a folder path or ``file://PATH``, or ``s3://BUCKET/PREFIX``.

    An S3 bucket is checked here, so a wrong bucket, endpoint or key fails before any upload.
    """
    if "://" not in url and _LOOKS_LIKE_A_SCHEME.match(url):  # s3:/bucket, s3:bucket
        raise StorageError(
            f"storage URL {url!r} looks like a URL without '://'; expected a folder path, "
            "file://PATH or s3://BUCKET/PREFIX (a folder whose name has a colon: ./NAME)")
    folder = _folder_named(url)
    if folder is not None:
        return LocalStore(Path(folder))
    scheme = url.partition("://")[0].lower()
    if scheme == "s3":
        bucket, prefix = split_s3_url(url)
        store = S3Store(bucket, prefix=prefix, endpoint_url=endpoint_url)
        store.ensure_bucket(create=create_bucket)
        return store
    raise StorageError(
        f"unsupported storage URL {userinfo_dropped(url)!r} (scheme {scheme!r}); expected a "
        "folder path, file://PATH or s3://BUCKET/PREFIX"
    )


def location_from_anywhere(url: str) -> str:
    """``url`` naming the same store from any folder and any shell: a folder store (a path
    or ``file://PATH``) as its absolute path with ``~`` expanded (open_store expands it;
    a shell given it quoted, or a FER_STORAGE from a service's environment, does not); an S3
    URL as it is."""
    folder = _folder_named(url)
    if folder is None:
        return url
    # absolute(), not abspath: a link before a `..` is followed, as open_store's folder is
    return str(expand_home(folder, what="storage folder").absolute())


def is_folder_store(url: str) -> bool:
    """Whether ``url`` names a folder store (a path, or ``file://PATH``)."""
    return _folder_named(url) is not None


def _folder_named(url: str) -> str | None:
    """The folder a folder store's URL names (a path, or ``file://PATH``), as given; None
    for a URL of another scheme. A file URL as a file manager copies it is read as RFC 8089
    writes it: ``file://localhost/srv/store`` is /srv/store, ``%20`` a space (they had
    named ./localhost/srv/store and a folder called my%20store). ``file://runs`` stays the
    relative folder it has always named."""
    scheme, found, rest = url.partition("://")
    if not found:
        return url
    if scheme.lower() != "file":
        return None
    host, slash, path = rest.partition("/")
    if host.lower() == "localhost" and slash:
        rest = "/" + path
    if rest.strip() in ("", "/"):  # `file://$STORE`, `file:///$STORE` with it unset: ".", "/"
        raise StorageError(f"storage URL {url!r} names no folder: expected file://PATH")
    try:
        decoded = unquote(rest, errors="strict")
    except UnicodeDecodeError:
        raise StorageError(f"storage URL {url!r}: its %-escapes are not UTF-8") from None
    if decoded != rest and not _exists(decoded) and _exists(rest):
        # a store made before fer decoded %-escapes: the folder it made is the store
        log.warning("storage URL %r: reading the existing folder %s, named with %%-escapes "
                    "as they are (write %%25 for a %% in a name)", url, rest)
        return rest
    return decoded


def _exists(folder: str) -> bool:
    try:
        return expand_home(folder, what="storage folder").exists()
    except FerError:  # a ~user that is no user: open_store names it
        return False


# Two or more letters then a colon: a scheme. One letter is a Windows drive (C:).
_LOOKS_LIKE_A_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key or prefix) of ``s3://BUCKET/KEY``, the key taken literally: '?' and '#'
    are characters of S3 keys (a URL parser would cut them off as query and fragment)."""
    if url[:5].lower() != "s3://":  # s3:/bucket/key parses as scheme s3: not cut at 5
        raise StorageError(f"{userinfo_dropped(url)!r}: expected s3://BUCKET/KEY")
    bucket, _, key = url[len("s3://"):].partition("/")  # any case: S3:// too
    return _check_bucket(bucket, url=url), key


# s3://KEY:SECRET@BUCKET/..., as Hadoop takes it (a secret may hold a `/` or an `@`: it
# ends at the last `@` before a bucket), or s3://USER@...; not an `@` in a key
# (s3://bucket/runs@2024)
_CREDENTIALS_BEFORE_BUCKET = re.compile(r"s3://[^/@:]*(:.*)?@(?=[^/@]*(/|$))", re.IGNORECASE)


def _check_bucket(bucket: str, *, url: str) -> str:
    if _BUCKET.fullmatch(bucket):
        return bucket
    if credentials := _CREDENTIALS_BEFORE_BUCKET.match(url):
        raise StorageError(
            f"URL 's3://{url[credentials.end():]}': credentials or a user before the bucket "
            "(KEY:SECRET@) are not read from the URL, and are left out of messages and logs; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    raise StorageError(
        f"URL {url!r} has bucket name {bucket!r}; expected 3-63 lowercase letters, "
        "digits, '.' or '-' as in s3://BUCKET/PREFIX"
    )
