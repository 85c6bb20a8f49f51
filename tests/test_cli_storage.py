"""`fer publish` and `fer reports` as a user runs them, on a local folder and on real S3."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
import s3server
from run_folders import local_files, make_run
from s3server import BUCKET, free_port
from test_cli import assert_one_line_error, run_fer, usage_error

s3_server = s3server.s3_server


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage_env(request, tmp_path) -> dict[str, str]:
    """Environment for a `fer` subprocess: FER_STORAGE plus, for S3, endpoint and keys."""
    if request.param == "local":
        return {"FER_STORAGE": str(tmp_path / "artifacts")}
    server = request.getfixturevalue("s3_server")
    return server.env(storage=f"s3://{BUCKET}/{uuid.uuid4().hex}")


def test_resume_publish_of_a_run_that_finished_publishes_it(tmp_path, storage_env):
    """A run stopped while publishing (or a flow run that crashed after scoring) has
    finished training: `fer train --resume <it> --publish`, the command a stop names,
    publishes it instead of answering "nothing to resume". It reads no data, so a
    mistyped FER_DATA_DIR does not stop it."""
    run = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.70)
    result = run_fer("train", "--resume", run, "--publish",
                     env={**storage_env, "FER_DATA_DIR": "~fer-no-such-user-4f2a/data"})
    assert result.returncode == 0, result.stderr
    assert "finished training before it stopped; publishing it" in result.stderr
    assert f"published {run.name}" in result.stdout and "(new champion)" in result.stdout
    listing = run_fer("reports", "list", env=storage_env)
    assert listing.stdout.splitlines()[1].startswith(run.name)


def test_resume_publish_of_a_finished_run_needs_no_write_access_to_it(tmp_path, monkeypatch):
    """The command a failed publish names, `fer train --resume <run> --publish`, on a run
    folder this user may only read (the worker's): it publishes, as `fer publish` does; it
    was refused as "not writable by this user" before it looked. Tests run as root, whom
    no permission bit stops, so the folder's check is made to refuse it."""
    from typer.testing import CliRunner

    import fer_cli.main
    from fer.errors import FerError

    def read_only(folder, what):
        raise FerError(f"{what} {folder}: not writable by this user")

    monkeypatch.setattr(fer_cli.main, "check_writable", read_only)
    monkeypatch.setenv("FER_STORAGE", str(tmp_path / "artifacts"))
    run = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.70)
    result = CliRunner().invoke(fer_cli.main.app, ["train", "--resume", str(run), "--publish"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"published {run.name}" in result.output
    stopped = make_run(tmp_path / "runs", "20250101-000000-default-bbbb", accuracy=0.70)
    (stopped / "manifest.json").unlink()  # not finished: the resume trains, so it writes
    result = CliRunner().invoke(fer_cli.main.app, ["train", "--resume", str(stopped)])
    assert "not writable by this user" in str(result.exception)


def test_publish_list_show_get(tmp_path, storage_env):
    """Two runs published; list marks champion/latest; show and get return the right run."""
    good = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.70, minute=0,
                    val_accuracy=0.66)
    worse = make_run(tmp_path / "runs", "20250101-010000-default-bbbb", accuracy=0.60, minute=60)
    for run in (good, worse):
        published = run_fer("publish", run, env=storage_env)
        assert published.returncode == 0, published.stderr
        assert f"published {run.name}" in published.stdout

    listing = run_fer("reports", "list", env=storage_env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[1].startswith(worse.name) and lines[1].rstrip().endswith("latest")
    assert lines[2].startswith(good.name) and "0.7000" in lines[2] and "champion" in lines[2]
    assert "val acc" in lines[0] and "0.6600" in lines[2]  # the figure the champion is chosen on
    records = json.loads(run_fer("reports", "list", "--json", env=storage_env).stdout)
    assert [r["run_id"] for r in records] == [worse.name, good.name]
    assert records[1]["val_accuracy"] == 0.66

    champion = run_fer("reports", "show", "champion", env=storage_env)
    assert champion.returncode == 0 and f"report of {good.name}" in champion.stdout
    latest = run_fer("reports", "show", "latest", env=storage_env)
    assert f"report of {worse.name}" in latest.stdout and "test accuracy 0.6000" in latest.stdout

    fetched = run_fer("reports", "get", good.name, "--dest", tmp_path / "down", env=storage_env)
    assert fetched.returncode == 0, fetched.stderr
    assert local_files(tmp_path / "down" / good.name) == local_files(good)


def test_a_download_that_cannot_be_written_blames_the_destination(tmp_path, storage_env):
    """`fer reports get` into a destination that cannot take a file (full, read-only; here
    a folder holds the file's final name, so the downloaded copy cannot be put in place):
    one line naming the file and --dest, from either kind of store, and no partial copy
    left. (A download that cannot write its partial copy: test_storage.)"""
    run = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.70)
    assert run_fer("publish", run, env=storage_env).returncode == 0
    (tmp_path / "down" / run.name / "model.keras").mkdir(parents=True)
    assert_one_line_error(run_fer("reports", "get", run.name, "--dest", tmp_path / "down",
                                  env=storage_env),
                          r"cannot write .*model\.keras: .*; check --dest, its "
                          r"permissions and free space")
    assert not list((tmp_path / "down").rglob("*.part"))  # the downloaded copy is removed


def test_reports_get_dest_with_a_tilde_is_the_home_folder(tmp_path, storage_env):
    """`--dest=~/models`, which the shell leaves as it is, lands in the home folder, not in a
    folder named ~ under the current one."""
    run = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.70)
    assert run_fer("publish", run, env=storage_env).returncode == 0
    (tmp_path / "cwd").mkdir()
    got = run_fer("reports", "get", "latest", "--dest=~/models",
                  env={**storage_env, "HOME": str(tmp_path)}, cwd=tmp_path / "cwd")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "models" / run.name / "model.keras").is_file()
    assert not (tmp_path / "cwd" / "~").exists()


