"""fer.storage: the local-folder and S3 backends (a real SeaweedFS server): opening stores by
URL, multipart uploads, and S3 failures as one line in bounded time, without secrets."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import run_folders
import s3server
from run_folders import BIG, CrashAfterUploads, make_run, pointers
from s3server import BUCKET, SeaweedS3, free_port

from fer.errors import MissingObjectError, StorageError
from fer.locks import taking_turns
from fer.runs import list_runs, publish_run
from fer.storage import LocalStore, S3Store, Store, open_store

# The real S3 server fixtures (assigned, not imported, so test arguments may shadow them).
s3_server = s3server.s3_server
s3_env = s3server.s3_env
store = run_folders.store  # an empty store of each backend
integration = pytest.mark.integration


# --- opening stores -------------------------------------------------------------------------


def test_open_store_picks_backend_from_url(tmp_path):
    """A path or file:// URL opens a folder store; both see the same runs."""
    folder = make_run(tmp_path / "runs", "run-a", accuracy=0.5)
    publish_run(folder, open_store(str(tmp_path / "artifacts")))
    by_url = open_store(f"file://{tmp_path / 'artifacts'}")
    assert isinstance(by_url, LocalStore)
    assert [s.run_id for s in list_runs(by_url)] == ["run-a"]


def test_a_file_url_as_a_file_manager_copies_it_names_its_folder(tmp_path, monkeypatch):
    """`file://localhost/PATH` and `%20` for a space (RFC 8089, as file managers copy a
    folder's location) had named ./localhost/PATH and a folder called `my%20store`, and
    publishing there went ahead without a word."""
    folder = make_run(tmp_path / "runs", "run-a", accuracy=0.5)
    publish_run(folder, open_store(str(tmp_path / "my store")))
    monkeypatch.chdir(tmp_path)
    for url in (f"file://localhost{tmp_path}/my%20store", f"file://{tmp_path}/my%20store",
                "file://my%20store", "FILE://LOCALHOST" + str(tmp_path / "my store")):
        assert [s.run_id for s in list_runs(open_store(url))] == ["run-a"], url
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my store", "runs"]
    with pytest.raises(StorageError, match=r"its %-escapes are not UTF-8"):
        open_store("file://caf%E9")
    # a store an earlier fer made under the escapes as written stays the store
    publish_run(make_run(tmp_path / "runs", "run-b", accuracy=0.5), open_store("old%20store"))
    assert [s.run_id for s in list_runs(open_store("file://old%20store"))] == ["run-b"]


def test_s3_requests_name_the_bucket_in_the_path_as_minio_needs(monkeypatch, tmp_path):
    """Path-style addressing, http://minio:9000/BUCKET/KEY, even where the user's AWS config
    asks for virtual-hosted style (AWS's: BUCKET.minio:9000, a name the compose stack's
    network does not know). The S3 tests' 127.0.0.1 endpoints get path style whatever the
    setting, so this checks it with the compose stack's endpoint (a presigned URL is made
    without a request)."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\ns3 =\n    addressing_style = virtual\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_PROFILE", raising=False)  # the [default] profile above
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fer")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fer-secret")
    store = S3Store("fer-artifacts", prefix="prod", endpoint_url="http://minio:9000")
    url = store._client.generate_presigned_url(
        "get_object", Params={"Bucket": store.bucket, "Key": "prod/latest.json"})
    assert url.startswith("http://minio:9000/fer-artifacts/prod/latest.json?"), url


def test_both_backends_have_every_method_the_interface_declares():
    """Publishing and reports are written against Store alone: a method it declares that a
    backend lacks fails only when that backend is in use (in a user's run, not here)."""
    declared = {name for name in vars(Store) if callable(vars(Store)[name])
                and not name.startswith("__")}
    assert {"put_file", "put_bytes", "get_bytes", "get_versioned", "put_bytes_if", "download",
            "run_ids", "url"} <= declared
    for backend in (LocalStore, S3Store):
        assert declared <= set(dir(backend)), backend


def test_an_upload_whose_local_file_cannot_be_read_is_one_error_naming_it(store, tmp_path):
    """A run file gone or unreadable while publishing: S3's upload let the OSError out as a
    traceback, and the folder store blamed itself ("cannot write" its own target)."""
    missing = tmp_path / "missing.bin"
    with pytest.raises(StorageError, match=rf"^cannot read {re.escape(str(missing))} to upload "
                                           r"it \(No such file or directory\)$"):
        store.put_file("runs/a/model.keras", missing)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="Linux /proc")
