"""fer.fetch: local and http sources are copied, verified, unpacked safely and made current."""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import http.server
import ipaddress
import json
import os
import re
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_image_tree, zip_folder

from fer.data import file_sha256, load_dataset, read_splits
from fer.errors import DataError, FerError, StorageError
from fer.fetch import (
    DataSource,
    _download_name,
    current_source,
    data_dir_lock,
    fetch_data,
    resolve_data,
)

# Every archive, download and cache file these read is closed once read (an unclosed one is a
# ResourceWarning, raised from the garbage collector, so both warnings fail the test).
pytestmark = [pytest.mark.filterwarnings("error::ResourceWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture
def layout_zip(tmp_path):
    return zip_folder(write_image_tree(tmp_path / "layout"), tmp_path / "archive.zip")


def test_data_errors_name_the_source_given_not_fers_copy(tmp_path):
    """A bad entry in an archive, a bad row in a CSV inside one and a bad row in a plain CSV
    are named as the user gave the source (``archive!member`` inside an archive), not as
    the copy under FER_DATA_DIR/sources/<hash>/ that fer reads."""
    tree = write_image_tree(tmp_path / "layout")
    (tree / "train" / "happy").rename(tree / "train" / "bored")
    images = zip_folder(tree, tmp_path / "images.zip")
    (tmp_path / "csv" / "fer").mkdir(parents=True)
    bad_csv = tmp_path / "csv" / "fer" / "fer2013.csv"
    bad_csv.write_text(f"emotion,pixels,Usage\n9,{' '.join(['7'] * 2304)},Training\n")
    csv_zip = zip_folder(tmp_path / "csv", tmp_path / "csv.zip")
    for source, expected in ((images, f"{images}: entry 'train/bored/0.png' is in unknown class"),
                             (csv_zip, f"{csv_zip}!fer/fer2013.csv, line 2: emotion '9'"),
                             (bad_csv, f"{bad_csv}, line 2: emotion '9'")):
        with pytest.raises(DataError) as raised:
            fetch_data(str(source), data_dir=tmp_path / "data")
        assert str(raised.value).startswith(expected), raised.value
    # an archive that unpacks to no dataset, and a folder used in place (named as it is)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no data")
    empty = zip_folder(tmp_path / "notes", tmp_path / "empty.zip")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: holds no fer2013\.csv"):
        fetch_data(str(empty), data_dir=tmp_path / "data")
    for given in (str(bad_csv.parent), str(bad_csv.parent) + "/"):  # one slash either way
        with pytest.raises(DataError,
                           match=rf"^{re.escape(str(bad_csv.parent))}/fer2013\.csv, line 2"):
            fetch_data(given, data_dir=tmp_path / "data")


def test_an_archive_with_one_top_folder_is_rooted_there(tmp_path):
    """fer2013.zip holding fer2013/train/...: the dataset is the top folder, as before
    session 37, so its data sha256 (over paths relative to it) is the folder's own and a
    champion trained on it stays comparable."""
    tree = write_image_tree(tmp_path / "top" / "fer2013")
    fetched = fetch_data(str(zip_folder(tmp_path / "top", tmp_path / "fer2013.zip")),
                         data_dir=tmp_path / "data")
    assert fetched.path.name == "fer2013"
    assert fetched.sha256 == fetch_data(str(tree), data_dir=tmp_path / "data").sha256


def test_fetch_data_roots_an_archive_where_its_images_or_its_csv_are(tmp_path, shaded_csv):
    """Images under one top folder beside a docs/test/ folder of notes are rooted at that
    top folder; a CSV two folders down is found as reading the archive finds it; several
    CSVs are refused naming the archive and the CSVs, as `fer train --data` refuses them."""
    write_image_tree(tmp_path / "a" / "fer2013")
    (tmp_path / "a" / "docs" / "test").mkdir(parents=True)
    (tmp_path / "a" / "docs" / "test" / "notes.md").write_text("notes")
    fetched = fetch_data(str(zip_folder(tmp_path / "a", tmp_path / "a.zip")),
                         data_dir=tmp_path / "data")
    assert fetched.path.name == "fer2013" and len(read_splits(fetched.path)["train"]) == 21
    (tmp_path / "b" / "x" / "y").mkdir(parents=True)
    (tmp_path / "b" / "x" / "y" / "fer2013.csv").write_bytes(shaded_csv.read_bytes())
    archive = zip_folder(tmp_path / "b", tmp_path / "b.zip")
    fetched = fetch_data(str(archive), data_dir=tmp_path / "data")
    assert fetched.path.name == "fer2013.csv" and fetched.sha256 == file_sha256(
        tmp_path / "b" / "x" / "y" / "fer2013.csv")
    assert len(read_splits(archive)["validation"]) == 21
    assert len(read_splits(tmp_path / "b")["validation"]) == 21  # the folder reads it too
    (tmp_path / "b" / "labels.csv").write_text("a,b\n")
    several = zip_folder(tmp_path / "b", tmp_path / "several.zip")
    for source in (several, tmp_path / "b"):
        with pytest.raises(DataError, match=rf"^{re.escape(str(source))}: holds 2 CSV files "
                                            r"\(labels\.csv, x/y/fer2013\.csv\)"):
            fetch_data(str(source), data_dir=tmp_path / "data")


def test_fetch_data_reads_an_archive_as_train_does(tmp_path, shaded_csv):
    """A CSV at the top beside images two folders down (kaggle/train/...), and a CSV beside
    a scripts/test/ folder of code: fetch-data's unpacked copy gives the dataset that
    `fer train --data` gives reading the archive (the images; the CSV)."""
    tree = tmp_path / "a"
    write_image_tree(tree / "kaggle")
    (tree / "fer2013.csv").write_bytes(shaded_csv.read_bytes())
    (tmp_path / "b" / "scripts" / "test").mkdir(parents=True)
    (tmp_path / "b" / "scripts" / "test" / "check.py").write_text("print('not an image')")
    (tmp_path / "b" / "fer2013.csv").write_bytes(shaded_csv.read_bytes())
    for folder, validation in (("a", False), ("b", True)):
        archive = zip_folder(tmp_path / folder, tmp_path / f"{folder}.zip")
        fetched = fetch_data(str(archive), data_dir=tmp_path / "data")
        for source in (archive, fetched.path):
            assert ("validation" in read_splits(source)) == validation, (source, validation)


def test_local_zip_is_unpacked_decoded_and_made_current(tmp_path, layout_zip):
    """fetch-data unpacks an archive under the data folder and later runs reuse it."""
    data_dir = tmp_path / "data"
    fetched = fetch_data(str(layout_zip), data_dir=data_dir, sha256=file_sha256(layout_zip))
    assert (fetched.path / "train" / "happy" / "0.png").exists()
    assert data_dir in fetched.path.parents
    assert current_source(data_dir) == DataSource(fetched.path, str(layout_zip))
    assert resolve_data(None, data_dir=data_dir,
                        default_source="http://127.0.0.1:9/x") == current_source(data_dir)
    # the archive's digest (what --sha256 checks) and the unpacked folder's (what manifests record)
    assert fetched.file_sha256 == file_sha256(layout_zip) != fetched.sha256
    assert list((data_dir / "decoded").glob("*.npz"))


def test_the_data_sha256_does_not_depend_on_the_data_folder(tmp_path, layout_zip, image_tree):
    """The same archive fetched under two data folders, and the folder it was zipped from,
    are the same data: run manifests record one sha256, so their runs compete for champion."""
    first = fetch_data(str(layout_zip), data_dir=tmp_path / "one")
    second = fetch_data(str(layout_zip), data_dir=tmp_path / "two")
    assert first.sha256 == second.sha256 == fetch_data(str(image_tree), data_dir=tmp_path / "three").sha256


def test_a_remote_data_option_does_not_change_the_current_dataset(tmp_path, layout_zip,
                                                                   shaded_csv):
    """`--data URL` for one run leaves the dataset fetch-data made current (the weekly
    retrain's) in place; only fetch-data itself moves it."""
    data_dir = tmp_path / "data"
    current = fetch_data(str(layout_zip), data_dir=data_dir).path
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(shaded_csv.parent))) as base:
        url = f"{base}/fer2013.csv"
        once = resolve_data(url, data_dir=data_dir, default_source="http://127.0.0.1:9/x")
        assert once.path.name.endswith("fer2013.csv") and once.path != current
        assert once.origin == url  # the run's origin: the URL as given
        assert current_source(data_dir) == DataSource(current, str(layout_zip))
        # a CSV URL made current, then changed there: `--data URL` gets the new file, and
        # the current dataset's file (which earlier runs recorded) keeps its bytes
        current = fetch_data(url, data_dir=data_dir).path
        kept = file_sha256(current)
        shaded_csv.write_text(shaded_csv.read_text().replace("\n3,", "\n4,", 1))
        os.utime(shaded_csv, (time.time() + 60, time.time() + 60))
        newer = resolve_data(url, data_dir=data_dir, default_source="http://127.0.0.1:9/x").path
    assert file_sha256(newer) == file_sha256(shaded_csv) != kept
    assert current_source(data_dir).path == current and file_sha256(current) == kept


