"""Bring a dataset source onto this machine: download, verify, unpack safely, decode once.

Sources are http(s) URLs, ``s3://bucket/key`` or local paths. Everything lands under the
data folder (``FER_DATA_DIR``); ``current.json`` there names the dataset that ``fer train``
uses when no ``--data`` is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fer.config import check_writable
from fer.data import (
    BY_CONTENT,
    CURRENT_POINTER,
    DOWNLOADS,
    FETCH_LOCK,
    GZIP,
    SOURCES,
    WEB_PAGE,
    dataset_root,
    file_sha256,
    has_fer_csv_header,
    is_archive,
    load_dataset,
    safe_extract,
    stat_stamp,
    suffix_by_content,
    tag_cache_dir,
)
from fer.errors import (
    DataError,
    FerError,
    StorageError,
    expand_home,
    http_status_passes,
)
from fer.files import fsync_path
from fer.locks import taking_turns
from fer.manifest import read_json, write_json

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) while downloading."""

DOWNLOAD_TIMEOUT_S = 60
# How messages name the data source option, reached from the CLI and from a flow alike.
DATA_OPTION = "--data, a flow's data"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedSource:
    path: Path  # a .csv file or a folder with train/ and test/ (or deeper down)
    sha256: str  # of the dataset at ``path``: what run manifests record
    origin: str
    file_sha256: str | None  # of the file fetched (an archive, a CSV): what --sha256 checks


def fetch_data(source: str, *, data_dir: Path, sha256: str | None = None,
               endpoint_url: str | None = None, progress: Progress | None = None,
               make_current: bool = True, unless_current: bool = False,
               retry_later: bool = False) -> FetchedSource | None:
    """Download or copy ``source`` into ``data_dir``, unpack it and decode it; with
    ``make_current``, later runs without ``--data`` use it. With ``unless_current``, only
    where no dataset is current once the lock is held (None otherwise): a `fer fetch-data`
    that held it meanwhile made its dataset current, which the default must not replace.

    A source that cannot be reached falls back to the copy fetched before, with a warning;
    with ``retry_later`` (a caller that will try again: a flow's task before its last
    attempt), a failure that may pass by itself raises instead, so that the retry can
    fetch the current file rather than train on the old one at once."""
    check_not_empty(source)
    try:
        with data_dir_lock(data_dir):
            if unless_current and current_source(data_dir) is not None:
                return None
            return _fetch(source, data_dir=data_dir, sha256=sha256, endpoint_url=endpoint_url,
                          progress=progress, make_current=make_current,
                          retry_later=retry_later)
    except FerError as exc:  # its message names the source: without a presigned URL's secrets
        exc.args = tuple(str(arg).replace(source, redacted(source)) for arg in exc.args)
        raise
    except OSError as exc:  # the source unreadable, FER_DATA_DIR full or not writable
        where = f" {exc.filename}" if exc.filename else ""
        raise DataError(f"{redacted(source)}: cannot fetch it into FER_DATA_DIR {data_dir} "
                        f"({exc.strerror or type(exc).__name__}{':' + where if where else ''}); "
                        "check that the source is readable, and the free space and "
                        "permissions of FER_DATA_DIR") from None