def test_publish_force_champion_makes_a_worse_run_the_champion(tmp_path, storage_env):
    """`fer publish --force-champion` as a user types it: the worse run takes the champion,
    which it does not without the option."""
    good = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.70, minute=0)
    worse = make_run(tmp_path / "runs", "20250101-010000-default-bbbb", accuracy=0.60, minute=60)
    assert run_fer("publish", good, env=storage_env).returncode == 0
    plain = run_fer("publish", worse, env=storage_env)
    assert plain.returncode == 0 and "new champion" not in plain.stdout
    assert f"report of {good.name}" in run_fer("reports", "show", "champion",
                                               env=storage_env).stdout
    forced = run_fer("publish", worse, "--force-champion", env=storage_env)
    assert forced.returncode == 0 and "(new champion)" in forced.stdout
    assert f"report of {worse.name}" in run_fer("reports", "show", "champion",
                                                env=storage_env).stdout


def test_without_any_storage_setting_runs_are_published_to_artifacts(tmp_path):
    """README: with no configuration, runs go to ./artifacts (under the current folder)."""
    run = make_run(tmp_path / "runs", "20250101-000000-default-aaaa", accuracy=0.70)
    env = {"FER_STORAGE": "", "AWS_ENDPOINT_URL": ""}
    published = run_fer("publish", run, env=env, cwd=tmp_path)
    assert published.returncode == 0, published.stderr
    assert (tmp_path / "artifacts" / "runs" / run.name / "manifest.json").is_file()
    assert (tmp_path / "artifacts" / "latest.json").is_file()


def test_missing_run_is_one_line_error(tmp_path, storage_env):
    assert_one_line_error(run_fer("reports", "show", "no-such-run", env=storage_env),
                          r"run 'no-such-run' not found in .*; list the published runs")


def test_empty_store_lists_nothing_and_says_where_it_looked(storage_env):
    """A mistyped --storage folder is an empty store: the line names it, so the typo shows."""
    listing = run_fer("reports", "list", env=storage_env)
    assert listing.returncode == 0
    assert listing.stdout.strip() == f"no published runs in {storage_env['FER_STORAGE']}"


@pytest.mark.integration
def test_wrong_credentials_fail_fast_without_leaking_the_secret(tmp_path, s3_server):
    """A wrong secret key: one line, exit 1, in bounded time, and the secret is never printed."""
    env = s3_server.env(storage=f"s3://{BUCKET}/x")
    env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-Zq81"
    run = make_run(tmp_path / "runs", "20250101-000000-default-cccc", accuracy=0.5)
    started = time.monotonic()
    result = run_fer("publish", run, env=env)
    assert time.monotonic() - started < 60
    assert_one_line_error(result, r"denied|credentials|signature")
    assert "wrong-secret-Zq81" not in result.stdout + result.stderr