def test_a_current_dataset_that_has_gone_is_an_error_not_a_download(tmp_path, image_tree):
    """A folder fetched in place, then moved: say so, rather than train on the default
    download instead."""
    data_dir = tmp_path / "data"
    fetch_data(str(image_tree), data_dir=data_dir)
    image_tree.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"layout: the current dataset \(fetched from .*layout\) "
                                        r"is gone; run `fer fetch-data` again, or name a "
                                        r"data source \(--data, a flow's data\)"):
        resolve_data(None, data_dir=data_dir, default_source="http://127.0.0.1:9/x")


def test_sha256_of_a_folder_is_its_data_sha256(tmp_path, image_tree):
    """fetch-data prints a folder's data sha256; passing it back as --sha256 checks it."""
    fetched = fetch_data(str(image_tree), data_dir=tmp_path / "d")
    assert fetch_data(str(image_tree), data_dir=tmp_path / "d", sha256=fetched.sha256) == fetched
    with pytest.raises(DataError, match=r"layout: the folder's data sha256 is [0-9a-f]{64}, "
                                        r"expected 0{64}"):
        fetch_data(str(image_tree), data_dir=tmp_path / "d", sha256="0" * 64)


def test_a_folder_named_like_an_archive_is_read_as_a_folder(tmp_path, image_tree):
    """A folder named fer2013.zip (an archive unpacked under its own name) was unpacked as
    an archive, and the IsADirectoryError blamed FER_DATA_DIR's space and permissions."""
    named = image_tree.rename(tmp_path / "fer2013.zip")
    fetched = fetch_data(str(named), data_dir=tmp_path / "d")
    assert fetched.path == named.resolve() and len(load_dataset(fetched.path).test) == 21


def test_sha256_mismatch_is_refused(tmp_path, layout_zip):
    """A bad copy is refused and not kept, so fetching again really fetches again."""
    with pytest.raises(DataError, match=r"archive\.zip: sha256 is [0-9a-f]{64}, expected 0{64}"):
        fetch_data(str(layout_zip), data_dir=tmp_path / "d", sha256="0" * 64)
    assert not list((tmp_path / "d" / "downloads").glob("*"))


@pytest.mark.parametrize("mtime", ["moved", "kept"])
def test_an_edited_local_source_is_copied_again(tmp_path, shaded_csv, mtime):
    """Fixing a label keeps the file size; the new content must still replace the old copy,
    also when the edit put the old mtime back (cp -p, rsync -a, touch -r), which the copy's
    size-and-mtime check alone missed."""
    first = fetch_data(str(shaded_csv), data_dir=tmp_path / "d")
    stat = shaded_csv.stat()
    text = shaded_csv.read_text()
    shaded_csv.write_text(text.replace("\n3,", "\n4,", 1))
    if mtime == "moved":
        os.utime(shaded_csv, ns=(time.time_ns(), time.time_ns() + 10**9))
    else:
        os.utime(shaded_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if shaded_csv.stat().st_ctime_ns == stat.st_ctime_ns:
            pytest.skip("this filesystem's ctime did not move within the test")
    second = fetch_data(str(shaded_csv), data_dir=tmp_path / "d")
    assert second.sha256 != first.sha256
    copy = tmp_path / "d" / "downloads" / "fer2013.csv"
    assert file_sha256(copy) == file_sha256(shaded_csv)
    copied = copy.stat()
    fetch_data(str(shaded_csv), data_dir=tmp_path / "d")  # unchanged: not copied again
    assert (copy.stat().st_ino, copy.stat().st_ctime_ns) == (copied.st_ino, copied.st_ctime_ns)


def test_a_download_the_disk_cannot_take_is_not_blamed_on_the_network(tmp_path, shaded_csv):
    """Writing the download fails (a full or read-only disk; here its partial file's name
    is taken by a folder): the error names the file and FER_DATA_DIR, and is not a network
    failure, which the retrain flow would retry three times and a copy from before would
    quietly stand in for."""
    data_dir = tmp_path / "data"
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(shaded_csv.parent))) as base:
        url = f"{base}/fer2013.csv"
        (data_dir / "downloads" / (_download_name(url) + ".part")).mkdir(parents=True)
        with pytest.raises(DataError, match=r"cannot write .*fer2013\.csv\.part: Is a "
                                            r"directory; check the free space and permissions "
                                            r"of FER_DATA_DIR"):
            fetch_data(url, data_dir=data_dir)