def test_a_run_file_that_fails_while_read_is_named_not_the_folder_store(tmp_path):
    """A read that fails partway (EIO: /proc/self/mem opens, its first read fails) is the
    run file's error; the folder store blamed its own target ("cannot write")."""
    store = open_store(str(tmp_path / "artifacts"))
    with pytest.raises(StorageError, match=r"^cannot read /proc/self/mem to upload it "
                                           r"\(Input/output error\)$"):
        store.put_file("runs/a/model.keras", Path("/proc/self/mem"))
    assert not list((tmp_path / "artifacts").rglob("*.tmp"))  # its partial copy removed


def test_a_download_that_cannot_write_locally_raises_the_os_error(store, tmp_path):
    """Both stores let a local write failure through as the OSError it is, which `fer
    reports get` words as its --dest's (S3's had been a botocore traceback; the folder
    store's had blamed the store)."""
    store.put_bytes("runs/a/x.txt", b"x")
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(OSError):
        store.download("runs/a/x.txt", tmp_path / "a-file" / "x.txt.part")


def test_a_killed_writers_temporary_in_a_folder_store_is_removed_a_day_later(tmp_path):
    """A publish killed mid-copy leaves `.model.keras.<uuid>.tmp` beside the target; the
    next write of that file removes it once a day old (they had piled up, a model's size
    each), and leaves a fresh one alone: another publisher may be writing it."""
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "store" / "runs" / "r"
    folder.mkdir(parents=True)
    abandoned, fresh, other = (folder / ".model.keras.aa.tmp", folder / ".model.keras.bb.tmp",
                               folder / ".metrics.json.cc.tmp")
    for tmp in (abandoned, fresh, other):
        tmp.write_bytes(b"half a model")
    two_days_ago = time.time() - 2 * 24 * 3600
    for tmp in (abandoned, other):
        os.utime(tmp, (two_days_ago, two_days_ago))
    store.put_bytes("runs/r/model.keras", b"model")
    assert (folder / "model.keras").read_bytes() == b"model"
    assert not abandoned.exists()
    assert fresh.exists() and other.exists()  # another file's temporaries: its own write's


def test_a_conditional_write_lands_only_on_the_version_it_read(store):
    """put_bytes_if writes when the object is still as read (absent, or the version
    get_versioned gave) and refuses, writing nothing, once another writer changed it."""
    assert store.get_versioned("p.json") == (None, None)
    assert store.put_bytes_if("p.json", b"first", version=None)
    assert not store.put_bytes_if("p.json", b"second", version=None)  # it exists now
    data, first = store.get_versioned("p.json")
    assert data == b"first" and first is not None
    store.put_bytes("p.json", b"changed by another writer")
    assert not store.put_bytes_if("p.json", b"stale", version=first)
    data, current = store.get_versioned("p.json")
    assert data == b"changed by another writer" and current != first
    assert store.put_bytes_if("p.json", b"third", version=current)
    assert store.get_bytes("p.json") == b"third"


def test_a_folder_stores_conditional_write_waits_for_another_publisher(tmp_path):
    """In a folder store the compare and the write happen under `.fer-pointers.lock`:
    while another publisher holds it, put_bytes_if waits (else both could compare against
    the same old pointer and both write)."""
    store = LocalStore(tmp_path / "artifacts")
    store.put_bytes("p.json", b"old")
    _, version = store.get_versioned("p.json")
    done = []
    with taking_turns(store.root / ".fer-pointers.lock", waiting="-", unprotected="-"):
        writer = threading.Thread(
            target=lambda: done.append(store.put_bytes_if("p.json", b"new", version=version)))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and store.get_bytes("p.json") == b"old"
    writer.join(10)
    assert done == [True] and store.get_bytes("p.json") == b"new"


@pytest.mark.parametrize("version, condition", [('"old"', {"IfMatch": '"old"'}),
                                                (None, {"IfNoneMatch": "*"})])