@contextlib.contextmanager
def data_dir_lock(data_dir: Path):
    """One fetch at a time per FER_DATA_DIR: two (`fer fetch-data` in the worker's container
    while its scheduled run fetches) would write the same partial files and unpack into the
    same folder, one deleting what the other extracts. The second waits, then finds the
    work done."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tag_cache_dir(data_dir)
    with taking_turns(data_dir / FETCH_LOCK,
                      waiting=f"another fer is fetching into {data_dir}; waiting for it",
                      unprotected="fetching without taking turns"):
        yield


def _fetch(source: str, *, data_dir: Path, sha256: str | None, endpoint_url: str | None,
           progress: Progress | None, make_current: bool, retry_later: bool) -> FetchedSource:
    obtained = _obtain(source, data_dir=data_dir, endpoint_url=endpoint_url, progress=progress,
                       retry_later=retry_later)
    origin = (redacted(source) if _is_remote(source)
              else str(expand_home(source, what="data source").resolve()))
    local = obtained
    if obtained.is_file() and suffix_by_content(obtained) == WEB_PAGE:
        raise (_web_page_sent(source) if _is_remote(source)  # kept by a fer before the check
               else DataError(f"{source}: a web page, not a dataset"))
    if obtained.is_file() and not (obtained.name.lower().endswith(".csv") or is_archive(obtained)):
        local = _named_by_content(obtained, data_dir=data_dir)
    digest = file_sha256(local) if local.is_file() else None
    if sha256 and digest is not None and digest != sha256.lower():
        if local.is_file() and local.resolve() != expand_home(source, what="data source").resolve():
            for copy in {obtained, local}:  # ours (never the user's own file): fetched anew
                copy.unlink()
            _source_stamp_path(obtained).unlink(missing_ok=True)
        raise DataError(f"{source}: sha256 is {digest}, expected {sha256.lower()}; "
                        "the download is corrupt or not the file you meant")
    # fer's copies, each with the source as given and how a path inside it is joined on
    copies = {str(local): (source, "/")}  # a folder used in place is the user's own
    try:
        if local.is_file() and is_archive(local):  # a folder named x.zip is a folder
            copies[str(_unpacked_folder(local, data_dir=data_dir, digest=digest))] = (source, "!")
            dataset_path = _unpack(local, data_dir=data_dir, digest=digest)
        elif digest is not None:  # a CSV
            dataset_path = _content_addressed(local, data_dir=data_dir, digest=digest)
            copies[str(dataset_path)] = (source, "/")
        else:
            dataset_path = local
        dataset = load_dataset(dataset_path, cache_dir=data_dir, require_train=False)
    except DataError as exc:
        raise DataError(_as_given(str(exc), copies)) from None
    if sha256 and digest is None and dataset.sha256 != sha256.lower():  # a folder: its data's
        raise DataError(f"{source}: the folder's data sha256 is {dataset.sha256}, expected "
                        f"{sha256.lower()}; it is not the dataset you meant")
    fetched = FetchedSource(path=dataset_path, sha256=dataset.sha256, origin=origin,
                            file_sha256=digest)
    if make_current:
        write_json(data_dir / CURRENT_POINTER,
                   {"path": str(dataset_path), "sha256": fetched.sha256, "origin": origin})
    return fetched


def _named_by_content(local: Path, *, data_dir: Path) -> Path:
    """A fetched file whose name says nothing of its kind (`https://host/download?id=7`, an
    S3 key without an extension), linked under a name that does, from its first bytes: a
    zip, a gzipped tarball, a tar, else text (read as a CSV; a web page, such as a
    download site's confirmation page, is refused before). A binary file of another kind
    keeps its name, and the reader names it as unsupported. The links live in a folder of
    their own (FER_DATA_DIR/by-content), where no fetched file's own name can meet them."""
    suffix = suffix_by_content(local)
    if suffix in (None, GZIP):  # not a kind fer reads: the reader names it
        return local
    typed = data_dir / BY_CONTENT / (local.name + suffix)
    if typed.exists() and os.path.samefile(local, typed):
        return typed  # linked when fetched before, unchanged since
    typed.parent.mkdir(exist_ok=True)
    _place_copy(local, typed)  # a newer download of the same URL replaces the older copy
    return typed


def _place_copy(local: Path, target: Path) -> None:
    """``local``'s bytes at ``target``, appearing whole: a hard link where the file system
    allows (no second copy on disk), else a copy."""
    partial = target.with_name(target.name + ".part")
    partial.unlink(missing_ok=True)
    try:
        os.link(local, partial)
    except OSError:
        _copy_whole(local, partial)
    os.replace(partial, target)


def _copy_whole(source: Path, partial: Path) -> None:
    """``source`` copied to ``partial`` and on disk, before the caller renames it into place
    (after a power loss, a copy's name with no bytes behind it would be kept by its records,
    which are fsynced, and fallen back to for good); nothing left where it fails (a full
    disk, Ctrl-C)."""
    try:
        shutil.copy2(source, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _synced_or_removed(partial)


def _synced_or_removed(partial: Path) -> None:
    """``partial`` on disk, or gone where that fails (the caller renames it into place)."""
    try:
        fsync_path(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _as_given(message: str, copies: dict[str, tuple[str, str]]) -> str:
    """A data error that begins with one of fer's ``copies`` of a source, naming instead the
    source as the user gave it: the downloaded or copied file as the source itself, a file
    of an unpacked archive as ``source!path`` (as `fer train --data` names an archive's
    members), not a path under FER_DATA_DIR they never saw."""
    for copy, (given, joiner) in sorted(copies.items(), key=lambda item: -len(item[0])):
        if message == copy or message.startswith((copy + "/", copy + ":", copy + ",")):
            rest = message[len(copy):]  # (longest copy first: the archive's folder is in it)
            if rest.startswith("/"):  # a path inside the copy
                return (given.rstrip("/") or "/") + joiner + rest[1:]
            return given + rest
    return message


@dataclass(frozen=True)
class DataSource:
    """A dataset on this machine, and where it came from as the user named it, for a run's
    manifest: ``--data`` (a URL as given, a path made absolute), else the source the current
    dataset was fetched from; None where neither is known (made current by an older fer)."""

    path: Path
    origin: str | None


def current_source(data_dir: Path) -> DataSource | None:
    """The dataset the last ``fer fetch-data`` made current; None if none was.

    Its path and origin come from one read of the pointer, so a `fer fetch-data` meanwhile
    cannot pair one dataset with another's origin. A current dataset that has gone (a
    folder used in place, then moved) is an error, not a reason to train on the default
    download instead.
    """
    pointer_path = data_dir / CURRENT_POINTER
    try:
        pointer = json.loads(pointer_path.read_text())
        path = Path(pointer["path"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{pointer_path}: unreadable ({exc}); run `fer fetch-data` again, or "
                        f"name a data source ({DATA_OPTION})") from None
    if not path.exists():
        raise DataError(f"{path}: the current dataset (fetched from {pointer.get('origin')}) is "
                        f"gone; run `fer fetch-data` again, or name a data source ({DATA_OPTION})")
    origin = pointer.get("origin")
    return DataSource(path, origin if isinstance(origin, str) else None)


def check_can_fetch(data: str | None, *, data_dir: Path) -> None:
    """FER_DATA_DIR checked writable where ``data`` will be fetched into it (a remote
    source, or none while no dataset is current), before any download. A local source is
    read where it is and the current dataset where fetch-data put it: a data folder
    provisioned read-only (a container's volume mounted ``:ro`` after ``fer fetch-data``)
    serves them, only its decode cache going unwritten (a warning)."""
    if (_is_remote(data) if data is not None  # (os.path: False in a folder not enterable)
            else not os.path.exists(data_dir / CURRENT_POINTER)):
        check_writable(data_dir, "FER_DATA_DIR")


def check_not_empty(source: str) -> None:
    """An empty source (a script's unset variable: `--data "$DATA"`) read the current
    folder as the dataset, and fetch-data made it the current one."""
    if not source.strip():
        raise DataError(f"data source {source!r} is empty: expected a path, an http(s) URL "
                        "or s3://bucket/key (`.` names the current folder)")


def resolve_data(data: str | None, *, data_dir: Path, default_source: str,
                 endpoint_url: str | None = None, progress: Progress | None = None,
                 retry_later: bool = False) -> DataSource:
    """``--data`` as a local dataset: remote sources are fetched first; None means the
    current one (the default source fetched and made current where there is none).
    ``retry_later``: as for :func:`fetch_data`."""
    if data is None:
        current = current_source(data_dir)
        if current is not None:
            return current
        fetched = fetch_data(default_source, data_dir=data_dir, endpoint_url=endpoint_url,
                             progress=progress, unless_current=True, retry_later=retry_later)
        if fetched is None:  # another fer made one current meanwhile
            return resolve_data(None, data_dir=data_dir, default_source=default_source,
                                endpoint_url=endpoint_url, progress=progress,
                                retry_later=retry_later)
        return DataSource(fetched.path, fetched.origin)
    check_not_empty(data)
    if _is_remote(data):  # a one-off source: the current dataset stays what fetch-data made it
        return DataSource(fetch_data(data, data_dir=data_dir, endpoint_url=endpoint_url,
                                     progress=progress, make_current=False,
                                     retry_later=retry_later).path,
                          redacted(data))
    path = expand_home(data, what="data source")
    return DataSource(path, str(path.resolve()))


# Query parameters that authenticate a URL (S3's and Google Cloud Storage's presigned URLs';
# common token and key names)
_SECRET_PARAMETERS = {"x-amz-signature", "x-amz-credential", "x-amz-security-token",
                      "x-goog-signature", "x-goog-credential", "signature", "sig", "token",
                      "access_token", "awsaccesskeyid", "api_key", "apikey"}


def redacted(source: str) -> str:
    """``source`` as it may be recorded and printed: an http(s) URL without a user name or
    password and without the parameters that authenticate it (a presigned URL's signature
    and token), which runs' manifests would otherwise publish; other sources as they are."""
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError:
        return source
    if parts.scheme not in ("http", "https"):
        return source
    query = _query_without(parts.query, _SECRET_PARAMETERS.__contains__)
    if "@" not in parts.netloc and query is None:
        return source
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2],
                                                  query=parts.query if query is None else query))


# The signing schemes of presigned URLs: (a parameter only a signed URL of that scheme has,
# the parameters that change with each signing of the same object). Dropped only to name
# the local copy, and only where the scheme's signature is there: a plain URL's `token`
# or `st` may name another object.
_SIGNING_SCHEMES = (
    ("x-amz-signature", lambda name: name.startswith("x-amz-")),  # S3 SigV4
    ("x-goog-signature", lambda name: name.startswith("x-goog-")),  # Google V4
    ("key-pair-id", {"policy", "signature", "key-pair-id", "expires"}.__contains__),  # CloudFront
    ("signature", {"awsaccesskeyid", "googleaccessid", "expires", "signature"}.__contains__),
    ("sig", {"sig", "se", "st", "sv", "sp", "sr", "spr", "si", "ss", "srt", "skoid", "sktid",
             "skt", "ske", "sks", "skv"}.__contains__),  # Azure SAS
)


def _query_without(query: str, dropped) -> str | None:
    """``query`` without the fields whose lower-cased name ``dropped`` picks, the others as
    written (encoding, order, form); None where none is dropped."""
    fields = query.split("&") if query else []
    kept = [field for field in fields
            if not dropped(urllib.parse.unquote_plus(field.partition("=")[0]).lower())]
    return None if len(kept) == len(fields) else "&".join(kept)


def _is_remote(source: str) -> bool:
    return _scheme(source) in ("http", "https", "s3")


def is_s3_source(source: str) -> bool:
    """Whether ``source`` is read through an S3 endpoint (``s3://bucket/key``)."""
    return _scheme(source) == "s3"


def _scheme(source: str) -> str:
    """A source's URL scheme ("" for a path); a DataError for what no URL parser reads."""
    try:
        return urllib.parse.urlsplit(source).scheme
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise DataError(f"{source}: not a valid URL ({exc})") from None


def _ascii_url(url: str) -> str:
    """``url`` as a browser sends it: non-ASCII characters of its path and query
    percent-encoded as UTF-8 (http.client refuses them). A non-ASCII host is refused:
    Python's IDNA encoding is not the browsers' (`straße.de`), and could name another host."""
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc.isascii():
        raise DataError(f"{url}: the host is not ASCII; give it in its xn-- form, as the "
                        "browser shows it when the URL is copied")
    keep = "/%:@!$&'()*+,;=~?"
    return urllib.parse.urlunsplit(parts._replace(
        path=urllib.parse.quote(parts.path, safe=keep),
        query=urllib.parse.quote(parts.query, safe=keep)))


def _source_stamp_path(copy: Path) -> Path:
    """Where the stamp of the local file that ``copy`` was copied from is kept."""
    return copy.with_name(copy.name + ".source-stamp.json")


def _obtain(source: str, *, data_dir: Path, endpoint_url: str | None,
            progress: Progress | None, retry_later: bool) -> Path:
    """A local copy of the source file (folders are used where they are)."""
    downloads = data_dir / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    if _is_remote(source):
        target = downloads / _download_name(source)
        try:
            return _download(source, target, endpoint_url=endpoint_url, progress=progress)
        except _SourceFailed as failed:
            return _fetched_before(target, failed.error, retry_later=retry_later)
    path = expand_home(source, what="data source")
    if not path.exists():
        raise DataError(f"{source}: no such file or folder (expected a path, an http(s) URL "
                        "or s3://bucket/key)")
    if path.is_dir():
        return path.resolve()
    target = downloads / _fitting(path.name)
    # An edited source is copied again. Its ctime, kept beside the copy, catches an edit
    # that kept size and mtime (cp -p, rsync -a, touch -r), as load_dataset's memo does.
    stamp_path = _source_stamp_path(target)
    record = {"source": str(path.resolve()), "stamp": stat_stamp(path, change_time=True)}
    if not target.exists() or read_json(stamp_path) != record:
        partial = target.with_name(target.name + ".part")
        _copy_whole(path, partial)
        os.replace(partial, target)
        write_json(stamp_path, record)
    return target


def _download(source: str, target: Path, *, endpoint_url: str | None,
              progress: Progress | None) -> Path:
    """An http(s) or s3:// source into ``target``; _SourceFailed where it cannot be had."""
    if is_s3_source(source):
        from fer.storage import split_s3_url

        bucket, key = split_s3_url(source)
        if not key or key.endswith("/"):
            raise DataError(f"{source}: names no object; expected s3://BUCKET/KEY of a CSV or "
                            "an archive")
        return _download_s3(bucket, key, target, endpoint_url=endpoint_url)
    if "@" in urllib.parse.urlsplit(source).netloc:
        raise DataError(f"{redacted(source)}: a user name or password in the URL is not "
                        "supported (it would be recorded with every run); download the "
                        "file and pass its path, or use a presigned URL")
    return _download_http(source, target, progress=progress)


def source_name(source: str) -> str:
    """The file name a source (path or URL) ends in, without an http(s) URL's ``?dl=1``
    tail (an S3 key's '?' and '#' are part of its name); "" if none."""
    if is_s3_source(source):  # boto3 loads only for S3 sources
        from fer.storage import split_s3_url

        return PurePosixPath(split_s3_url(source)[1]).name
    return Path(urllib.parse.urlparse(source).path).name


def _download_name(source: str) -> str:
    """A stable file name per URL that keeps the extension. A presigned URL's signing
    parameters (signature, date, expiry: _unsigned) change with each signing of the same
    object and are left out: a scheduled run on a freshly signed URL had downloaded the
    whole file again under a new name every time, and kept each copy. A freshly signed URL
    the server refuses (403: expired, a wrong key) then falls back to that copy with a
    warning, as a plain URL's 404 does."""
    name = source_name(source) or "download"
    return _fitting(f"{hashlib.sha256(_unsigned(source).encode()).hexdigest()[:12]}-{name}")


# The longest name a copy under FER_DATA_DIR may have, in UTF-8 bytes: most file systems
# take 255, and the records beside a copy add up to 41 to it
# (".NAME.source-stamp.json.PID-HEX.part" while being written).
COPY_NAME_MAX_BYTES = 200


def _fitting(name: str) -> str:
    """``name`` as a local copy's file name: a longer one (a URL's or an S3 key's last part
    may be 1,000 bytes) is cut to COPY_NAME_MAX_BYTES, after a hash of the whole name that
    keeps two cut names apart, keeping its extension, by which the copy is read. Uncut, it
    had failed as "File name too long", blamed on FER_DATA_DIR's space and permissions.
    Lengths are the name's bytes on disk: a Latin-1 `café.csv` holds one that is not UTF-8."""
    if len(os.fsencode(name)) <= COPY_NAME_MAX_BYTES:
        return name
    suffixes = PurePosixPath(name).suffixes
    extension = next((kept for kept in ("".join(suffixes[-2:]), "".join(suffixes[-1:]))
                      if len(os.fsencode(kept)) <= 16), "")  # .tar.gz, else .csv; dots in a name
    prefix = hashlib.sha256(os.fsencode(name)).hexdigest()[:12] + "-"
    room = COPY_NAME_MAX_BYTES - len(prefix) - len(os.fsencode(extension))
    stem, size = "", 0
    for character in name[:len(name) - len(extension)]:  # whole characters only
        size += len(os.fsencode(character))
        if size > room:
            break
        stem += character
    return prefix + stem + extension


def _unsigned(source: str) -> str:
    """An http(s) ``source`` without its presigned-URL signing parameters; else as it is."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme not in ("http", "https"):
        return source
    names = {urllib.parse.unquote_plus(field.partition("=")[0]).lower()
             for field in parts.query.split("&")}
    signing = [changes for marker, changes in _SIGNING_SCHEMES if marker in names]
    query = _query_without(parts.query, lambda name: any(changes(name) for changes in signing))
    return source if query is None else urllib.parse.urlunsplit(parts._replace(query=query))


def _download_http(url: str, target: Path, *, progress: Progress | None) -> Path:
    """``url`` into ``target``. A copy from before is asked about first (its ETag, sent
    back as If-None-Match) and kept while the server answers 304 or the same strong ETag,
    or, where it gives no ETag or the same weak one, the same Last-Modified date and
    length: the body is then not read. A server that gives neither cannot say whether its
    file changed, so it is downloaded again (identical bytes are then recognised by their
    sha256 and not unpacked twice); so is a copy older than these records.

    The date is compared, not sent as If-Modified-Since: a server answers that with 304
    for a file replaced by an older one (a dataset rolled back, its date kept), and the
    newer copy would have stayed for good."""
    validators_path = target.with_name(target.name + ".http.json")
    validators = read_json(validators_path) if target.exists() else {}
    headers = {"If-None-Match": validators["etag"]} if validators.get("etag") else {}
    partial = target.with_name(target.name + ".part")
    opener = urllib.request.build_opener(_RedirectsKeepingTls)
    try:
        with opener.open(urllib.request.Request(_ascii_url(url), headers=headers),
                         timeout=DOWNLOAD_TIMEOUT_S) as response:
            answered = {field: response.headers.get(header)
                        for field, header in _HTTP_RESPONSE_VALIDATORS.items()}
            # http.client's reading of Content-Length: None where it is not a length
            # (int() of `abc` raised a traceback; a negative one promised -5 bytes)
            total = getattr(response, "length", None) or None  # ftp:// (a redirect): none
            if validators and (_same_strong_etag(answered, validators)
                               or _same_date_and_length(answered, validators, total, target)):
                return target  # the same file (a server that ignores If-None-Match)
            # Neither a length nor chunks: an answer cut short cannot be told from a whole
            # one, so it is not kept by its validators (a 304 would keep it for good).
            checkable = total is not None or getattr(response, "chunked", False)
            done = _save_body(response, partial, total=total, progress=progress)
    except _DiskError as exc:
        with contextlib.suppress(OSError):  # what could not be written may not be a file
            partial.unlink(missing_ok=True)
        raise DataError(f"cannot write {partial}: {exc.__cause__.strerror}; check the free "
                        "space and permissions of FER_DATA_DIR") from None
    except urllib.error.HTTPError as exc:
        exc.close()  # the error answer holds the connection open until closed
        partial.unlink(missing_ok=True)
        if exc.code == 304:  # Not Modified: the copy from before is current
            return target
        answer = f"the server answered HTTP {exc.code} ({exc.reason})"
        if http_status_passes(exc.code):
            raise _SourceFailed(StorageError(
                f"{redacted(url)}: download failed ({answer}); try again later, or use a local copy of "
                "the file", transient=True)) from None
        raise _SourceFailed(DataError(
            f"{redacted(url)}: {answer}; check the URL, or use a local copy of the file")) from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        if _lasting(exc):
            remedy = ("; if your own CA signed the server's certificate, name its file in "
                      "SSL_CERT_FILE" if isinstance(reason, ssl.SSLCertVerificationError) else "")
            raise _SourceFailed(DataError(
                f"{redacted(url)}: download failed ({reason}); check the URL{remedy}, or use a "
                "local copy of the file")) from None
        raise _SourceFailed(StorageError(
            f"{redacted(url)}: download failed ({reason}); check the URL and your network, or use a "
            "local copy of the file", transient=True)) from None
    if total is not None and done != total:  # a dropped connection ends the read quietly
        partial.unlink(missing_ok=True)
        raise _SourceFailed(StorageError(
            f"{redacted(url)}: download incomplete ({done} of {total} bytes); run the command "
            "again, or use a local copy of the file", transient=True))
    _refuse_what_is_no_dataset(partial, url)
    os.replace(partial, target)
    write_json(validators_path, {k: v for k, v in answered.items() if v} if checkable else {})
    return target


def _lasting(exc: Exception) -> bool:
    """Whether a failure to download is one that asking again cannot mend (a flow does not
    retry it): a URL that names no host or a malformed one, or a server whose TLS
    certificate is not trusted here. A refused or dropped connection, a timeout or a host
    name not found (DNS) may pass."""
    reason = getattr(exc, "reason", None)
    return (isinstance(exc, http.client.InvalidURL) or isinstance(reason, ssl.SSLCertVerificationError)
            or (isinstance(exc, urllib.error.URLError) and isinstance(reason, str)))


class _RedirectsKeepingTls(urllib.request.HTTPRedirectHandler):
    """Redirects followed as urllib does, except from https to another scheme: the file
    would come over a connection anyone on the way may read and change, from a URL the
    user gave as https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if urllib.parse.urlsplit(req.full_url).scheme == "https" and scheme != "https":
            raise urllib.error.HTTPError(
                req.full_url, code, f"a redirect to {redacted(newurl)}, refused: it leaves "
                "https", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _SourceFailed(Exception):
    """The source could not be asked about or read (down, gone, access denied, cut short):
    ``error`` says so, and the caller may use the copy fetched before instead."""

    def __init__(self, error: FerError):
        super().__init__(str(error))
        self.error = error


def _refuse_what_is_no_dataset(partial: Path, source: str) -> None:
    """A download that fer cannot read as a dataset, by its first bytes, is removed before
    it replaces the copy from before: that copy, a dataset, stays for the fallback (with a
    warning) instead of the download taking its place for good. Such are a web page (an
    expired share's login page, a confirmation page), a file of another kind, and text
    that is not a FER2013 CSV (an error in JSON answered with 200)."""
    kind = suffix_by_content(partial)
    if kind == WEB_PAGE:
        problem = _web_page_sent(source)
    elif kind in (None, GZIP) and not _is_archive_by_reader(partial):
        problem = DataError(f"{redacted(source)}: unsupported source type: the server sent "
                            f"{'a gzip that is not a tarball' if kind == GZIP else 'a binary file'}"
                            ", not a CSV, .zip, .tar or .tar.gz")
    elif kind == ".csv" and not has_fer_csv_header(partial):
        problem = DataError(f"{redacted(source)}: the server sent text that is not a FER2013 CSV "
                            "(its first line is not the header emotion,pixels,Usage)")
    elif kind in _READ_AS_BY_CONTENT and _read_as(
            partial.name.removesuffix(".part")) not in (None, _READ_AS_BY_CONTENT[kind]):
        problem = DataError(f"{redacted(source)}: the server sent a {kind.lstrip('.')} file, "
                            "but fer reads a file of this name by its suffix, as another kind; "
                            f"pass a local copy of it named *{kind} to --data")
    else:
        return
    partial.unlink(missing_ok=True)
    raise _SourceFailed(problem)


# How fer reads a file whose first bytes say it is of this kind (suffix_by_content's answer).
_READ_AS_BY_CONTENT = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".csv": "csv"}


def _read_as(name: str) -> str | None:
    """How fer reads a file of this name: "zip", "tar" (tarfile reads any compression) or
    "csv" by its suffix; None where the name has no such suffix (read by its first bytes)."""
    lowered = name.lower()
    if lowered.endswith(".zip"):
        return "zip"
    if is_archive(Path(name)):
        return "tar"
    return "csv" if lowered.endswith(".csv") else None


def _is_archive_by_reader(partial: Path) -> bool:
    """A download named as an archive (.zip, .tar, .tar.gz, .tgz: fer reads it as one by
    its name) that zipfile or tarfile reads, with a member, though its first bytes do not
    say so: a bzip2- or xz-compressed tarball, a tar from before POSIX's `ustar`, a
    self-extracting zip. Under another name fer would not read it (an empty tar is 512
    zero bytes)."""
    import tarfile
    import zipfile

    if not is_archive(partial.with_name(partial.name.removesuffix(".part"))):
        return False
    try:
        if zipfile.is_zipfile(partial):
            return True
        with tarfile.open(partial) as archive:
            return archive.next() is not None
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError):
        return False