def test_a_data_folder_that_cannot_be_written_is_one_error(tmp_path, layout_zip):
    """An OSError while fetching (here FER_DATA_DIR/downloads is a file; a source the user
    may not read, a full disk while unpacking) is one DataError naming the path, not a
    traceback."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "downloads").write_text("a file where fer keeps its copies")
    with pytest.raises(DataError, match=rf"{layout_zip.name}: cannot fetch it into FER_DATA_DIR "
                                        r".*\(File exists: .*downloads\); check that the "
                                        r"source is readable"):
        fetch_data(str(layout_zip), data_dir=data_dir)


def test_without_a_source_or_a_current_dataset_the_default_is_fetched_and_made_current(
        tmp_path, shaded_csv):
    """README: with no --data and nothing fetched before, the default source (the public
    fer2013.csv; here a copy on loopback) is downloaded and becomes the current dataset."""
    data_dir = tmp_path / "data"
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(shaded_csv.parent))) as base:
        source = resolve_data(None, data_dir=data_dir, default_source=f"{base}/fer2013.csv")
    assert file_sha256(source.path) == file_sha256(shaded_csv)
    assert source.origin == f"{base}/fer2013.csv"
    assert current_source(data_dir) == source
    assert resolve_data(None, data_dir=data_dir, default_source="http://127.0.0.1:9/x") == source


def test_a_second_fetch_into_one_data_folder_waits_for_the_first(tmp_path, layout_zip):
    """Two fetches into one FER_DATA_DIR (a user's fetch-data in the worker's container
    while the scheduled run fetches) take turns instead of writing the same files at once;
    the second then finds the archive unpacked and gives the same dataset."""
    data_dir = tmp_path / "data"
    first = fetch_data(str(layout_zip), data_dir=data_dir)
    (marker,) = data_dir.glob("sources/*/.fer-unpacked")
    unpacked_at = marker.stat().st_mtime_ns
    results = []
    with data_dir_lock(data_dir):  # as the other process holds it while it fetches
        waiting = threading.Thread(
            target=lambda: results.append(fetch_data(str(layout_zip), data_dir=data_dir)))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and results == []  # it waits its turn
    waiting.join(timeout=60)
    assert [fetched.sha256 for fetched in results] == [first.sha256]
    assert marker.stat().st_mtime_ns == unpacked_at  # found unpacked, not extracted again


@pytest.mark.parametrize("older_marker", ["text", "json without format"])
def test_an_archive_an_older_fer_unpacked_is_unpacked_again(tmp_path, layout_zip, older_marker):
    """An older fer extracted some archives otherwise (a Windows zip's `train\\happy\\0.png`
    as file names, a tar without its hard links): its unpacked folder, told by its marker,
    is unpacked again instead of being reused with files missing or misnamed."""
    data_dir = tmp_path / "data"
    first = fetch_data(str(layout_zip), data_dir=data_dir)
    (marker,) = data_dir.glob("sources/*/.fer-unpacked")
    folder = marker.parent
    (folder / "train" / "happy" / "0.png").rename(folder / "train\\happy\\0.png")
    marker.write_text(str(layout_zip) if older_marker == "text" else
                      json.dumps({"archive": str(layout_zip), "root": "."}))
    again = fetch_data(str(layout_zip), data_dir=data_dir)
    assert (again.path / "train" / "happy" / "0.png").is_file()
    assert not (folder / "train\\happy\\0.png").exists()
    assert again.sha256 == first.sha256


def test_an_unpacked_archive_is_on_disk_before_its_marker(tmp_path, layout_zip, monkeypatch):
    """The marker says the folder is complete, so it is written after the extracted files
    are flushed: otherwise a power loss could leave a marked folder of empty images, reused
    by every later fetch."""
    import fer.fetch

    steps = []
    real_write_json = fer.fetch.write_json
    monkeypatch.setattr(fer.fetch.os, "sync", lambda: steps.append("sync"))
    monkeypatch.setattr(fer.fetch, "write_json", lambda path, record: (
        steps.append(path.name), real_write_json(path, record)))
    fetch_data(str(layout_zip), data_dir=tmp_path / "data")
    assert ".fer-unpacked" in steps
    assert steps.index("sync") < steps.index(".fer-unpacked")


def test_an_archive_a_later_fer_unpacked_is_kept_as_it_is(tmp_path, layout_zip):
    """A marker of a later unpack format (a newer fer sharing the FER_DATA_DIR) is not
    unpacked again here: each fer would otherwise delete the other's folder in turn, under
    a training that reads it."""
    from fer.fetch import UNPACK_FORMAT

    data_dir = tmp_path / "data"
    fetch_data(str(layout_zip), data_dir=data_dir)
    (marker,) = data_dir.glob("sources/*/.fer-unpacked")
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "format": UNPACK_FORMAT + 1}))
    (marker.parent / "written-by-the-later-fer").write_text("")
    fetch_data(str(layout_zip), data_dir=data_dir)
    assert (marker.parent / "written-by-the-later-fer").exists()


def test_missing_local_source_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.zip: no such file or folder"):
        fetch_data(str(tmp_path / "nothing.zip"), data_dir=tmp_path / "d")


@contextlib.contextmanager
def serving(handler, *, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """An HTTP server on loopback answering with ``handler`` (over TLS with ``tls``, a
    server context); yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_download_with_progress(tmp_path, layout_zip):
    """An http URL on loopback is downloaded with progress reports, then unpacked."""
    seen = []
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(tmp_path))) as base:
        fetched = fetch_data(f"{base}/archive.zip?dl=1", data_dir=tmp_path / "d",
                             progress=lambda d, t: seen.append((d, t)))
    assert (fetched.path / "test" / "sad").is_dir()
    assert seen[-1] == (layout_zip.stat().st_size, layout_zip.stat().st_size)


class _CountingFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder (with Last-Modified, answering If-Modified-Since with 304, as most
    servers do, for a file not newer than the date) and records each answer's status."""

    statuses: list[int] = []

    def send_response(self, code, message=None):
        self.statuses.append(code)
        super().send_response(code, message)

    def copyfile(self, source, outputfile):
        with contextlib.suppress(ConnectionError):  # a client that read the headers only
            super().copyfile(source, outputfile)

    def log_message(self, *args):
        pass


def test_a_url_is_downloaded_again_only_when_the_server_has_a_newer_copy(tmp_path, shaded_csv,
                                                                         caplog):
    """The cached copy is revalidated by the server's Last-Modified date and length: kept
    while they are the copy's (the body is not read: bytes changed behind the same date
    and length do not show), replaced once the file changed there, and used with a
    warning when the server cannot be reached; a weekly retrain on a URL trains on the
    current file."""
    _CountingFiles.statuses = []
    handler = functools.partial(_CountingFiles, directory=str(shaded_csv.parent))
    data_dir = tmp_path / "d"
    served_at = shaded_csv.stat().st_mtime
    with serving(handler) as base:
        url = f"{base}/fer2013.csv"
        first = fetch_data(url, data_dir=data_dir)
        shaded_csv.write_text(shaded_csv.read_text().replace("\n3,", "\n4,", 1))
        os.utime(shaded_csv, (served_at, served_at))  # the same date and length
        assert fetch_data(url, data_dir=data_dir).sha256 == first.sha256
        assert _CountingFiles.statuses == [200, 200]
        os.utime(shaded_csv, (time.time() + 60, time.time() + 60))
        changed = fetch_data(url, data_dir=data_dir)
        assert changed.sha256 != first.sha256 and _CountingFiles.statuses[-1] == 200
    with caplog.at_level("WARNING", logger="fer"):  # the server is gone now
        offline = fetch_data(url, data_dir=data_dir)
    assert offline.sha256 == changed.sha256
    assert "download failed" in caplog.text and "using the copy fetched before" in caplog.text


def test_a_file_replaced_by_an_older_one_is_downloaded_again(tmp_path, shaded_csv):
    """A dataset rolled back on its server (an older file put back with its date): asked
    with If-Modified-Since, the server had answered 304, and the newer copy was kept for
    good."""
    handler = functools.partial(_CountingFiles, directory=str(shaded_csv.parent))
    data_dir = tmp_path / "d"
    with serving(handler) as base:
        url = f"{base}/fer2013.csv"
        newer = fetch_data(url, data_dir=data_dir)
        shaded_csv.write_text(shaded_csv.read_text().replace("\n3,", "\n4,", 1))
        os.utime(shaded_csv, (time.time() - 86400, time.time() - 86400))
        older = fetch_data(url, data_dir=data_dir)
    assert older.sha256 != newer.sha256
    assert older.sha256 == load_dataset(shaded_csv).sha256


