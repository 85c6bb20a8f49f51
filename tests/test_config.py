"""fer.config: settings from the environment."""

import dataclasses

import pytest

from fer.config import Settings
from fer.errors import FerError


def test_the_data_folder_is_resolved_when_it_is_asked_for(tmp_path):
    """A FER_DATA_DIR that cannot be expanded fails the command that reads data, when it
    asks for the folder, not every command that builds settings; the settings stay frozen
    and hashable, as a frozen dataclass's should."""
    settings = Settings.from_env({"FER_DATA_DIR": "~fer-no-such-user-4f2a/data",
                                  "FER_STORAGE": str(tmp_path)})
    assert settings.storage == str(tmp_path)
    with pytest.raises(FerError, match=r"FER_DATA_DIR '~fer-no-such-user-4f2a/data'"):
        _ = settings.data_dir
    assert hash(settings) == hash(Settings.from_env({"FER_DATA_DIR": "~fer-no-such-user-4f2a/data",
                                                     "FER_STORAGE": str(tmp_path)}))
    assert Settings.from_env({"XDG_CACHE_HOME": str(tmp_path)}).data_dir == tmp_path / "fer"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.storage = "elsewhere"  # what a command read stays what it checked


@pytest.mark.parametrize("value", ["", " ", "\t"])
def test_an_empty_fer_storage_reads_as_unset(value):
    """FER_STORAGE empty or of whitespace alone (a compose file's `FER_STORAGE: ${STORE}`
    with STORE unset or blank) is the default store, not a folder named " "."""
    from fer.config import DEFAULT_STORAGE

    assert Settings.from_env({"FER_STORAGE": value}).storage == DEFAULT_STORAGE


def test_a_relative_data_folder_is_made_absolute(tmp_path, monkeypatch, shaded_csv):
    """`FER_DATA_DIR=.cache/fer fer fetch-data` recorded the current dataset as a path
    relative to the folder it ran in: a command run from elsewhere with the same folder
    (named absolutely) found it gone, or read another file at that relative path."""
    from fer.fetch import current_source, fetch_data

    monkeypatch.chdir(tmp_path)
    data_dir = Settings.from_env({"FER_DATA_DIR": "cache"}).data_dir
    assert data_dir == tmp_path / "cache"
    fetch_data(str(shaded_csv), data_dir=data_dir)
    monkeypatch.chdir(tmp_path.parent)
    assert current_source(tmp_path / "cache").path.is_file()


@pytest.mark.parametrize("value", ["cache", " ", "./.cache"])
def test_a_relative_or_blank_xdg_cache_home_is_ignored(tmp_path, monkeypatch, value):
    """The XDG spec: a relative path there is invalid, to be ignored. Made absolute, it
    gave each folder a command ran in its own data cache (fetch-data in one, train in
    another found no dataset); a blank one named a folder " "."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({"XDG_CACHE_HOME": value}).data_dir == (
        tmp_path / "home" / ".cache" / "fer")


@pytest.mark.parametrize(("env", "endpoint"), [
    ({"AWS_ENDPOINT_URL": "http://localstack:4566"}, "http://localstack:4566"),
    ({"AWS_ENDPOINT_URL": "http://localstack:4566", "AWS_ENDPOINT_URL_S3": "http://minio:9000"},
     "http://minio:9000"),
    ({"AWS_ENDPOINT_URL": "http://localstack:4566", "AWS_ENDPOINT_URL_S3": "http://minio:9000",
      "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}, None),
])
def test_the_s3_endpoint_is_read_from_the_environment_as_boto3_reads_it(env, endpoint):
    """fer hands the endpoint to boto3 as the client's own, which wins over botocore's
    order: read as AWS_ENDPOINT_URL alone, a publish went to the endpoint given for every
    service rather than to AWS_ENDPOINT_URL_S3's, and the switch that turns both off was
    not heeded."""
    assert Settings.from_env(env).endpoint_url == endpoint


def test_a_blank_data_folder_variable_reads_as_unset(tmp_path):
    """`FER_DATA_DIR: ${X:- }` in a compose file: the data was cached in a folder named " "
    in the current folder; whitespace alone reads as unset, as for FER_STORAGE."""
    assert Settings.from_env({"FER_DATA_DIR": " ", "XDG_CACHE_HOME": str(tmp_path)}
                             ).data_dir == tmp_path / "fer"