@pytest.mark.parametrize(("code", "status", "outcome"), [
    ("PreconditionFailed", 412, "changed"),  # the ETag differs
    ("ConditionalRequestConflict", 409, "changed"),  # AWS: another conditional write
    ("NoSuchKey", 404, "changed"),  # AWS: If-Match on an object deleted since it was read
    ("NotImplemented", 501, "unconditional"),  # a server without conditional writes
    ("InvalidArgument", 400, "unconditional"),  # one that rejects the headers
    ("AccessDenied", 403, "error"),
])
def test_s3_answers_to_a_conditional_write(monkeypatch, caplog, version, condition, code,
                                           status, outcome):
    """What each refusal of a conditional PutObject means (SeaweedFS answers only 412, so
    the answers of AWS and other servers are replayed through botocore's Stubber, which
    also checks that the condition was sent): a pointer that changed meanwhile (compare
    again), a server that cannot do it (write anyway, with a warning), or an error."""
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = S3Store(BUCKET, endpoint_url="http://127.0.0.1:9", max_attempts=1)
    request = {"Bucket": BUCKET, "Key": "p.json", "Body": b"x", "ContentType": "application/json"}
    with Stubber(store._client) as stub:
        stub.add_client_error("put_object", service_error_code=code, http_status_code=status,
                              expected_params={**request, **condition})
        if outcome == "unconditional":
            stub.add_response("put_object", {"ETag": '"e"'}, request)
        if outcome == "error":
            with pytest.raises(StorageError, match=f"denied access .*{code}"):
                store.put_bytes_if("p.json", b"x", version=version)
        else:
            assert store.put_bytes_if("p.json", b"x", version=version) == (outcome != "changed")
        stub.assert_no_pending_responses()
    assert ("unconditionally" in caplog.text) == (outcome == "unconditional")