def test_a_caller_that_retries_gets_the_transient_failure_not_the_copy(tmp_path, shaded_csv,
                                                                       caplog):
    """With ``retry_later`` (a flow task with attempts left), a server that cannot be
    reached raises, so the retry asks it again; a file gone from it (HTTP 404), which no
    retry brings back, still falls back to the copy fetched before."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(shaded_csv.parent))
    data_dir = tmp_path / "d"
    with serving(handler) as base:
        url = f"{base}/fer2013.csv"
        first = fetch_data(url, data_dir=data_dir)
        shaded_csv.unlink()
        with caplog.at_level("WARNING", logger="fer"):
            gone = fetch_data(url, data_dir=data_dir, retry_later=True)
    assert gone.sha256 == first.sha256 and "HTTP 404" in caplog.text
    with pytest.raises(StorageError, match="download failed") as raised:
        fetch_data(url, data_dir=data_dir, retry_later=True)  # the server is gone now
    assert raised.value.transient


class _IgnoringConditions(_Quiet):
    """Answers 200 with the body, ETag and Last-Modified it is given, whatever the request
    asks."""

    body, etag, last_modified = b"", '"v1"', None

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(200)
        if self.etag:
            self.send_header("ETag", self.etag)
        if self.last_modified:
            self.send_header("Last-Modified", self.last_modified)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_a_full_answer_with_the_same_strong_etag_keeps_the_copy(tmp_path, shaded_csv):
    """A server that ignores If-None-Match: the same strong ETag means the same file, so
    the copy is kept (were the body read, the changed bytes here would show); a copy kept
    from before these records existed is downloaded once more."""
    _IgnoringConditions.body = shaded_csv.read_bytes()
    data_dir = tmp_path / "d"
    with serving(_IgnoringConditions) as base:
        first = fetch_data(f"{base}/fer2013.csv", data_dir=data_dir)
        _IgnoringConditions.body = shaded_csv.read_text().replace("\n3,", "\n4,", 1).encode()
        assert fetch_data(f"{base}/fer2013.csv", data_dir=data_dir).sha256 == first.sha256
        for record in (data_dir / "downloads").glob("*.http.json"):
            record.unlink()  # as an older fer left its copies
        assert fetch_data(f"{base}/fer2013.csv", data_dir=data_dir).sha256 != first.sha256


def _bzip2_tarball() -> bytes:
    """A bzip2-compressed tar of one file: fer reads it by a name ending .tar, .tgz or
    .tar.gz only."""
    import io
    import tarfile

    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:bz2") as archive:
        member = tarfile.TarInfo("README")
        archive.addfile(member)
    return packed.getvalue()


def _zip_of_one_file() -> bytes:
    import io
    import zipfile

    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        archive.writestr("README", "")
    return packed.getvalue()


@pytest.mark.parametrize(("answer", "message"), [
    (b"<html>Sign in</html>", r"sent a web page, not a dataset"),
    (b'{"error": "quota exceeded"}', r"sent text that is not a FER2013 CSV \(its first line"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", r"unsupported source type: the server sent a binary file"),
    (b"\x1f\x8b\x08\x00" + bytes(16), r"sent a gzip that is not a tarball"),
    (_bzip2_tarball(), r"unsupported source type: the server sent a binary file"),  # named .csv
    (_zip_of_one_file(), r"sent a zip file, but fer reads a file of this name by its suffix, "
                         r"as another kind; pass a local copy of it named \*\.zip to --data"),
], ids=["web page", "json", "png", "gzip", "bzip2 tarball", "zip named .csv"])
def test_an_answer_that_is_no_dataset_leaves_the_copy_fetched_before(tmp_path, shaded_csv, caplog,
                                                                   answer, message):
    """A server that answers 200 with something fer cannot read (a share that expired
    answers with its login page; an error in JSON; a file of another kind) is refused
    before it replaces the copy. It had replaced it, so the copy a later outage falls
    back to was that answer. The copy stays now, used with a warning."""
    _IgnoringConditions.body = shaded_csv.read_bytes()
    data_dir = tmp_path / "d"
    try:
        with serving(_IgnoringConditions) as base:
            url = f"{base}/fer2013.csv"
            first = fetch_data(url, data_dir=data_dir)
            _IgnoringConditions.body, _IgnoringConditions.etag = answer, '"v2"'
            with caplog.at_level("WARNING", logger="fer"):
                again = fetch_data(url, data_dir=data_dir)
    finally:
        _IgnoringConditions.etag = '"v1"'
    assert again.sha256 == first.sha256
    assert re.search(message, caplog.text) and "using the copy fetched before" in caplog.text
    caplog.clear()
    assert fetch_data(url, data_dir=data_dir).sha256 == first.sha256  # the server is gone now
    assert "download failed" in caplog.text and "using the copy fetched before" in caplog.text
    assert not list((data_dir / "downloads").glob("*.part"))


def test_a_csv_sent_for_a_zip_leaves_the_zip_fetched_before(tmp_path, layout_zip, shaded_csv,
                                                            caplog):
    """A URL ending .zip is read as a zip: a CSV its server sends there (a FER2013 CSV too)
    is refused before it replaces the zip, which stays in use with a warning."""
    _IgnoringConditions.body = layout_zip.read_bytes()
    data_dir = tmp_path / "d"
    try:
        with serving(_IgnoringConditions) as base:
            first = fetch_data(f"{base}/fer2013.zip", data_dir=data_dir)
            _IgnoringConditions.body, _IgnoringConditions.etag = shaded_csv.read_bytes(), '"v2"'
            with caplog.at_level("WARNING", logger="fer"):
                again = fetch_data(f"{base}/fer2013.zip", data_dir=data_dir)
    finally:
        _IgnoringConditions.etag = '"v1"'
    assert again.sha256 == first.sha256
    assert "sent a csv file, but fer reads a file of this name by its suffix" in caplog.text
    assert "using the copy fetched before" in caplog.text


@pytest.mark.parametrize(("etags", "downloaded"), [
    (('"v1"', '"v2"'), True),
    (('W/"v1"', 'W/"v1"'), False),
], ids=["a new ETag", "the same weak ETag"])
def test_an_etag_decides_and_the_date_and_length_where_it_cannot(tmp_path, shaded_csv, etags,
                                                                 downloaded):
    """The file changed behind the same date and length (a label changed): dates have whole
    seconds, and an object overwritten twice in one second (or files all dated alike, as
    reproducible builds date them) keeps its date; its new ETag says it changed. A server
    that ignores If-None-Match and sends the same weak ETag back leaves the date and length
    to decide: the copy is kept, its body not read."""
    _IgnoringConditions.body, _IgnoringConditions.etag = shaded_csv.read_bytes(), etags[0]
    _IgnoringConditions.last_modified = "Mon, 07 Dec 2026 03:00:00 GMT"
    data_dir = tmp_path / "d"
    try:
        with serving(_IgnoringConditions) as base:
            first = fetch_data(f"{base}/fer2013.csv", data_dir=data_dir)
            _IgnoringConditions.body = shaded_csv.read_text().replace("\n3,", "\n4,", 1).encode()
            _IgnoringConditions.etag = etags[1]
            again = fetch_data(f"{base}/fer2013.csv", data_dir=data_dir)
    finally:
        _IgnoringConditions.etag, _IgnoringConditions.last_modified = '"v1"', None
    assert (again.sha256 != first.sha256) is downloaded


@pytest.mark.parametrize("kind", ["CR line ends", "bzip2 tarball", "xz tarball"])
def test_a_download_fer_reads_is_not_refused_for_its_first_bytes(tmp_path, shaded_csv,
                                                                image_tree, kind):
    """What fer's readers take, though the first bytes do not say so plainly: a CSV with
    old Mac line ends (CR alone), a .tgz compressed with bzip2 or xz (tarfile reads
    either)."""
    import tarfile

    name = "fer2013.csv" if kind == "CR line ends" else "fer2013.tgz"
    if kind == "CR line ends":
        (tmp_path / name).write_bytes(shaded_csv.read_bytes().replace(b"\n", b"\r"))
        _AnyPath.body = (tmp_path / name).read_bytes()
        expected = load_dataset(tmp_path / name).sha256
    else:
        with tarfile.open(tmp_path / name, "w:bz2" if kind == "bzip2 tarball" else "w:xz") as tar:
            tar.add(image_tree, arcname=".")
        _AnyPath.body = (tmp_path / name).read_bytes()
        expected = load_dataset(image_tree).sha256
    with serving(_AnyPath) as base:
        assert fetch_data(f"{base}/{name}", data_dir=tmp_path / "d").sha256 == expected


def test_a_server_without_validators_is_downloaded_every_time(tmp_path, shaded_csv):
    """A server with neither ETag nor Last-Modified cannot say whether its file changed: a
    scheduled retrain on its URL gets the file as it is now, not its first download."""
    _IgnoringConditions.body, _IgnoringConditions.etag = shaded_csv.read_bytes(), None
    data_dir = tmp_path / "d"
    try:
        with serving(_IgnoringConditions) as base:
            first = fetch_data(f"{base}/fer2013.csv", data_dir=data_dir)
            assert fetch_data(f"{base}/fer2013.csv", data_dir=data_dir).path == first.path
            _IgnoringConditions.body = shaded_csv.read_text().replace("\n3,", "\n4,", 1).encode()
            changed = fetch_data(f"{base}/fer2013.csv", data_dir=data_dir)
    finally:
        _IgnoringConditions.etag = '"v1"'
    assert changed.sha256 != first.sha256


class _BadLength(_Quiet):
    """Answers 200 with the body and a Content-Length that is not a length, then hangs up."""

    body = b""

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header("Content-Length", "abc")
        self.end_headers()
        self.wfile.write(self.body)
        self.close_connection = True


def test_a_content_length_that_is_not_a_number_reads_as_no_length(tmp_path, shaded_csv):
    """A proxy's `Content-Length: abc` raised ValueError with a traceback; the body is read
    to the end of the connection, as for an answer without a length."""
    _BadLength.body = shaded_csv.read_bytes()
    with serving(_BadLength) as base:
        fetched = fetch_data(f"{base}/fer2013.csv", data_dir=tmp_path / "d")
    assert fetched.path.read_bytes() == shaded_csv.read_bytes()


class _Answering(_Quiet):
    """Answers every request with the status code its path names: /404/x.zip gets 404."""

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_error(int(self.path.split("/")[1]))


@pytest.mark.parametrize(("status", "error", "transient", "message"), [
    (404, DataError, None, r"HTTP 404 \(Not Found\); check the URL"),
    (403, DataError, None, r"HTTP 403 \(Forbidden\); check the URL"),
    (503, StorageError, True, r"download failed \(the server answered HTTP 503 .*try again later"),
    (429, StorageError, True, r"download failed \(the server answered HTTP 429"),
    (501, DataError, None, r"HTTP 501 \(Not Implemented\); check the URL"),
    (507, DataError, None, r"HTTP 507 \(Insufficient Storage\); check the URL"),  # as S3's
])
def test_http_errors_say_whether_retrying_can_help(tmp_path, status, error, transient, message):
    """A missing or forbidden file, or a server that cannot serve the request at all (501),
    fails for good (the retrain flow does not retry a DataError); a busy or failing server
    is a transient StorageError, which it retries."""
    with serving(_Answering) as base, pytest.raises(error, match=message) as raised:
        fetch_data(f"{base}/{status}/fer2013.zip", data_dir=tmp_path / "d")
    assert getattr(raised.value, "transient", None) is transient
    assert not list((tmp_path / "d" / "downloads").glob("*"))


class _Truncating(_Quiet):
    """Promises 1,000 bytes, sends 10, hangs up: a connection dropped mid-download."""

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"emotion,pi")
        self.close_connection = True


def test_truncated_download_is_refused_and_not_kept(tmp_path):
    with serving(_Truncating) as base, pytest.raises(
            FerError, match=r"fer2013\.csv: download incomplete \(10 of 1000"):
        fetch_data(f"{base}/fer2013.csv", data_dir=tmp_path / "d")
    assert not list((tmp_path / "d" / "downloads").glob("*"))


class _WholeThenTruncating(_Quiet):
    """Sends ``body`` whole the first time, then drops the connection after 10 bytes."""

    body, served = b"", 0

    def do_GET(self):  # noqa: N802 (the http.server API)
        type(self).served += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body if self.served == 1 else self.body[:10])
        self.close_connection = True


def test_a_truncated_download_falls_back_to_the_copy_like_any_failure(tmp_path, shaded_csv,
                                                                      caplog):
    """A dropped connection is a download failure like a refused one: the copy fetched
    before stands in, with a warning, where nothing retries (it failed the run); a caller
    that retries (a flow task with attempts left) gets the transient error."""
    _WholeThenTruncating.body, _WholeThenTruncating.served = shaded_csv.read_bytes(), 0
    with serving(_WholeThenTruncating) as base:
        url = f"{base}/fer2013.csv"
        first = fetch_data(url, data_dir=tmp_path / "d")
        with pytest.raises(StorageError, match=r"download incomplete \(10 of ") as raised:
            fetch_data(url, data_dir=tmp_path / "d", retry_later=True)
        assert raised.value.transient
        with caplog.at_level("WARNING", logger="fer"):
            assert fetch_data(url, data_dir=tmp_path / "d").sha256 == first.sha256
    assert "download incomplete" in caplog.text and "using the copy fetched before" in caplog.text


def test_an_s3_download_that_fails_midway_falls_back_to_the_copy(tmp_path, shaded_csv,
                                                                 monkeypatch, caplog):
    """As for http: an object that changed, whose download then fails (a connection reset
    after the HEAD), uses the copy fetched before where nothing retries, and raises for a
    caller that retries (it failed the run even with a copy)."""
    from fer.storage import S3Store

    answers = {"version": "v1", "fails": False}

    def download(store, key, target):
        if answers["fails"]:
            raise StorageError("S3 at http://s3 refused downloading: connection reset",
                               transient=True)
        target.write_bytes(shaded_csv.read_bytes())

    monkeypatch.setattr(S3Store, "version", lambda store, key: answers["version"])
    monkeypatch.setattr(S3Store, "download", download)
    url, data_dir = "s3://bucket/fer2013.csv", tmp_path / "d"
    first = fetch_data(url, data_dir=data_dir, endpoint_url="http://127.0.0.1:9")
    answers.update(version="v2", fails=True)
    with pytest.raises(StorageError, match="connection reset"):
        fetch_data(url, data_dir=data_dir, endpoint_url="http://127.0.0.1:9", retry_later=True)
    with caplog.at_level("WARNING", logger="fer"):
        again = fetch_data(url, data_dir=data_dir, endpoint_url="http://127.0.0.1:9")
    assert again.sha256 == first.sha256 and "using the copy fetched before" in caplog.text
    assert not list((data_dir / "downloads").glob("*.part"))


class _DroppingChunked(_Quiet):
    """A chunked answer (no Content-Length) whose connection drops mid-chunk."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"3e8\r\nemotion,pi")  # promises a 1,000-byte chunk, sends 10
        self.close_connection = True