def _web_page_sent(source: str) -> DataError:
    return DataError(f"{redacted(source)}: the server sent a web page, not a dataset (a login "
                     "or download-confirmation page?); use the file's direct download link")


class _DiskError(Exception):
    """Writing a download failed (disk full, read-only): not the network, so not retried."""


def _save_body(response, partial: Path, *, total: int | None,
               progress: Progress | None) -> int:
    """The response's body into ``partial``; the bytes written. Unbuffered, so that every
    failure to write shows at its write, as a _DiskError, and none at the close."""
    done = 0
    try:
        handle = open(partial, "wb", buffering=0)
    except OSError as exc:
        raise _DiskError from exc
    with handle:
        while chunk := response.read(1 << 20):
            rest = memoryview(chunk)
            while rest:  # an unbuffered write may take part of it (a nearly full disk)
                try:
                    rest = rest[handle.write(rest):]
                except OSError as exc:
                    raise _DiskError from exc
            done += len(chunk)
            if progress:
                progress(done, total)
        try:
            os.fsync(handle.fileno())  # on disk before its rename, as _copy_whole's
        except OSError as exc:
            raise _DiskError from exc
    return done


# Where the server's answer carries a copy's validators.
_HTTP_RESPONSE_VALIDATORS = {"etag": "ETag", "last_modified": "Last-Modified"}