@pytest.mark.integration
def test_dead_endpoint_is_one_line_error(tmp_path, s3_server):
    env = {**s3_server.env(storage=f"s3://{BUCKET}/x"),
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    result = run_fer("reports", "list", env=env)
    assert time.monotonic() - started < 60
    assert_one_line_error(result, r"cannot reach S3 endpoint")
    assert s3_server.secret_key not in result.stdout + result.stderr


@pytest.mark.integration
def test_missing_bucket_needs_create_bucket(tmp_path, s3_server):
    """A missing bucket is named with the fix; --create-bucket creates it and publishes."""
    bucket = f"fer-new-{uuid.uuid4().hex[:8]}"
    env = s3_server.env(storage=f"s3://{bucket}/team")
    run = make_run(tmp_path / "runs", "20250101-000000-default-dddd", accuracy=0.5)
    assert_one_line_error(run_fer("publish", run, env=env),
                          rf"bucket '{bucket}' does not exist .*--create-bucket")
    created = run_fer("publish", run, "--create-bucket", env=env)
    assert created.returncode == 0, created.stderr


@pytest.mark.integration
def test_fetch_data_from_s3(tmp_path, s3_server, fer_subset):
    """`fer fetch-data --source s3://bucket/key` downloads through the S3 endpoint and unpacks."""
    key = f"datasets/{uuid.uuid4().hex}/fer2013-subset.zip"
    s3_server.client().upload_file(str(fer_subset), BUCKET, key)
    env = {**s3_server.env(), "FER_DATA_DIR": str(tmp_path / "data")}
    fetched = run_fer("fetch-data", "--source", f"s3://{BUCKET}/{key}", env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert "dataset ready" in fetched.stdout
    assert list((tmp_path / "data" / "sources").glob("*/test/happy/*.jpg"))
    missing = run_fer("fetch-data", "--source", f"s3://{BUCKET}/nope.zip", env=env)
    assert_one_line_error(missing, rf"s3://{BUCKET}/nope\.zip: no such object at ")


@pytest.mark.integration
def test_an_s3_key_is_taken_literally(tmp_path, s3_server, shaded_csv):
    """'#' and '?' are characters of S3 keys, as the AWS CLI takes them, not a URL's
    fragment and query; a source naming no object says so."""
    key = f"datasets/{uuid.uuid4().hex}/release?v=2#final/fer#2013.csv"
    s3_server.client().upload_file(str(shaded_csv), BUCKET, key)
    env = {**s3_server.env(), "FER_DATA_DIR": str(tmp_path / "data")}
    fetched = run_fer("fetch-data", "--source", f"s3://{BUCKET}/{key}", env=env)
    assert fetched.returncode == 0, fetched.stderr  # a parsed URL asked for .../release
    names = [path.name for path in (tmp_path / "data" / "downloads").iterdir()]
    assert any(name.endswith("-fer#2013.csv") for name in names), names
    for source in (f"s3://{BUCKET}", f"s3://{BUCKET}/", f"s3://{BUCKET}/datasets/"):
        assert_one_line_error(run_fer("fetch-data", "--source", source, env=env),
                              rf"{re.escape(source)}: names no object; expected s3://BUCKET/KEY")


@pytest.mark.parametrize("digest", ["ab12", "sha256:" + "g" * 64, "0" * 63])
def test_a_malformed_sha256_is_refused_before_any_download(tmp_path, digest):
    """A malformed --sha256 failed only after the download, which it then deleted as
    corrupt; now a usage error before it (a 'sha256:' prefix and capitals are accepted)."""
    result = run_fer("fetch-data", "--source", "http://127.0.0.1:9/x.zip", "--sha256", digest,
                     env={"FER_DATA_DIR": str(tmp_path / "data")})
    assert "expected 64 hexadecimal digits" in usage_error(result)
    assert not (tmp_path / "data").exists()


def test_a_pointer_naming_a_path_outside_the_store_is_refused(tmp_path):
    """A champion.json whose run_id climbs out of the store ('../..') is refused by name
    instead of read from, and downloaded to, folders outside the store and --dest."""
    store = tmp_path / "artifacts"
    store.mkdir()
    (store / "champion.json").write_text(json.dumps({"run_id": "../../outside"}))
    env = {"FER_STORAGE": str(store)}
    for command in (["reports", "show", "champion"],
                    ["reports", "get", "champion", "--dest", tmp_path / "down"]):
        assert_one_line_error(run_fer(*command, env=env),
                              r"champion\.json: run_id '\.\./\.\./outside' is not a valid run id")
    assert not (tmp_path / "down").exists()
    listing = run_fer("reports", "list", env=env)  # a listing warns and still lists
    assert listing.returncode == 0 and "not a valid run id" in listing.stderr
    # publishing replaces it, saying so (refusing it had blocked every publish for good)
    published = run_fer("publish", make_run(tmp_path / "runs", "20250101-000000-default-aaaa",
                                            accuracy=0.7), env=env)
    assert published.returncode == 0, published.stderr
    assert re.search(r"champion\.json: run_id '\.\./\.\./outside' is not a valid run id.*"
                     r"replacing it", published.stderr)
    assert json.loads((store / "champion.json").read_text())["run_id"] == (
        "20250101-000000-default-aaaa")
    assert not (tmp_path / "outside").exists()


@pytest.mark.integration
def test_evaluate_reads_s3_data_through_its_endpoint_option(tmp_path, s3_server, shaded_csv):
    """`fer evaluate --data s3://... --endpoint-url URL`, as train and fetch-data take it
    (MinIO users have no AWS_ENDPOINT_URL set): the data is fetched from that endpoint and
    the model (an untrained default) scored on it."""
    from fer.models import get_spec

    key = f"datasets/{uuid.uuid4().hex}/fer2013.csv"
    s3_server.client().upload_file(str(shaded_csv), BUCKET, key)
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": ""}  # none set: boto3 would ask AWS
    get_spec("default").build().save(tmp_path / "model.keras")
    evaluated = run_fer("evaluate", "--model", tmp_path / "model.keras",
                        "--data", f"s3://{BUCKET}/{key}",
                        "--endpoint-url", s3_server.env()["AWS_ENDPOINT_URL"],
                        env={**env, "FER_DATA_DIR": str(tmp_path / "data")})
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("test accuracy ") and " on 21 images" in evaluated.stdout
    assert [p.name.endswith("fer2013.csv") for p in (tmp_path / "data" / "sources").glob("*/*")] == [True]


@pytest.mark.integration
def test_a_replaced_s3_object_is_fetched_again(tmp_path, s3_server, shaded_csv):
    """The same s3:// source, its object replaced (a new release under the same key): the
    next fetch downloads it (the ETag changed) instead of reusing the first copy."""
    key = f"datasets/{uuid.uuid4().hex}/fer2013.csv"
    client = s3_server.client()
    client.upload_file(str(shaded_csv), BUCKET, key)
    env = {**s3_server.env(), "FER_DATA_DIR": str(tmp_path / "data")}
    first = run_fer("fetch-data", "--source", f"s3://{BUCKET}/{key}", env=env)
    again = run_fer("fetch-data", "--source", f"s3://{BUCKET}/{key}", env=env)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout  # unchanged object: the same data
    client.put_object(Bucket=BUCKET, Key=key,
                      Body=shaded_csv.read_text().replace("\n3,", "\n4,", 1).encode())
    replaced = run_fer("fetch-data", "--source", f"s3://{BUCKET}/{key}", env=env)
    assert replaced.returncode == 0, replaced.stderr
    sha = re.compile(r"sha256: ([0-9a-f]{64})")
    assert sha.search(replaced.stdout)[1] != sha.search(first.stdout)[1]
    client.delete_object(Bucket=BUCKET, Key=key)  # a lifecycle rule, say: the copy still serves
    removed = run_fer("fetch-data", "--source", f"s3://{BUCKET}/{key}", env=env)
    assert removed.returncode == 0, removed.stderr
    assert sha.search(removed.stdout)[1] == sha.search(replaced.stdout)[1]
    assert "no such object" in removed.stderr and "using the copy fetched before" in removed.stderr


def test_the_listing_keeps_its_columns_for_long_run_ids(tmp_path):
    """Run ids are the model's name and 21 characters: `default-full-res-single`'s are 44,
    and had pushed their rows past the header's fixed 36-character column."""
    store = {"FER_STORAGE": str(tmp_path / "store")}
    for run_id, minute in (("20250101-000000-default-full-res-single-aaaa", 0),
                           ("20250101-010000-default-bbbb", 60)):
        run = make_run(tmp_path / "runs", run_id, accuracy=0.6, minute=minute)
        assert run_fer("publish", run, env=store).returncode == 0
    lines = run_fer("reports", "list", env=store).stdout.splitlines()
    assert len(lines) == 3
    assert {line.index("2025-01-01") for line in lines[1:]} == {lines[0].index("created")}