def test_a_dropped_chunked_download_is_a_transient_error(tmp_path):
    """No Content-Length to compare with: the read itself fails (IncompleteRead), which is
    one retryable line, not a traceback, and leaves no partial file."""
    with serving(_DroppingChunked) as base, pytest.raises(
            StorageError, match=r"fer2013\.csv: download failed") as raised:
        fetch_data(f"{base}/fer2013.csv", data_dir=tmp_path / "d")
    assert raised.value.transient
    assert not list((tmp_path / "d" / "downloads").glob("*"))


class _CutShortWithoutLength(_Quiet):
    """An answer of unknown length (no Content-Length, not chunked: read until the
    connection closes) that a proxy cuts short, with an ETag that would keep it."""

    body = b""
    answers: list[int] = []

    def do_GET(self):  # noqa: N802 (the http.server API)
        if self.headers.get("If-None-Match") == '"v1"':
            self.answers.append(304)
            self.send_response(304)
            self.end_headers()
            return
        self.answers.append(200)
        self.send_response(200)
        self.send_header("ETag", '"v1"')
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 2])


def test_a_download_of_unknown_length_is_not_kept_by_its_etag(tmp_path, layout_zip):
    """An answer with neither a length nor chunks, cut short, cannot be told from a whole
    one: its ETag is not kept, so the next fetch downloads it anew instead of being
    answered 304 for the broken copy for good."""
    _CutShortWithoutLength.body = layout_zip.read_bytes()
    _CutShortWithoutLength.answers = []
    with serving(_CutShortWithoutLength) as base:
        for _ in range(2):
            with pytest.raises(DataError, match=r"archive\.zip"):
                fetch_data(f"{base}/archive.zip", data_dir=tmp_path / "d")
    assert _CutShortWithoutLength.answers == [200, 200]