@pytest.mark.parametrize(("code", "status", "transient"), [
    ("SlowDownWrite", 503, True),  # MinIO, a write quorum lost or the server overloaded
    ("XMinioServerNotInitialized", 503, True),  # MinIO while it starts
    ("TooManyRequests", 429, True),
    ("RequestTimeout", 408, True),
    ("InternalError", 500, True),
    ("NotImplemented", 501, False),  # the server cannot do it: no later try can either
    ("XMinioStorageFull", 507, False),  # MinIO's full disk: fail the check before training
    ("XMinioStorageFull", 500, False),  # the same code with another status
    ("InsufficientStorage", 507, False),  # any full disk, by status
    ("OriginTimeout", 522, True),  # a proxy in front of the store (Cloudflare) timing out
    ("AccessDenied", 403, False),
    ("NoSuchKey", 404, False),
])
def test_s3_answers_worth_a_retry_are_transient(monkeypatch, code, status, transient):
    """A publish that fails on an answer worth waiting for (408, 429, a 5xx outage, by
    status whatever the server's code, but not a full disk) is transient, so the Prefect task retries it and a
    store check before training only warns; MinIO's 503 SlowDownWrite had failed a
    scheduled retrain outright."""
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = S3Store(BUCKET, endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with Stubber(store._client) as stub:
        stub.add_client_error("put_object", service_error_code=code, http_status_code=status)
        with pytest.raises(StorageError) as error:
            store.put_bytes("p.json", b"x")
    assert error.value.transient == transient


@pytest.mark.parametrize(("head_status", "code", "message", "expected"), [
    (400, "AuthorizationHeaderMalformed", "The authorization header is malformed; the region "
     "'us-east-1' is wrong; expecting 'eu-west-1'",
     r"refused checking bucket '{BUCKET}': AuthorizationHeaderMalformed .*expecting "
     r"'eu-west-1'; the request was signed for region 'us-east-1': set AWS_DEFAULT_REGION "
     r"\(or the AWS profile's region\) to the bucket's$"),
    (301, "PermanentRedirect", "The bucket you are attempting to access must be addressed "
     "using the specified endpoint.", r"refused checking bucket '{BUCKET}': "
     r"PermanentRedirect The bucket you are attempting to access must be addressed"),
])
def test_a_bucket_check_answered_by_a_bare_status_says_why(monkeypatch, head_status, code,
                                                            message, expected):
    """A HEAD's answer has no body: a bucket in another region than the request was signed
    for (MinIO or AWS with another AWS_DEFAULT_REGION) read "refused checking bucket: 400 Bad
    Request"; a listing of the prefix is asked, whose answer names the cause (replayed
    through botocore's Stubber: SeaweedFS has no regions)."""
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    store = S3Store(BUCKET, prefix="p", endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with Stubber(store._client) as stub:
        stub.add_client_error("head_bucket", service_error_code=str(head_status),
                              http_status_code=head_status)
        stub.add_client_error("list_objects_v2", service_error_code=code, service_message=message,
                              http_status_code=head_status,
                              expected_params={"Bucket": BUCKET, "Prefix": "p/", "MaxKeys": 1})
        with pytest.raises(StorageError, match=expected.format(BUCKET=BUCKET)) as error:
            store.ensure_bucket()
        stub.assert_no_pending_responses()
    assert not error.value.transient


@pytest.mark.parametrize(("url", "message"), [
    ("gs://bucket/x", r"unsupported storage URL 'gs://bucket/x' \(scheme 'gs'\)"),
    ("s3://", r"URL 's3://' has bucket name ''; expected 3-63 lowercase"),
    ("s3://Bad_Bucket/x", r"bucket name 'Bad_Bucket'"),
    ("s3:/fer-artifacts/prod", r"'s3:/fer-artifacts/prod' looks like a URL without '://'"),
    ("s3:fer-artifacts", r"looks like a URL without '://'"),
])
def test_open_store_rejects_bad_urls(url, message):
    """Unsupported schemes, invalid bucket names and a scheme missing its '://' fail before
    any network call (`s3:/bucket/prefix` had published into a local folder of that name)."""
    with pytest.raises(StorageError, match=message):
        open_store(url)


def test_an_s3_url_is_split_literally_in_any_case():
    from fer.storage import split_s3_url

    assert split_s3_url("S3://fer-data/a#b?c/fer.zip") == ("fer-data", "a#b?c/fer.zip")
    assert split_s3_url("s3://fer-data") == ("fer-data", "")


@pytest.mark.parametrize("url", ["s3:/mybucket/fer.csv", "s3:mybucket/fer.csv"])
def test_an_s3_url_without_its_two_slashes_is_refused_not_misread(tmp_path, url):
    """URL parsers give `s3:/mybucket/k` the scheme s3, so fetch-data took it for an S3
    source, and five characters cut off read the bucket `ybucket`."""
    from fer.fetch import fetch_data
    from fer.storage import split_s3_url

    with pytest.raises(StorageError, match=r"expected s3://BUCKET/KEY"):
        split_s3_url(url)
    with pytest.raises(StorageError, match=r"expected s3://BUCKET/KEY"):
        fetch_data(url, data_dir=tmp_path)


@pytest.mark.parametrize("url", ["file://", "FILE:// ", "file:///", "file://localhost/"])
def test_a_file_url_naming_no_folder_is_refused(url, tmp_path, monkeypatch):
    """`--storage "file://$STORE"` with the variable unset published into the current folder
    (Path("") is "."), as an empty --storage no longer does; `file:///$STORE` into /."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"names no folder: expected file://PATH"):
        open_store(url)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_a_drive_letter_or_a_colon_further_on_is_still_a_folder(tmp_path):
    assert isinstance(open_store(str(tmp_path / "runs:2026")), LocalStore)
    assert isinstance(open_store("C:/runs"), LocalStore)


@integration
def test_a_bucket_another_run_created_meanwhile_is_used(s3_env, monkeypatch):
    """Two runs with --create-bucket on a fresh server: both saw no bucket, the second's
    create finds it made by the first (the same owner), and goes on."""
    name = f"fer-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    monkeypatch.setattr(S3Store, "_bucket_exists", lambda self: False)  # as seen before it
    store = open_store(f"s3://{name}/p", endpoint_url=s3_env.endpoint_url, create_bucket=True)
    assert store.bucket == name


@integration
def test_missing_bucket_is_reported_or_created(s3_env, runs):
    """A missing bucket gives a one-line hint, and create_bucket=True creates it."""
    name = f"fer-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StorageError, match=(
        rf"^bucket '{name}' does not exist at http://127\.0\.0\.1:\d+; check the storage URL "
        r"and endpoint, or create it \(fer publish, fer train --publish or --remote and fer "
        r"retrain do with --create-bucket; a deployment with create_bucket: true\)$"
    )):
        open_store(f"s3://{name}/p", endpoint_url=s3_env.endpoint_url)
    store = open_store(f"s3://{name}/p", endpoint_url=s3_env.endpoint_url, create_bucket=True)
    publish_run(make_run(runs, "run-a", accuracy=0.5), store)
    assert [s.run_id for s in list_runs(store)] == ["run-a"]


SCOPED_BUCKET = "fer-scoped"


@contextmanager
def server_with_scoped_key(tmp_path, monkeypatch, actions: list[str]) -> Iterator[SeaweedS3]:
    """A server of its own with bucket SCOPED_BUCKET, and the environment's AWS key one
    that is allowed ``actions`` only (weed's ``Read:bucket/prefix/*`` and the like)."""
    scoped = {"name": "scoped", "actions": actions,
              "credentials": [{"accessKey": "scoped-key", "secretKey": "scoped-secret-key"}]}
    with SeaweedS3(tmp_path / "weed", identities=[scoped]) as server:
        server.create_bucket(SCOPED_BUCKET)  # with the server's own, admin, key
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "scoped-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "scoped-secret-key")
        yield server


@integration
def test_a_key_allowed_only_the_prefix_checks_the_bucket_and_publishes(tmp_path, runs,
                                                                       monkeypatch, s3_env):
    """A key allowed to list, read and write under s3://<bucket>/prod/ only (what an IAM
    policy with an s3:prefix condition grants) is refused HeadBucket, which needs the whole
    bucket: fer checks the bucket by listing its prefix, then publishes and lists runs
    (every command had stopped at "denied access while checking bucket"). Outside the
    prefix, the refusal is still one line naming its code."""
    bucket = SCOPED_BUCKET
    actions = [f"{action}:{bucket}/prod/*" for action in ("Read", "Write", "List")]
    with server_with_scoped_key(tmp_path, monkeypatch, actions) as server:
        store = open_store(f"s3://{bucket}/prod", endpoint_url=server.endpoint_url)
        publish_run(make_run(runs, "run-a", accuracy=0.5), store)
        assert [s.run_id for s in list_runs(store)] == ["run-a"]
        assert pointers(store) == ("run-a", "run-a")
        with pytest.raises(StorageError, match=rf"denied access while checking bucket "
                                               rf"'{bucket}' \(AccessDenied\)"):
            open_store(f"s3://{bucket}/other", endpoint_url=server.endpoint_url)


@integration
def test_a_read_refused_for_a_missing_object_counts_as_missing(tmp_path, runs, monkeypatch,
                                                               s3_env):
    """AWS answers a read of a missing object with 403 where ListBucket does not cover it (a
    policy limited by s3:prefix): here a key that may list and write under prod/ but read
    only prod/runs/, so reading the pointers not yet written is refused as AWS refuses it.
    A listing shows them missing, and the first publish goes through (it had stopped at
    "denied access while reading prod/latest.json"); a pointer that exists and cannot be
    read is still refused, in one line."""
    bucket = SCOPED_BUCKET
    actions = [f"List:{bucket}/prod/*", f"Write:{bucket}/prod/*", f"Read:{bucket}/prod/runs/*"]
    with server_with_scoped_key(tmp_path, monkeypatch, actions) as server:
        store = open_store(f"s3://{bucket}/prod", endpoint_url=server.endpoint_url)
        assert publish_run(make_run(runs, "run-a", accuracy=0.5), store).became_champion
        assert server.client().get_object(Bucket=bucket, Key="prod/latest.json")
        with pytest.raises(StorageError, match=r"denied access while reading "
                                               r"prod/latest\.json \(AccessDenied\)"):
            store.get_bytes("latest.json")
        with pytest.raises(MissingObjectError, match=r"s3://fer-scoped/prod/gone\.txt is not "
                                                     r"in the store"):  # not "denied access"
            store.download("gone.txt", tmp_path / "gone.txt")


# --- S3 failures: one line, bounded time, no secrets ----------------------------------------


def assert_one_clean_line(error: pytest.ExceptionInfo, *secrets: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for secret in secrets:
        assert secret not in message


@integration
def test_wrong_credentials_fail_fast_without_leaking(s3_env, monkeypatch):
    """A wrong secret key gives one StorageError line, quickly, that never shows the key."""
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"denied access while checking bucket .* credentials"
                       ) as error:
        open_store(f"s3://{BUCKET}/p", endpoint_url=s3_env.endpoint_url)
    assert time.monotonic() - start < 30
    assert_one_clean_line(error, wrong, s3_env.secret_key)
    assert not error.value.transient  # retrying will not fix a wrong key


@integration
def test_missing_credentials_are_named(s3_env, monkeypatch):
    """No credentials at all is reported as such, not as a network or bucket problem."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match=r"no usable AWS credentials .* AWS_ACCESS_KEY_ID"
                       ) as error:
        open_store(f"s3://{BUCKET}/p", endpoint_url=s3_env.endpoint_url)
    assert not error.value.transient


@integration
def test_a_failing_credential_source_is_named_and_not_retried(s3_env, monkeypatch, tmp_path):
    """A credential source that fails (here a credential_process that exits 1; in practice
    an expired SSO session or a failing assume-role) is a credentials problem, not a
    transient one: a Prefect retrain checks the store before training and would otherwise
    train for hours and fail at publishing, after three retries."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\ncredential_process = /bin/false\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    with pytest.raises(StorageError, match=r"the AWS credentials for http://127\.0\.0\.1:\d+ "
                       r"could not be loaded \(CredentialRetrievalError: .*custom-process.*\); "
                       r"renew them") as error:
        open_store(f"s3://{BUCKET}/p", endpoint_url=s3_env.endpoint_url)
    assert not error.value.transient
    assert_one_clean_line(error, s3_env.secret_key)


@integration
def test_dead_endpoint_fails_fast(s3_env):
    """An endpoint with nothing listening gives one StorageError line within 30 s."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"cannot reach S3 endpoint {endpoint} .*running$"
                       ) as error:
        open_store(f"s3://{BUCKET}/p", endpoint_url=endpoint)
    assert time.monotonic() - start < 30
    assert_one_clean_line(error, s3_env.secret_key)
    assert error.value.transient  # the server may be back in a minute: worth a retry


@integration
def test_an_upload_that_times_out_is_a_transient_error_not_a_local_file(s3_env, tmp_path):
    """botocore's timeouts are OSErrors too: an upload to a server that stopped answering
    had been reported as the local file that cannot be read, and not retried."""
    (tmp_path / "model.keras").write_bytes(b"weights")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = S3Store(BUCKET, endpoint_url=endpoint, max_attempts=1, read_timeout=1)
        with pytest.raises(StorageError, match=rf"S3 endpoint {endpoint} did not answer") as error:
            store.put_file("runs/r/model.keras", tmp_path / "model.keras")
    assert error.value.transient


def test_an_object_whose_read_is_cut_short_has_its_body_closed(monkeypatch):
    """A read that times out partway through an object's body is one StorageError, and the
    body is closed: left open, it holds its pooled connection until the GC finds it."""
    from botocore.exceptions import ReadTimeoutError

    class CutShort:
        closed = False

        def read(self, *args):
            raise ReadTimeoutError(endpoint_url="http://127.0.0.1:9")

        def close(self):
            self.closed = True

    body = CutShort()
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9")
    monkeypatch.setattr(store._client, "get_object", lambda **_: {"Body": body, "ETag": '"e"'})
    with pytest.raises(StorageError, match="did not answer within"):
        store.get_bytes("runs/x/manifest.json")
    assert body.closed


@integration
def test_silent_endpoint_times_out_in_bounded_time(s3_env):
    """A server that accepts connections but never answers fails within 30 s, not hangs."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(StorageError, match=rf"S3 endpoint {endpoint} did not answer") as error:
            open_store(f"s3://{BUCKET}/p", endpoint_url=endpoint)
        assert time.monotonic() - start < 30
    assert_one_clean_line(error, s3_env.secret_key)


@integration
def test_server_killed_mid_publish_then_publish_again(tmp_path, monkeypatch, runs):
    """S3 killed mid-publish: one clear error, no pointer to the half run, retry works."""
    with SeaweedS3(tmp_path / "seaweedfs") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        server.create_bucket(BUCKET)
        store = open_store(f"s3://{BUCKET}/kill", endpoint_url=server.endpoint_url)
        publish_run(make_run(runs, "old", accuracy=0.5, minute=1), store)
        new = make_run(runs, "new", accuracy=0.9, minute=2, big=True)
        killer = CrashAfterUploads(store, uploads=1, on_crash=lambda: server.stop(kill=True))

        with pytest.raises(StorageError, match=r"cannot reach S3 endpoint .* while uploading "
                           r"kill/runs/new/") as error:
            publish_run(new, killer)
        assert_one_clean_line(error, server.secret_key)

        server.start()
        assert [s.run_id for s in list_runs(store)] == ["old"]
        assert pointers(store) == ("old", "old")
        assert publish_run(new, store).became_champion
        assert pointers(store) == ("new", "new")


@integration
def test_test_server_moves_to_fresh_ports_when_one_was_taken_before_it_bound(tmp_path):
    """A port taken between the probe and weed's bind costs a retry, not a red CI run.

    CI once lost every S3 test to "bind: address already in use" on the volume port.
    """
    server = SeaweedS3(tmp_path / "seaweedfs")
    taken = server.ports["volume.port"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen(1)
        with server:
            assert server.ports["volume.port"] != taken
            server.create_bucket(BUCKET)
            client = server.client()
            client.put_object(Bucket=BUCKET, Key="k", Body=b"v")
            assert client.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"v"
    assert re.search(rf"port {taken} .* is not available|:{taken}: bind: address already in use",
                     server.log_path.read_text())


@integration
def test_manifest_and_pointers_hold_no_secrets(s3_env, runs):
    """Nothing fer writes to the bucket contains the credentials it used."""
    store = open_store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_env.endpoint_url)
    publish_run(make_run(runs, "run-a", accuracy=0.5), store)
    for key in ("runs/run-a/manifest.json", "latest.json", "champion.json"):
        data = store.get_bytes(key)
        assert s3_env.secret_key.encode() not in data
        assert s3_env.access_key.encode() not in data


@integration
def test_s3_store_is_the_s3_backend(s3_env):
    """s3:// URLs open an S3Store on the given bucket and prefix."""
    store = open_store(f"s3://{BUCKET}/a/b/", endpoint_url=s3_env.endpoint_url)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.location) == (BUCKET, "a/b", f"s3://{BUCKET}/a/b")


@integration
def test_large_artifact_uses_multipart_upload(s3_env, runs):
    """Files over 8 MiB go up as multipart uploads (their ETag carries a part count)."""
    store = open_store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_env.endpoint_url)
    publish_run(make_run(runs, "run-a", accuracy=0.5, big=True), store)
    head = s3_env.client().head_object(Bucket=BUCKET, Key=f"{store.prefix}/runs/run-a/model.keras")
    assert "-" in head["ETag"]
    assert head["ContentLength"] == BIG
    assert head["ContentType"] == "application/octet-stream"  # S3's own: binary/octet-stream