def _same_strong_etag(answered: dict, stored: dict) -> bool:
    """A strong ETag (not W/...) names one exact file: the same one means the same bytes."""
    etag = answered.get("etag")
    return bool(etag) and not etag.startswith("W/") and etag == stored.get("etag")


def _same_date_and_length(answered: dict, stored: dict, total: int | None, copy: Path) -> bool:
    """The same Last-Modified date as the copy's, and its length where the answer gives one,
    from a server that gives no ETag or the same one (a weak ETag, which a server that
    ignores If-None-Match sends back): the same file, as far as it can say. Another ETag
    decides: dates have whole seconds, and an object overwritten twice in one second (or
    files all dated alike, as reproducible builds date them) keeps its date."""
    date = answered.get("last_modified")
    return (bool(date) and answered.get("etag") in (None, stored.get("etag"))
            and date == stored.get("last_modified")
            and (total is None or total == copy.stat().st_size))


def _download_s3(bucket: str, key: str, target: Path, *, endpoint_url: str | None) -> Path:
    """``s3://bucket/key`` through the same client settings as publishing (path-style,
    retries); a copy from before is kept while the object's ETag and size are unchanged."""
    from fer.storage import S3Store

    store = S3Store(bucket, endpoint_url=endpoint_url)
    version_path = target.with_name(target.name + ".s3.json")
    try:
        version = store.version(key)
    except StorageError as exc:
        raise _SourceFailed(exc) from None
    if version is None:
        raise _SourceFailed(DataError(
            f"s3://{bucket}/{key}: no such object at {store.endpoint}; check the bucket and key"))
    if target.exists() and read_json(version_path).get("version") == version:
        return target
    partial = target.with_name(target.name + ".part")
    try:
        store.download(key, partial)
    except StorageError as exc:  # cut short, as an http download can be
        partial.unlink(missing_ok=True)
        raise _SourceFailed(exc) from None
    _synced_or_removed(partial)
    _refuse_what_is_no_dataset(partial, f"s3://{bucket}/{key}")
    os.replace(partial, target)
    write_json(version_path, {"version": version})
    return target