def test_a_url_with_non_ascii_characters_is_downloaded(tmp_path, shaded_csv):
    """A URL as a user copies it from a browser's address bar, with accents in its path,
    is sent percent-encoded (it had been a UnicodeEncodeError traceback)."""
    served = tmp_path / "served" / "données"
    served.mkdir(parents=True)
    (served / "fer2013.csv").write_bytes(shaded_csv.read_bytes())
    with serving(functools.partial(_CountingFiles, directory=str(served.parent))) as base:
        fetched = fetch_data(f"{base}/données/fer2013.csv", data_dir=tmp_path / "d")
    assert fetched.sha256 == fetch_data(str(shaded_csv), data_dir=tmp_path / "d2").sha256


def test_a_url_with_a_non_ascii_host_asks_for_its_xn_form(tmp_path):
    """Python's IDNA encoding is not the browsers' (straße.de): such a host is refused in
    one line rather than sent to what may be another domain."""
    with pytest.raises(DataError, match=r"straße\.de/x\.zip: the host is not ASCII; give it "
                                        r"in its xn-- form"):
        fetch_data("http://straße.de/x.zip", data_dir=tmp_path / "d")


def test_a_url_that_cannot_be_parsed_is_one_error(tmp_path):
    with pytest.raises(DataError, match=r"http://\[::1/x\.zip: not a valid URL"):
        fetch_data("http://[::1/x.zip", data_dir=tmp_path / "d")


@pytest.fixture
def loopback_tls(tmp_path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 with a self-signed certificate, and the
    certificate's file (which SSL_CERT_FILE names for a client that trusts it).
    cryptography is installed with prefect, a dev requirement."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "loopback.pem", tmp_path / "loopback.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


class _Redirecting(_Quiet):
    """Answers every request with a redirect to ``to`` + its path."""

    to = ""

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(302)
        self.send_header("Location", self.to + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_an_https_url_redirected_to_http_is_refused(tmp_path, shaded_csv, loopback_tls,
                                                    monkeypatch):
    """A dataset asked for over https comes over https: a redirect to plain http (where
    anyone on the way may read and change it) is refused, naming the target, before it
    is asked; one to https is followed."""
    context, cert_file = loopback_tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    _CountingFiles.statuses = []
    plain = functools.partial(_CountingFiles, directory=str(shaded_csv.parent))
    with serving(plain) as http_base, serving(_Redirecting, tls=context) as https_base:
        _Redirecting.to = http_base
        with pytest.raises(DataError, match=rf"{re.escape(https_base)}/fer2013\.csv: the server "
                                            r"answered HTTP 302 \(a redirect to "
                                            rf"{re.escape(http_base)}/fer2013\.csv, refused: it "
                                            r"leaves https\)"):
            fetch_data(f"{https_base}/fer2013.csv", data_dir=tmp_path / "d")
        assert _CountingFiles.statuses == []
        with serving(plain, tls=context) as files_over_tls:
            _Redirecting.to = files_over_tls
            fetched = fetch_data(f"{https_base}/fer2013.csv", data_dir=tmp_path / "d")
    assert fetched.sha256 == load_dataset(shaded_csv).sha256


def test_a_server_whose_certificate_is_not_trusted_is_not_retried(tmp_path, shaded_csv,
                                                                  loopback_tls):
    """An untrusted TLS certificate does not pass by itself: a DataError, which a flow does
    not retry (it had been a transient error, retried three times), with the reason."""
    context, _ = loopback_tls
    plain = functools.partial(_CountingFiles, directory=str(shaded_csv.parent))
    with serving(plain, tls=context) as base, pytest.raises(
            DataError, match=r"download failed \(.*CERTIFICATE_VERIFY_FAILED.*\); check the URL; "
                             r"if your own CA signed the server's certificate, name its file in "
                             r"SSL_CERT_FILE"):
        fetch_data(f"{base}/fer2013.csv", data_dir=tmp_path / "d", retry_later=True)


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1:abc/fer2013.csv", "nonnumeric port: 'abc'"),
    ("http://exa mple.com/fer2013.csv", "URL can't contain control characters"),
    ("http:///fer2013.csv", "no host given"),
])
def test_a_malformed_url_is_not_retried(tmp_path, url, reason):
    """A URL no asking again can mend is a DataError (a flow's retries had asked it three
    times, as a server that was down)."""
    with pytest.raises(DataError, match=rf"download failed \({re.escape(reason)}"):
        fetch_data(url, data_dir=tmp_path / "d", retry_later=True)


class _AnyPath(_Quiet):
    """Answers any path with ``body``."""

    body = b""

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@pytest.mark.parametrize(("name", "extension"), [
    ("a" * 300 + ".csv", "a.csv"), ("é" * 150 + ".tar.gz", "é.tar.gz"),
    ("a" * 300 + ".version_final.csv", "a.csv"),  # dots in the name: its last suffix
])
def test_a_url_with_a_very_long_file_name_is_downloaded(tmp_path, shaded_csv, image_tree, name,
                                                        extension):
    """A URL's last part may be longer than a file name may be: it had failed as "File name
    too long", blamed on FER_DATA_DIR's space and permissions. The copy's name is cut,
    keeping the extension (a multi-byte character is not cut in half)."""
    import tarfile

    if name.endswith(".csv"):
        _AnyPath.body = shaded_csv.read_bytes()
        expected = load_dataset(shaded_csv).sha256
    else:
        with tarfile.open(tmp_path / "served.tar.gz", "w:gz") as archive:
            archive.add(image_tree, arcname=".")
        _AnyPath.body = (tmp_path / "served.tar.gz").read_bytes()
        expected = load_dataset(image_tree).sha256
    with serving(_AnyPath) as base:
        fetched = fetch_data(f"{base}/{name}", data_dir=tmp_path / "d")
        again = fetch_data(f"{base}/{name}", data_dir=tmp_path / "d")
    assert fetched.sha256 == again.sha256 == expected
    copies = [path.name for path in (tmp_path / "d" / "downloads").iterdir()
              if not path.name.endswith(".json")]
    assert len(copies) == 1 and copies[0].endswith(extension)
    assert len(copies[0].encode()) <= 200


def test_a_local_source_with_a_long_name_is_copied(tmp_path, shaded_csv):
    """A local file's name may take the whole 255 bytes, with no room for the records fer
    keeps beside its copy (`.source-stamp.json`)."""
    source = tmp_path / ("b" * 248 + ".csv")
    source.write_bytes(shaded_csv.read_bytes())
    assert fetch_data(str(source), data_dir=tmp_path / "d").sha256 == load_dataset(
        shaded_csv).sha256


def test_a_local_source_whose_name_is_not_utf8_is_copied(tmp_path, shaded_csv):
    """A Latin-1 `café.csv` (bytes 63 61 66 e9): measuring its copy's name as UTF-8 raised
    UnicodeEncodeError, a traceback."""
    source = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.csv"))
    source.write_bytes(shaded_csv.read_bytes())
    assert fetch_data(str(source), data_dir=tmp_path / "d").sha256 == load_dataset(
        shaded_csv).sha256


def test_a_local_copy_that_fails_leaves_no_partial_file(tmp_path, shaded_csv, monkeypatch):
    """A copy the disk cannot take is one error, and takes back what it wrote."""
    def copy_on_a_full_disk(source, target):
        Path(target).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(shutil, "copy2", copy_on_a_full_disk)
    with pytest.raises(DataError, match="No space left on device"):
        fetch_data(str(shaded_csv), data_dir=tmp_path / "d")
    assert not list((tmp_path / "d").rglob("*.part"))


@pytest.mark.parametrize("kind", ["http", "s3", "local"])
def test_a_copy_is_on_disk_before_it_is_renamed_into_place(tmp_path, shaded_csv, monkeypatch,
                                                           disk_events, kind):
    """Each partial copy is fsynced before it takes the copy's name: after a power loss,
    a name with no bytes behind it would be kept by its records (fsynced) for good."""
    from fer.storage import S3Store

    monkeypatch.setattr(S3Store, "version", lambda store, key: "v1")
    monkeypatch.setattr(S3Store, "download",
                        lambda store, key, target: target.write_bytes(shaded_csv.read_bytes()))
    handler = functools.partial(_CountingFiles, directory=str(shaded_csv.parent))
    with serving(handler) as base:
        source = {"http": f"{base}/fer2013.csv", "s3": "s3://bucket/fer2013.csv",
                  "local": str(shaded_csv)}[kind]
        fetch_data(source, data_dir=tmp_path / "d", endpoint_url="http://127.0.0.1:9")
    copied = [path for event, path in disk_events if event == "replace" and "downloads" in path
              and not path.endswith(".json.part") and not Path(path).name.startswith(".")]
    assert len(copied) == 1
    assert disk_events.index(("fsync", copied[0])) < disk_events.index(("replace", copied[0]))