@integration
def test_published_objects_carry_their_content_type(s3_env, runs):
    """A browser opening a published plot or report through the S3 server (a MinIO console
    link, a presigned URL) shows it: every object had been stored as binary/octet-stream,
    which browsers download instead."""
    store = open_store(f"s3://{BUCKET}/types-{uuid.uuid4().hex[:8]}",
                       endpoint_url=s3_env.endpoint_url)
    publish_run(make_run(runs, "run-a", accuracy=0.5), store)
    client = s3_env.client()

    def stored_type(key: str) -> str:
        return client.head_object(Bucket=BUCKET, Key=f"{store.prefix}/{key}")["ContentType"]

    assert stored_type("runs/run-a/confusion_matrix.png") == "image/png"
    assert stored_type("runs/run-a/classification_report.txt") == "text/plain; charset=utf-8"
    assert stored_type("runs/run-a/history.csv") == "text/csv; charset=utf-8"
    assert stored_type("runs/run-a/model.keras") == "application/octet-stream"
    for pointer in ("runs/run-a/manifest.json", "latest.json", "champion.json"):
        assert stored_type(pointer) == "application/json", pointer


def test_an_endpoint_botocore_refuses_is_named_without_its_credentials(monkeypatch):
    """An endpoint given with its key (`http://key:secret@minio_1:9000`; botocore refuses
    the underscore) or beside an AWS_PROFILE that is no profile: the error had printed the
    URL with the secret in it, which every other message leaves out."""
    with pytest.raises(StorageError, match=r"Invalid endpoint: http://minio_1:9000") as raised:
        open_store("s3://bucket/prefix", endpoint_url="http://key:s3@cret@minio_1:9000")
    assert "cret" not in str(raised.value)
    assert raised.value.__cause__ is None  # a logged traceback would print the cause's text
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StorageError, match=r"for http://127.0.0.1:9 could not be") as raised:
        open_store("s3://bucket/prefix", endpoint_url="http://key:s3cret@127.0.0.1:9")
    assert "s3cret" not in str(raised.value)