def _fetched_before(target: Path, error: FerError, *, retry_later: bool) -> Path:
    """The copy fetched before when the source cannot be asked about it (down, gone, access
    denied), with a warning; without a copy, the error, as with ``retry_later`` where the
    error may pass by itself (the retry asks the source again)."""
    if not target.exists() or (retry_later and getattr(error, "transient", False)):
        raise error
    log.warning("%s; using the copy fetched before, %s", error, target)
    return target


def _content_addressed(local: Path, *, data_dir: Path, digest: str) -> Path:
    """A fetched CSV under ``sources/<its sha256>/``, like an unpacked archive: a newer
    download of the same URL (or a new copy of an edited file) then never changes the file
    that the current dataset and earlier runs' records name."""
    target = data_dir / SOURCES / digest[:16] / local.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _place_copy(local, target)
    return target


# Raised whenever safe_extract writes an archive's entries otherwise, so that a folder an
# older fer unpacked is unpacked again: 2 made a Windows zip's `train\happy\0.png` folders
# (an older fer wrote such file names) and kept a tar's hard links and links to folders.
UNPACK_FORMAT = 2


def _unpack(archive: Path, *, data_dir: Path, digest: str | None) -> Path:
    """Extract once per archive content; return the folder or CSV that holds the data.

    The unpacked folder never changes (it is named by the archive's sha256), so where its
    data is is found once and kept in its marker: finding it lists every file (0.9 s for
    FER2013's 32,298), which each later fetch-data of the archive would otherwise repeat.
    """
    target = _unpacked_folder(archive, data_dir=data_dir, digest=digest)
    done_marker = target / ".fer-unpacked"
    record = read_json(done_marker)  # {} where missing, or an older fer's (its text: {})
    if not _unpacked_as_now(record.get("format")):
        shutil.rmtree(target, ignore_errors=True)
        try:
            safe_extract(archive, target)
        except BaseException:  # a refused entry, a full disk, Ctrl-C: no half tree is kept
            shutil.rmtree(target, ignore_errors=True)
            raise
        # the files on disk before the marker that vouches for them (write_json flushes it):
        # after a power loss, a marked folder of empty images would be reused for good
        os.sync()
        record = {"archive": str(archive), "format": UNPACK_FORMAT}
        write_json(done_marker, record)
    if isinstance(record.get("root"), str):
        return target / record["root"]
    root = _dataset_root(target, archive=archive)
    write_json(done_marker, {**record, "root": root.relative_to(target).as_posix()})
    return root


def _unpacked_as_now(unpack_format: object) -> bool:
    """Whether a folder unpacked in ``unpack_format`` holds what this fer would extract; a
    later fer's (a higher one) is kept as it is: unpacking it again here, then there, on a
    shared FER_DATA_DIR would delete the folder under a training reading it."""
    return isinstance(unpack_format, int) and unpack_format >= UNPACK_FORMAT


def _unpacked_folder(archive: Path, *, data_dir: Path, digest: str | None) -> Path:
    return data_dir / SOURCES / (digest or archive.stem)[:16]


def _dataset_root(folder: Path, *, archive: Path) -> Path:
    """The folder or CSV in an unpacked archive that holds what the archive itself holds
    (fer.data.dataset_root: `fer train --data` on the archive reads the same)."""
    root = dataset_root(folder)
    if root is None:
        raise DataError(f"{archive}: holds no fer2013.csv and no train/ or test/ folder "
                        "(empty source or unknown layout)")
    return root