def test_unreachable_url_is_one_clear_error(tmp_path):
    """A dead URL fails with the URL and a hint, and leaves no partial file behind."""
    with pytest.raises(FerError, match=r"127\.0\.0\.1:9/fer2013\.csv: download failed"):
        fetch_data("http://127.0.0.1:9/fer2013.csv", data_dir=tmp_path / "d")
    assert not list((tmp_path / "d" / "downloads").glob("*"))


def test_an_archive_that_fails_to_unpack_leaves_no_partial_tree(tmp_path, layout_zip):
    """An archive that fails halfway (here a damaged last entry, after the good ones were
    written; a full disk stops it the same way) had left what it had unpacked under
    FER_DATA_DIR/sources until the next fetch of it: the size of a dataset, kept for
    nothing."""
    import zipfile

    marker = b"damaged entry " * 8
    with zipfile.ZipFile(layout_zip, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("train/happy/zz.png", marker)
    layout_zip.write_bytes(layout_zip.read_bytes().replace(marker, marker.upper()))
    with pytest.raises(DataError, match=r"train/happy/zz\.png"):
        fetch_data(str(layout_zip), data_dir=tmp_path / "data")
    sources = tmp_path / "data" / "sources"
    assert not [p for p in sources.rglob("*") if p.is_dir()], list(sources.rglob("*"))[:5]


def test_a_local_data_option_is_recorded_as_an_absolute_path(tmp_path, image_tree, monkeypatch):
    """`--data ./folder`: the run reads the folder in place and its manifest names it in
    full, so the record means the same from any working directory."""
    monkeypatch.chdir(image_tree.parent)
    source = resolve_data(image_tree.name, data_dir=tmp_path / "data",
                          default_source="http://127.0.0.1:9/x")
    assert source == DataSource(Path(image_tree.name), str(image_tree.resolve()))


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "csv"])
def test_a_url_whose_name_says_nothing_of_its_kind_is_read_by_its_content(tmp_path, image_tree,
                                                                           shaded_csv, kind):
    """Download links often end in no file name (`.../download?id=7`, an S3 key without an
    extension): such a zip had been refused as an 'unsupported source type', and a CSV or
    tarball too. Their first bytes say what they are."""
    import tarfile

    served = tmp_path / "served"
    served.mkdir()
    if kind == "zip":
        zip_folder(image_tree, served / "download")
    elif kind == "tar.gz":
        with tarfile.open(served / "download", "w:gz") as archive:
            archive.add(image_tree, arcname=".")
    else:
        (served / "download").write_bytes(shaded_csv.read_bytes())
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(served))) as base:
        fetched = fetch_data(f"{base}/download?id=7", data_dir=tmp_path / "data")
    expected = read_splits(shaded_csv if kind == "csv" else image_tree)
    assert sorted(read_splits(fetched.path)) == sorted(expected)
    assert len(read_splits(fetched.path)["test"]) == len(expected["test"])


def test_a_url_serving_another_binary_kind_is_named_as_unsupported(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(served))) as base:
        with pytest.raises(DataError, match=rf"^{re.escape(base)}/blob: unsupported source type"):
            fetch_data(f"{base}/blob", data_dir=tmp_path / "data")


def test_a_content_named_copy_never_replaces_another_sources_copy(tmp_path, shaded_csv):
    """`a/fer2013.csv` (a CSV without its suffix) fetched after `fer2013.csv`: its
    content-named link had been `downloads/fer2013.csv`, the other's own copy, so fetching
    that again (its copy's stamp unchanged) read A's data under its name. Fetching twice
    leaves no partial file."""
    data_dir = tmp_path / "data"
    (tmp_path / "a").mkdir()
    other = tmp_path / "a" / "fer2013"
    other.write_text(shaded_csv.read_text().replace("\n3,", "\n4,", 1))
    b = fetch_data(str(shaded_csv), data_dir=data_dir)
    fetch_data(str(other), data_dir=data_dir)
    fetch_data(str(other), data_dir=data_dir)
    again = fetch_data(str(shaded_csv), data_dir=data_dir)
    assert again.sha256 == b.sha256 == load_dataset(shaded_csv).sha256
    assert not list(data_dir.rglob("*.part"))


@pytest.mark.parametrize(("page", "name", "asked"), [
    (b"<!DOCTYPE html>\n<html><body>Confirm download</body>", "download", "download?id=7"),
    (b"\xef\xbb\xbf  <!-- login --><html></html>", "download", "download?id=7"),
    (b"<!doctype html><html>GitHub blob view</html>", "fer2013.csv", "fer2013.csv"),
    (b"<html><head>Sign in</head></html>", "archive.zip", "archive.zip"),
])
def test_a_web_page_in_place_of_a_dataset_is_named_as_one(tmp_path, page, name, asked):
    """A download link that answers with a page (a login, a virus-scan confirmation, a
    GitHub blob view of a .csv) had been read as a CSV, 'missing column(s) emotion,
    pixels, Usage', or as a zip, 'not a readable archive', whatever the URL's name."""
    served = tmp_path / "served"
    served.mkdir()
    (served / name).write_bytes(page)
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(served))) as base:
        with pytest.raises(DataError, match=rf"^{re.escape(base)}/{re.escape(asked)}: the server "
                                            r"sent a web page, not a dataset"):
            fetch_data(f"{base}/{asked}", data_dir=tmp_path / "data")


def test_the_default_is_not_fetched_over_a_dataset_made_current_meanwhile(tmp_path,
                                                                          layout_zip):
    """`fer train` without --data on a fresh data folder while `fer fetch-data` unpacks
    there: the training, which found nothing current before the lock, finds the fetched
    dataset once it holds the lock, instead of downloading the default over it."""
    data_dir = tmp_path / "data"
    fetched = fetch_data(str(layout_zip), data_dir=data_dir)  # what the other process did
    assert fetch_data("http://127.0.0.1:9/fer2013.csv", data_dir=data_dir,
                      unless_current=True) is None
    assert current_source(data_dir).path == fetched.path


def test_a_local_source_is_recorded_by_its_absolute_path(tmp_path, layout_zip, monkeypatch):
    """`fer fetch-data --source ../data/x.zip`: later runs record where it is, not a path
    relative to wherever fetch-data ran."""
    monkeypatch.chdir(layout_zip.parent)
    fetched = fetch_data(layout_zip.name, data_dir=tmp_path / "data")
    assert fetched.origin == str(layout_zip.resolve())
    assert current_source(tmp_path / "data").origin == str(layout_zip.resolve())


def test_a_presigned_url_is_recorded_and_named_without_its_secrets(tmp_path, shaded_csv):
    """A presigned S3 URL (or one with a token parameter) downloads as given, but its
    signature and token stay out of current.json, which run manifests copy and publish, and
    out of error messages; README: credentials are never written to a manifest."""
    secret = ("X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef"
              "&X-Amz-Security-Token=tok-9f2e")
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(shaded_csv.parent))) as base:
        fetched = fetch_data(f"{base}/fer2013.csv?X-Amz-Expires=60&{secret}",
                             data_dir=tmp_path / "data")
        with pytest.raises(DataError) as missing:
            fetch_data(f"{base}/gone.csv?{secret}", data_dir=tmp_path / "data")
    assert fetched.origin == f"{base}/fer2013.csv?X-Amz-Expires=60"
    assert current_source(tmp_path / "data").origin == fetched.origin
    assert str(missing.value).startswith(f"{base}/gone.csv: the server answered HTTP 404")
    for secret_part in ("AKIAEXAMPLE", "deadbeef", "tok-9f2e"):
        assert secret_part not in str(missing.value) + json.dumps(
            json.loads((tmp_path / "data" / "current.json").read_text()))