def test_a_password_in_the_endpoint_stays_out_of_a_failures_traceback(monkeypatch):
    """botocore's own error names the endpoint as given (`Could not connect to the endpoint
    URL: "http://key:secret@...`), and a flow run logs a failed task's traceback, causes
    included, to its server: the cause is left off there, and kept for an endpoint
    without a password (its text helps whoever reads the log)."""
    import traceback

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    port, secret = free_port(), uuid.uuid4().hex  # nothing listens there; the traceback
    with pytest.raises(StorageError, match=rf"cannot reach S3 endpoint http://127.0.0.1:{port} "
                       ) as raised:  # quotes the lines that raised: a literal would be in it
        open_store("s3://bucket/prefix", endpoint_url=f"http://key:{secret}@127.0.0.1:{port}")
    assert secret not in "".join(traceback.format_exception(raised.value))
    with pytest.raises(StorageError) as raised:
        open_store("s3://bucket/prefix", endpoint_url=f"http://127.0.0.1:{port}")
    assert "Could not connect" in str(raised.value.__cause__)


@pytest.mark.parametrize("url", ["s3://AKIAKEY:s3cret@bucket/runs",
                                 "s3://AKIAKEY:s3/cret@bucket/runs",  # a secret with a `/`
                                 "s3://AKIAKEY:s3@cret@bucket/runs",  # with an `@`
                                 "s3://AKIAKEY:s3/c@cret@bucket/runs",  # with both
                                 "s3://cret@bucket/runs"])  # a user alone
def test_credentials_in_a_storage_url_are_refused_without_being_repeated(url):
    """`s3://KEY:SECRET@BUCKET/...` (Hadoop's form) was refused as a bad bucket name with
    the URL repeated, the secret in it, into a flow's log on its server."""
    with pytest.raises(StorageError, match=r"URL 's3://bucket/runs': credentials or a "
                                           r"user before the bucket .* AWS_ACCESS_KEY_ID"
                       ) as raised:
        open_store(url)
    assert "cret" not in str(raised.value)
    # an `@` in a key is no credentials: a bad bucket name is named as one
    with pytest.raises(StorageError, match=r"URL 's3://My_Bucket/runs@2024' has bucket name "
                                           r"'My_Bucket'; expected 3-63 lowercase"):
        open_store("s3://My_Bucket/runs@2024")


def test_an_ipv6_endpoint_is_printed_as_a_url(monkeypatch):
    """The endpoint the store's messages name: an IPv6 host keeps its brackets (it had been
    printed `http://::1:9000`, no URL at all)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    assert S3Store(BUCKET, endpoint_url="http://[::1]:9000").endpoint == "http://[::1]:9000"
    assert S3Store(BUCKET, endpoint_url="http://[::1]").endpoint == "http://[::1]"
    with pytest.raises(StorageError, match=r"AWS_ENDPOINT_URL\) \[::1\]: its port '9OOO'"):
        S3Store(BUCKET, endpoint_url="http://[::1]:9OOO")


@pytest.mark.parametrize("endpoint", ["http://localhost:9OOO", "http://127.0.0.1:90000"])
def test_an_endpoint_whose_port_is_not_a_port_is_one_error(endpoint):
    """botocore checks the endpoint's host only; its port was read later, a traceback."""
    with pytest.raises(StorageError, match=r"AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL\) .*: its "
                                           r"port '\w+' is not a "
                                           r"number from 0 to 65535"):
        open_store("s3://bucket/prefix", endpoint_url=endpoint)