def test_a_freshly_signed_url_of_the_same_object_reuses_the_copy(tmp_path, shaded_csv):
    """A scheduled run given a newly presigned URL each time (new date, expiry, signature):
    the copy from before is asked about (its date and length) instead of the whole file
    being downloaded again under a new name and kept beside the others; another object is
    another copy."""
    _CountingFiles.statuses = []
    handler = functools.partial(_CountingFiles, directory=str(shaded_csv.parent))
    data_dir = tmp_path / "d"
    with serving(handler) as base:
        for date, signature in (("20261206T010000Z", "aa11"), ("20261213T010000Z", "bb22")):
            fetch_data(f"{base}/fer2013.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date={date}"
                       f"&X-Amz-Expires=3600&X-Amz-Signature={signature}", data_dir=data_dir)
        assert _CountingFiles.statuses == [200, 200]
        (shaded_csv.parent / "copy.csv").write_bytes(shaded_csv.read_bytes())
        fetch_data(f"{base}/copy.csv?X-Amz-Signature=cc33", data_dir=data_dir)
    downloads = [p for p in (data_dir / "downloads").iterdir() if p.suffix == ".csv"]
    assert sorted(p.name.split("-", 1)[1] for p in downloads) == ["copy.csv", "fer2013.csv"]


@pytest.mark.parametrize("signed", [
    "AWSAccessKeyId=AKIA1&Expires={n}&Signature=s{n}",  # S3 SigV2
    "GoogleAccessId=a%40b&Expires={n}&Signature=s{n}",  # Google V2
    "Policy=p{n}&Signature=s{n}&Key-Pair-Id=K1",  # CloudFront
    "sv=2022-11-02&se=2026-12-0{n}T00%3A00Z&sr=b&sp=r&sig=s{n}",  # Azure SAS
])
def test_every_common_signing_scheme_names_one_local_copy(signed):
    """Two signings of the same object (other expiry, signature) name one local copy; the
    object's own parameters still tell copies apart."""
    from fer.fetch import _download_name

    url = "https://h.example/data/fer2013.csv?versionId=7&"
    first, second = (_download_name(url + signed.format(n=n)) for n in (1, 2))
    assert first == second
    assert _download_name(url.replace("=7", "=8") + signed.format(n=1)) != first


@pytest.mark.parametrize("a, b", [("token=A", "token=B"), ("st=1&id=4", "st=2&id=4"),
                                  ("api_key=A", "api_key=B"), ("expires=1", "expires=2")])
def test_a_plain_urls_parameters_keep_naming_other_copies(a, b):
    """Without a signature, `?token=` or `?st=` may name another object (two share links):
    two such URLs keep two local copies, or one would be taken for the other."""
    from fer.fetch import _download_name

    url = "https://h.example/download?"
    assert _download_name(url + a) != _download_name(url + b)


def test_a_presigned_url_served_no_more_is_warned_of_without_its_secrets(tmp_path, shaded_csv,
                                                                          caplog):
    """The server gone on a second fetch of the same signed URL (a Prefect retry): the copy
    from before is used, and the warning, which reaches the run's log, has no secret."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "fer2013.csv").write_bytes(shaded_csv.read_bytes())
    with serving(functools.partial(http.server.SimpleHTTPRequestHandler,
                                   directory=str(served))) as base:
        url = f"{base}/fer2013.csv?X-Amz-Signature=deadbeef&token=tok-9f2e"
        fetch_data(url, data_dir=tmp_path / "data")
        (served / "fer2013.csv").unlink()  # now 404: the copy from before is kept
        fetch_data(url, data_dir=tmp_path / "data")
    assert "using the copy fetched before" in caplog.text
    assert "deadbeef" not in caplog.text and "tok-9f2e" not in caplog.text


def test_redacting_keeps_the_rest_of_a_url_as_written():
    """Only the secret parameters go: the others keep their encoding, order and form."""
    from fer.fetch import redacted

    url = ("https://h.example/f.zip?response-content-disposition=attachment%3B%20filename%3Dx"
           "&X-Amz-Signature=abc&flag&X-Goog-Credential=svc%40p.iam&v=1+2")
    assert redacted(url) == ("https://h.example/f.zip?response-content-disposition=attachment"
                             "%3B%20filename%3Dx&flag&v=1+2")
    assert redacted("https://h.example/f.zip?id=7") == "https://h.example/f.zip?id=7"
    assert redacted("s3://bucket/key?token=x") == "s3://bucket/key?token=x"  # no such thing


def test_training_without_data_takes_the_dataset_made_current_while_it_waited(
        tmp_path, layout_zip, monkeypatch):
    """`fer train` without --data found nothing current, then waited for the data folder's
    lock while `fer fetch-data` unpacked: it takes that dataset, and downloads nothing (the
    default here is a port nobody answers)."""
    import fer.fetch

    data_dir = tmp_path / "data"
    made = {}
    real_lock = fer.fetch.data_dir_lock

    @contextlib.contextmanager
    def lock_after_another_fetch(folder):
        if not made:  # the other process, done by the time this one holds the lock
            monkeypatch.setattr(fer.fetch, "data_dir_lock", real_lock)
            made["fetched"] = fetch_data(str(layout_zip), data_dir=folder)
        with real_lock(folder):
            yield

    monkeypatch.setattr(fer.fetch, "data_dir_lock", lock_after_another_fetch)
    source = resolve_data(None, data_dir=data_dir, default_source="http://127.0.0.1:9/x.csv")
    assert source.path == made["fetched"].path
    assert current_source(data_dir).path == made["fetched"].path


def test_a_url_with_a_password_is_refused_without_printing_it(tmp_path):
    with pytest.raises(DataError, match=r"^https://files\.example/fer\.zip: a user name or "
                                        r"password in the URL is not supported") as refused:
        fetch_data("https://user:s3cret@files.example/fer.zip", data_dir=tmp_path / "data")
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(("data", "current", "checked"), [
    (None, True, False),  # the current dataset, read where fetch-data put it
    ("faces.zip", False, False),  # a local source, read where it is
    (None, False, True),  # no current dataset: the default source is downloaded
    ("https://example.org/fer.zip", True, True),  # a remote source is always fetched
    ("s3://bucket/fer.zip", False, True),
])
def test_the_data_folder_must_be_writable_only_where_data_is_fetched_into_it(
        tmp_path, monkeypatch, data, current, checked):
    """A data folder provisioned read-only (a container's volume mounted `:ro` after `fer
    fetch-data`) was refused by `fer train`, `fer evaluate` and the retrain flow before
    reading its current dataset; it is checked only where a download will write into it.
    (Tests run as root, whom no permission bit stops: which folders are checked is what is
    asserted.)"""
    import fer.fetch

    checked_folders = []
    monkeypatch.setattr(fer.fetch, "check_writable",
                        lambda folder, what: checked_folders.append((folder, what)))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if current:
        (data_dir / "current.json").write_text("{}")
    fer.fetch.check_can_fetch(data, data_dir=data_dir)
    assert checked_folders == ([(data_dir, "FER_DATA_DIR")] if checked else [])


def test_a_data_folder_that_cannot_be_fetched_into_is_one_line(tmp_path):
    """The check itself, unpatched: FER_DATA_DIR under a file, before any download."""
    from fer.fetch import check_can_fetch

    (tmp_path / "taken").write_text("")
    with pytest.raises(FerError, match=r"^FER_DATA_DIR .*taken/data: .*taken is a file"):
        check_can_fetch("https://127.0.0.1:9/f.zip", data_dir=tmp_path / "taken" / "data")
