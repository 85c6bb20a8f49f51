"""fer.runs: publishing run folders to a local folder and to a real S3 server (SeaweedFS),
and reading them back: pointers, listing, reports, verified downloads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import run_folders
import s3server
from run_folders import BIG, CrashAfterUploads, local_files, make_run, pointers

from fer.errors import FerError, StorageError
from fer.runs import (
    WRITE_CHECK,
    check_can_publish,
    download_run,
    list_runs,
    publish_run,
    read_report,
    resolve_run,
)
from fer.storage import LocalStore, open_store

# The real S3 server fixtures (assigned, not imported, so test arguments may shadow them).
s3_server = s3server.s3_server
s3_env = s3server.s3_env
store = run_folders.store  # an empty store of each backend
integration = pytest.mark.integration


# --- round trip -----------------------------------------------------------------------------


def test_publish_then_read_back_byte_identical(store, runs, tmp_path):
    """Every artifact, the >8 MiB model included, comes back byte for byte."""
    folder = make_run(runs, "run-a", accuracy=0.61, big=True)
    result = publish_run(folder, store)
    assert (result.run_id, result.became_champion) == ("run-a", True)
    assert result.location == store.url("runs/run-a/")

    [summary] = list_runs(store)
    assert (summary.run_id, summary.model, summary.epochs) == ("run-a", "default", 2)
    assert (summary.accuracy, summary.is_champion, summary.is_latest) == (0.61, True, True)

    report = read_report(store, "run-a")
    assert report.text == (folder / "classification_report.txt").read_text()
    assert report.metrics["macro_f1"] == pytest.approx(0.51)

    got = download_run(store, "latest", dest=tmp_path / "download")
    assert got == tmp_path / "download" / "run-a"
    assert local_files(got) == local_files(folder)
    assert len(local_files(got)["model.keras"]) == BIG


def test_remote_manifest_adds_files_and_metrics(store, runs):
    """The remote manifest is the local one plus sizes, hashes and metrics of every artifact."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    publish_run(folder, store)
    manifest = resolve_run(store, "run-a").manifest
    local = json.loads((folder / "manifest.json").read_text())
    assert {k: manifest[k] for k in local} == local
    assert manifest["metrics"] == json.loads((folder / "metrics.json").read_text())
    assert manifest["files"] == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in local_files(folder).items()}


# --- pointers -------------------------------------------------------------------------------


def test_champion_moves_only_for_better_or_equal_run(store, runs):
    """latest always moves to the newest run; champion only for validation accuracy >= the
    champion's."""
    assert publish_run(make_run(runs, "r1", accuracy=0.60, minute=1), store).became_champion
    worse = publish_run(make_run(runs, "r2", accuracy=0.55, minute=2), store)
    assert not worse.became_champion
    assert worse.champion_note == (" (not champion: validation accuracy 0.5500, under the "
                                   "champion r1's 0.6000; --force-champion makes it the champion)")
    assert pointers(store) == ("r2", "r1")
    assert publish_run(make_run(runs, "r3", accuracy=0.60, minute=3), store).became_champion
    assert pointers(store) == ("r3", "r3")
    flags = {s.run_id: (s.is_latest, s.is_champion) for s in list_runs(store)}
    assert flags == {"r3": (True, True), "r2": (False, False), "r1": (False, False)}


def test_champion_is_chosen_on_validation_never_on_test(store, runs):
    """A run that scores higher on test but lower on validation does not become the champion."""
    publish_run(make_run(runs, "r1", accuracy=0.50, val_accuracy=0.60, minute=1), store)
    lucky = make_run(runs, "r2", accuracy=0.70, val_accuracy=0.59, minute=2)
    assert not publish_run(lucky, store).became_champion
    assert pointers(store) == ("r2", "r1")


def test_champion_is_chosen_on_the_saved_models_validation_accuracy(store, runs):
    """The saved model is the best epoch's recalibrated (or averaged) one: its own validation
    accuracy decides, also for runs of an older fer that recorded it only inside the
    recalibration record."""
    def with_metrics(folder, **metrics):
        path = folder / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **metrics}))
        return folder

    publish_run(make_run(runs, "r1", accuracy=0.5, val_accuracy=0.642, minute=1), store)
    recalibrated = with_metrics(  # an older fer's run: best epoch 0.640, saved model 0.650
        make_run(runs, "r2", accuracy=0.5, val_accuracy=0.640, minute=2),
        batch_norm_recalibration={"kept": True, "val_accuracy_before": 0.640,
                                  "val_accuracy_after": 0.650, "seconds": 1.0})
    assert publish_run(recalibrated, store).became_champion
    not_kept = with_metrics(
        make_run(runs, "r3", accuracy=0.5, val_accuracy=0.645, minute=3),
        batch_norm_recalibration={"kept": False, "val_accuracy_before": 0.645,
                                  "val_accuracy_after": 0.655, "seconds": 1.0})
    assert not publish_run(not_kept, store).became_champion  # its saved model is the 0.645 one
    measured = with_metrics(make_run(runs, "r4", accuracy=0.5, val_accuracy=0.640, minute=4),
                            saved_model_val_accuracy=0.651)
    assert publish_run(measured, store).became_champion
    assert pointers(store) == ("r4", "r4")


def test_an_older_champion_pointer_is_compared_on_its_saved_models_figure(store, runs):
    """A champion.json of an older fer holds its run's best-epoch validation accuracy, not
    its saved (recalibrated) model's: it is read again from the run's manifest, so a run
    better than the best epoch but worse than the saved model does not take over."""
    old = make_run(runs, "old", accuracy=0.5, val_accuracy=0.640, minute=1)
    metrics = json.loads((old / "metrics.json").read_text())
    (old / "metrics.json").write_text(json.dumps({**metrics, "batch_norm_recalibration": {
        "kept": True, "val_accuracy_before": 0.640, "val_accuracy_after": 0.650, "seconds": 1}}))
    publish_run(old, store)
    record = json.loads(store.get_bytes("champion.json"))
    record.pop("format", None)  # as an older fer wrote it
    store.put_bytes("champion.json", json.dumps({**record, "val_accuracy": 0.640}).encode())
    assert not publish_run(make_run(runs, "new", accuracy=0.7, val_accuracy=0.645, minute=2),
                           store).became_champion
    assert pointers(store) == ("new", "old")


def test_champion_compares_only_runs_on_the_same_data(store, runs):
    """A run on other data (a subset, a new release) cannot unseat the champion by itself;
    publishing says why, and what overrides it (it had said nothing)."""
    publish_run(make_run(runs, "full", accuracy=0.60, minute=1), store)
    subset = make_run(runs, "subset", accuracy=0.90, minute=2, data_sha256="1" * 64)
    result = publish_run(subset, store)
    assert not result.became_champion
    assert result.champion_note == (" (not champion: trained on another data than the champion "
                                    "full; --force-champion makes it the champion)")
    assert pointers(store) == ("subset", "full")
    small = make_run(runs, "small-validation", accuracy=0.90, minute=3,
                     validation="carved from train (0.01, seed 1337)")
    result = publish_run(small, store)
    assert not result.became_champion  # 1% of train: other, noisier images
    assert "trained on another validation split than the champion full" in result.champion_note
    assert pointers(store) == ("small-validation", "full")


def test_a_champion_that_records_no_data_is_named_as_such(store, runs):
    """A champion whose manifest records no data sha256 (hand-made, or older) is kept, and
    the note says it cannot be compared, not that the new run's data is another."""
    publish_run(make_run(runs, "r1", accuracy=0.50, minute=1, data_sha256=None), store)
    result = publish_run(make_run(runs, "r2", accuracy=0.60, minute=2), store)
    assert not result.became_champion
    assert "(not champion: the champion r1 records no data to compare with;" in (
        result.champion_note)


def test_unknowns_never_win_the_champion(store, runs):
    """A run whose data or validation figure is not recorded cannot take the champion, even
    with a higher test accuracy; a champion whose validation figure is not recorded loses
    to a run whose figure is."""
    publish_run(make_run(runs, "r1", accuracy=0.60, minute=1), store)
    result = publish_run(make_run(runs, "r2", accuracy=0.90, minute=2, data_sha256=None), store)
    assert not result.became_champion
    assert "(not champion: its data is not recorded;" in result.champion_note
    unmeasured = make_run(runs, "r3", accuracy=0.90, minute=3)
    metrics = json.loads((unmeasured / "metrics.json").read_text())
    del metrics["best_val_accuracy"]
    (unmeasured / "metrics.json").write_text(json.dumps(metrics))
    result = publish_run(unmeasured, store)
    assert not result.became_champion
    assert "(not champion: its validation accuracy is not recorded;" in result.champion_note
    assert pointers(store) == ("r3", "r1")
    record = json.loads(store.get_bytes("champion.json"))
    store.put_bytes("champion.json", json.dumps({**record, "val_accuracy": None}).encode())
    assert publish_run(make_run(runs, "r4", accuracy=0.30, minute=4), store).became_champion
    assert pointers(store) == ("r4", "r4")


def test_artifacts_listed_outside_the_run_folder_are_refused(tmp_path, runs):
    folder = make_run(runs, "run-a", accuracy=0.5)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "artifacts": ["../x"]}))
    with pytest.raises(FerError, match=r"artifacts \['\.\./x'\] point outside the run folder"):
        publish_run(folder, LocalStore(tmp_path / "artifacts"))


def test_champion_pointer_from_before_validation_accuracy_is_read_from_its_manifest(store, runs):
    """A champion.json without val_accuracy (older fer) is compared through its run's manifest."""
    publish_run(make_run(runs, "old", accuracy=0.50, val_accuracy=0.65, minute=1), store)
    record = json.loads(store.get_bytes("champion.json"))
    del record["val_accuracy"], record["data_sha256"], record["validation"]
    record.pop("format", None)
    store.put_bytes("champion.json", json.dumps(record).encode())
    assert not publish_run(make_run(runs, "new", accuracy=0.70, val_accuracy=0.64, minute=2),
                           store).became_champion
    assert publish_run(make_run(runs, "newer", accuracy=0.40, val_accuracy=0.66, minute=3),
                       store).became_champion


def test_pointers_to_a_run_gone_from_the_store_are_replaced_and_named(store, runs):
    """A champion whose run was removed from the store (by hand, by a retention rule) no
    longer blocks every lower-scoring run for ever: the next run published takes it, and
    `latest` too, though older; until then the readers say which run the pointer names."""
    publish_run(make_run(runs, "gone", accuracy=0.70, val_accuracy=0.70, minute=2), store)
    _remove_manifest(store, "gone")  # what makes a run published: without it, it is gone
    with pytest.raises(StorageError, match=r"'champion' names run 'gone', which is no longer "
                                           r"in .*; publishing a run moves 'champion' to it"):
        resolve_run(store, "champion")
    result = publish_run(make_run(runs, "kept", accuracy=0.60, val_accuracy=0.60, minute=1),
                         store)
    assert result.became_champion
    assert pointers(store) == ("kept", "kept")
    assert resolve_run(store, "champion").run_id == "kept"


def test_training_into_a_folder_stores_runs_is_refused_before_it(tmp_path, monkeypatch):
    """Run folders trained in the store's runs/ (however the path is spelled, a link to it
    included) cannot be published there; beside it they can."""
    store = open_store(str(tmp_path / "artifacts"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "runs").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "artifacts" / "runs")
    for out in (tmp_path / "artifacts" / "runs", Path("artifacts/runs"),
                tmp_path / "artifacts" / "x" / ".." / "runs", tmp_path / "linked"):
        with pytest.raises(StorageError, match=r"keeps its published runs"):
            check_can_publish(store, out_dir=out)
    check_can_publish(store, out_dir=tmp_path / "runs")
    check_can_publish(store, out_dir=tmp_path / "artifacts")  # run folders beside runs/


def test_a_champion_whose_manifest_is_not_fers_is_compared_not_replaced(store, runs, caplog):
    """The champion's run has a manifest that is not a published run's (overwritten by
    hand): the run is not gone, so a lower-scoring run does not take the champion on no
    comparison; a warning names the manifest."""
    publish_run(make_run(runs, "good", accuracy=0.70, val_accuracy=0.70, minute=1), store)
    store.put_bytes("runs/good/manifest.json", b"{}")
    with caplog.at_level("WARNING", logger="fer.runs"):
        result = publish_run(make_run(runs, "worse", accuracy=0.6, val_accuracy=0.6, minute=2),
                             store)
    assert not result.became_champion
    assert "is not the manifest of a published run" in caplog.text
    assert json.loads(store.get_bytes("champion.json"))["run_id"] == "good"


def test_an_older_champion_whose_manifest_is_not_fers_is_compared_not_replaced(store, runs,
                                                                              caplog):
    """The same for a pointer of an older fer (no format: rebuilt from its run's manifest):
    a manifest that is not a published run's is warned about and the pointer compared as it
    is; a worse run had taken the champion from it on no comparison."""
    publish_run(make_run(runs, "good", accuracy=0.70, val_accuracy=0.70, minute=1), store)
    record = json.loads(store.get_bytes("champion.json"))
    del record["format"]
    store.put_bytes("champion.json", json.dumps(record).encode())
    store.put_bytes("runs/good/manifest.json", b"{}")
    with caplog.at_level("WARNING", logger="fer.runs"):
        worse = publish_run(make_run(runs, "worse", accuracy=0.6, val_accuracy=0.6, minute=2),
                            store)
    assert not worse.became_champion
    assert "comparing with" in caplog.text and "champion.json as it is" in caplog.text
    assert json.loads(store.get_bytes("champion.json"))["run_id"] == "good"
    # it is compared, not frozen: a better run still takes it
    assert publish_run(make_run(runs, "better", accuracy=0.8, val_accuracy=0.8, minute=3),
                       store).became_champion


@pytest.mark.parametrize("field, value", [("data", "fer2013.csv"), ("parameters", [])])
def test_a_run_whose_manifest_fields_are_not_objects_is_refused_before_uploading(
        store, runs, field, value):
    """A local manifest whose data or parameters is not an object (edited by hand) is named
    before anything is uploaded: its files had gone up, then the pointer record raised an
    AttributeError and the run stayed in the store unreadable, or it became a champion that
    `fer reports show` could not read."""
    folder = make_run(runs, "odd", accuracy=0.5)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[field] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FerError, match=rf"odd/manifest\.json: {field} .* must be a JSON object"):
        publish_run(folder, store)
    assert list_runs(store) == []
    assert store.get_bytes("runs/odd/model.keras") is None


def _remove_manifest(store, run_id: str) -> None:
    key = f"runs/{run_id}/manifest.json"
    if isinstance(store, LocalStore):
        (store.root / key).unlink()
    else:  # fer itself never deletes: boto3's client, as a retention rule would
        store._client.delete_object(Bucket=store.bucket, Key=store._key(key))


def test_force_champion_overrides_accuracy(store, runs):
    """force_champion makes a worse run the champion."""
    publish_run(make_run(runs, "good", accuracy=0.9, minute=1), store)
    worse = make_run(runs, "worse", accuracy=0.1, minute=2)
    result = publish_run(worse, store, force_champion=True)
    assert result.became_champion
    assert pointers(store) == ("worse", "worse")


def test_list_is_newest_first(store, runs):
    """list_runs orders by creation time, newest first, whatever the publish order."""
    publish_run(make_run(runs, "middle", accuracy=0.5, minute=2), store)
    publish_run(make_run(runs, "newest", accuracy=0.5, minute=3), store)
    publish_run(make_run(runs, "oldest", accuracy=0.5, minute=1), store)
    assert [s.run_id for s in list_runs(store)] == ["newest", "middle", "oldest"]
    assert resolve_run(store, "latest").run_id == "newest"


# --- idempotence and incomplete runs --------------------------------------------------------


def test_publish_twice_is_harmless(store, runs):
    """Publishing the same run again changes nothing and succeeds; it does not claim to make
    the run the champion it already is, and says that it is one (a Prefect retry of publish
    whose first attempt moved the pointer and lost the answer had reported a run that is
    the champion as not one)."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    first = publish_run(folder, store)
    manifest = resolve_run(store, "run-a").manifest
    again = publish_run(folder, store)
    assert (again.run_id, again.location, again.became_champion, again.is_champion) == (
        first.run_id, first.location, False, True)
    assert first.became_champion and first.is_champion
    assert (first.champion_note, again.champion_note) == (" (new champion)",
                                                          " (the champion already)")
    assert resolve_run(store, "run-a").manifest == manifest
    assert [s.run_id for s in list_runs(store)] == ["run-a"]
    worse = publish_run(make_run(runs, "run-b", accuracy=0.4, minute=1), store)
    assert (worse.became_champion, worse.is_champion) == (False, False)
    assert worse.champion_note.startswith(" (not champion: validation accuracy 0.4000, under ")


def test_publishing_again_restores_files_lost_or_damaged_in_the_store(store, runs, tmp_path):
    """`fer reports` tells a user whose published file is damaged to publish the run again;
    a repeat had only moved the pointers (the manifest was there), so the advice could never
    work. Now it uploads the run's files again, the same bytes the manifest lists."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    publish_run(folder, store)
    manifest = resolve_run(store, "run-a").manifest
    store.put_bytes("runs/run-a/history.csv", b"cut short by a bucket copy\n")
    store.put_bytes("runs/run-a/classification_report.txt", b"")
    if isinstance(store, LocalStore):  # a folder store lets the test delete one outright
        (store.root / "runs" / "run-a" / "model.keras").unlink()
    with pytest.raises(StorageError, match="publish the run again"):
        download_run(store, "run-a", dest=tmp_path / "before")

    publish_run(folder, store)

    assert local_files(download_run(store, "run-a", dest=tmp_path / "after")) == local_files(folder)
    assert read_report(store, "run-a").text == (folder / "classification_report.txt").read_text()
    assert resolve_run(store, "run-a").manifest == manifest


def test_publishing_an_older_run_again_does_not_take_a_tie_back(store, runs):
    """Two runs with equal validation accuracy (deterministic training often gives the same
    figure): the newer is the champion however often, and in whatever order, either is
    published (a tie had gone to whichever was published last)."""
    older = make_run(runs, "r1", accuracy=0.60, minute=1)
    newer = make_run(runs, "r2", accuracy=0.60, minute=2)
    assert publish_run(newer, store).became_champion
    tied = publish_run(older, store)
    assert not tied.became_champion
    assert ("(not champion: validation accuracy 0.6000, tied with the champion r2, which is "
            "the later run;") in tied.champion_note
    assert pointers(store) == ("r2", "r2")
    again = publish_run(newer, store)
    assert not again.became_champion and again.champion_note == " (the champion already)"
    assert not publish_run(older, store).became_champion
    assert pointers(store) == ("r2", "r2")


@pytest.mark.parametrize("order", [("r1", "r2"), ("r2", "r1")])
def test_runs_created_in_one_second_point_the_same_way_whatever_the_order(store, runs, order):
    """Manifests record seconds: two runs with equal validation accuracy created in the same
    second (a sweep) leave latest and champion on the later-started one (its id sorts
    after) in either publishing order, as the listing orders them (latest went to
    whichever was published last, the champion to whichever first)."""
    folders = {run_id: make_run(runs, run_id, accuracy=0.60, minute=1) for run_id in order}
    for run_id in order:
        publish_run(folders[run_id], store)
    assert pointers(store) == ("r2", "r2")
    assert [s.run_id for s in list_runs(store)] == ["r2", "r1"]


def test_a_run_without_an_artifact_list_publishes_what_training_wrote(store, runs):
    """A run of a fer before the manifest's artifact list: `fer evaluate`'s evaluation/ and
    hidden files added to its folder since stay local, as the list would keep them, and so
    does a file whose name is not UTF-8 (no fer wrote it; an S3 key cannot hold it)."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    trained = set(local_files(folder))
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "metrics.json").write_text("{}")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "model.keras.part").write_bytes(b"\0")
    (folder / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"\0")  # Latin-1 bytes: no S3 key
    publish_run(folder, store)
    assert set(resolve_run(store, "run-a").manifest["files"]) == trained


def test_a_run_an_older_fer_published_whole_is_published_again_as_it_was(store, runs,
                                                                         monkeypatch, tmp_path):
    """An older fer published every file of a run without an artifact list, evaluation/
    included: publishing it again stays harmless (it was refused as other files), and a
    downloaded copy published elsewhere keeps those files."""
    import fer.runs

    folder = make_run(runs, "run-a", accuracy=0.5)
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "metrics.json").write_text("{}")
    with monkeypatch.context() as older_fer:
        older_fer.setattr(fer.runs, "_added_later", lambda name: False)
        publish_run(folder, store)
    published = set(resolve_run(store, "run-a").manifest["files"])
    assert "evaluation/metrics.json" in published
    publish_run(folder, store)  # again, by this fer
    copy = download_run(store, "run-a", dest=tmp_path / "copy")
    elsewhere = open_store(str(tmp_path / "elsewhere"))
    publish_run(copy, elsewhere)
    assert set(resolve_run(elsewhere, "run-a").manifest["files"]) == published


class StoreAround:
    """A store that answers as ``inner`` does, but for what a subclass changes; its reads of
    whole objects go through get_versioned, so a subclass changes both by changing that."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def get_versioned(self, key):
        return self.inner.get_versioned(key)

    def get_bytes(self, key):
        return self.get_versioned(key)[0]

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ReadBeforeTheOtherWrote(StoreAround):
    """A store whose first read of a run's manifest answers what it held before another
    publisher of that run id wrote its own: nothing."""

    read = False

    def get_versioned(self, key):
        if key.endswith("/manifest.json") and not self.read:
            self.read = True
            return None, None
        return self.inner.get_versioned(key)


def test_two_publishers_of_one_run_id_at_once_are_told_apart(store, runs):
    """Two publishers of one run id that both read its manifest as missing: the second's
    manifest had overwritten the first's, over files mixed from both, without a word. A
    second publisher of the same folder (a flow's retry beside `fer publish`) goes on."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    publish_run(folder, store)
    assert publish_run(folder, ReadBeforeTheOtherWrote(store)).run_id == "run-a"
    other = make_run(runs / "elsewhere", "run-a", accuracy=0.6)
    with pytest.raises(StorageError, match=r"run 'run-a' was published at .* meanwhile, by "
                                           r"another publisher, with other files"):
        publish_run(other, ReadBeforeTheOtherWrote(store))
    assert resolve_run(store, "run-a").manifest["metrics"]["accuracy"] == 0.5  # the first's


class RefusesTheFirstManifestWrite(StoreAround):
    """A store that answers the first conditional write of a manifest as S3 answers a
    conflicting one (409), before the write it conflicted with is visible."""

    refused = False

    def put_bytes_if(self, key, data, *, version):
        if key.endswith("/manifest.json") and not self.refused:
            self.refused = True
            return False
        return self.inner.put_bytes_if(key, data, version=version)


def test_a_manifest_write_refused_before_the_other_shows_is_tried_again(store, runs):
    """A refused conditional write with no manifest there yet (a 409 answered before the
    conflicting write is visible) is not taken for another publisher's other files."""
    result = publish_run(make_run(runs, "run-a", accuracy=0.5), RefusesTheFirstManifestWrite(store))
    assert result.run_id == "run-a" and pointers(store) == ("run-a", "run-a")
    assert resolve_run(store, "run-a").manifest["metrics"]["accuracy"] == 0.5


def test_a_manifest_file_name_holding_a_nul_is_refused_by_name(store, runs, tmp_path):
    """A foreign or hand-edited manifest naming a file "a\\0b": open() raised ValueError,
    a traceback, where a name that leaves the run folder is one error."""
    publish_run(make_run(runs, "run-a", accuracy=0.5), store)
    manifest = json.loads(store.get_bytes("runs/run-a/manifest.json"))
    manifest["files"]["a\0b"] = manifest["files"]["history.csv"]
    store.put_bytes("runs/run-a/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(StorageError, match=r"manifest of run 'run-a' names an unsafe file path"):
        download_run(store, "run-a", dest=tmp_path / "copy")


def test_republish_with_other_files_is_refused(store, runs):
    """A published run never changes: different files under the same id are refused."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    publish_run(folder, store)
    (folder / "history.csv").write_text("changed\n")
    with pytest.raises(StorageError, match=r"run 'run-a' is already published .* with other "
                                           r"files \(history\.csv\); published runs never "
                                           r"change: .* new run_id in its manifest\.json"):
        publish_run(folder, store)
    # the remedy the error names
    copy = runs / "run-a-again"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "run_id": "run-a-again"}))
    assert publish_run(copy, store).run_id == "run-a-again"


def test_run_without_manifest_is_invisible(store, runs):
    """Artifacts without a remote manifest are not listed, resolved or downloadable."""
    publish_run(make_run(runs, "done", accuracy=0.5, minute=1), store)
    half = make_run(runs, "half", accuracy=0.9, minute=2)
    for name, data in local_files(half).items():
        store.put_bytes(f"runs/half/{name}", data)
    assert [s.run_id for s in list_runs(store)] == ["done"]
    with pytest.raises(StorageError, match=r"run 'half' not found in .*; list the published runs"):
        resolve_run(store, "half")


def test_crash_mid_publish_leaves_pointers_on_complete_runs(store, runs):
    """A publish that dies after some uploads is invisible, moves no pointer, and can be redone."""
    publish_run(make_run(runs, "old", accuracy=0.5, minute=1), store)
    new = make_run(runs, "new", accuracy=0.9, minute=2)
    with pytest.raises(StorageError, match="simulated crash"):
        publish_run(new, CrashAfterUploads(store, uploads=2))
    assert [s.run_id for s in list_runs(store)] == ["old"]
    assert pointers(store) == ("old", "old")
    assert publish_run(new, store).became_champion
    assert pointers(store) == ("new", "new")


# --- publishers at the same moment ---------------------------------------------------------


class SlipsInAfterReading:
    """The store as one publisher sees it, with another publisher slipping in between its read
    of pointer ``key`` and its write: the race of a scheduled retrain and a manual
    `fer publish` finishing together, made to happen every time."""

    def __init__(self, inner, key: str, other) -> None:
        self.inner, self.key, self.other = inner, key, other

    def get_versioned(self, key):
        return self._then_slip_in(key, self.inner.get_versioned(key))

    def get_bytes(self, key):
        return self._then_slip_in(key, self.inner.get_bytes(key))

    def _then_slip_in(self, key, read):
        if key == self.key and self.other is not None:
            other, self.other = self.other, None
            other()
        return read

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize(("ours", "theirs", "champion"), [(0.60, 0.70, "theirs"),
                                                          (0.70, 0.60, "ours")])
def test_a_run_published_meanwhile_is_compared_not_overwritten(store, runs, ours, theirs,
                                                               champion):
    """Another run that became champion between our read of the pointer and our write is
    compared with, not overwritten: the better of the two is the champion (a worse run
    published at the same moment had replaced a better one), and each result says so."""
    slipped = []
    theirs_folder = make_run(runs, "theirs", accuracy=theirs, minute=1)
    racing = SlipsInAfterReading(
        store, "champion.json", lambda: slipped.append(publish_run(theirs_folder, store)))
    result = publish_run(make_run(runs, "ours", accuracy=ours, minute=2), racing)
    assert slipped[0].became_champion
    assert resolve_run(store, "champion").run_id == champion
    assert result.became_champion == (champion == "ours")


def test_latest_published_meanwhile_by_a_newer_run_stays(store, runs):
    """A newer run published between our read of `latest` and our write keeps `latest`."""
    newer = make_run(runs, "newer", accuracy=0.5, minute=2)
    racing = SlipsInAfterReading(store, "latest.json", lambda: publish_run(newer, store))
    publish_run(make_run(runs, "older", accuracy=0.5, minute=1), racing)
    assert resolve_run(store, "latest").run_id == "newer"


class AnswerLost:
    """A store whose first conditional write of ``key`` lands but reports a conflict: what a
    client sees when the server's answer was lost and its retry was refused (the object had
    changed: by that very write)."""

    def __init__(self, inner, key: str) -> None:
        self.inner, self.key, self.lost = inner, key, False

    def put_bytes_if(self, key, data, *, version):
        landed = self.inner.put_bytes_if(key, data, version=version)
        if key == self.key and not self.lost:
            self.lost = True
            return False
        return landed

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_champion_write_whose_answer_was_lost_is_still_reported(store, runs):
    """Reading the pointer again after a refused write and finding this run there means
    the write landed: the publish reports a new champion, not "published again"."""
    publish_run(make_run(runs, "old", accuracy=0.5, minute=1), store)
    result = publish_run(make_run(runs, "new", accuracy=0.7, minute=2),
                         AnswerLost(store, "champion.json"))
    assert result.became_champion
    assert pointers(store) == ("new", "new")


def test_many_publishers_at_once_leave_the_best_and_the_newest(store, runs):
    """Six runs published from six threads at once, each with its own connection: the
    champion is the best on validation and `latest` the newest, and the best run's publish
    reports that it became champion."""
    folders = [make_run(runs, f"r{i}", accuracy=0.5, val_accuracy=0.60 + 0.01 * ((i * 5) % 6),
                        minute=i) for i in range(6)]
    connections = [open_store(store.location, endpoint_url=getattr(store, "endpoint", None))
                   for _ in folders]
    with ThreadPoolExecutor(len(folders)) as pool:
        results = list(pool.map(publish_run, folders, connections))
    best = max(folders, key=lambda f: json.loads((f / "metrics.json").read_text())[
        "best_val_accuracy"]).name
    assert pointers(store) == ("r5", best)
    assert best in {r.run_id for r in results if r.became_champion}


class IgnoresACondition:
    """A store that writes whatever ``ignored`` (If-None-Match or If-Match) says, as a
    server that ignores that header would; the other it honours."""

    def __init__(self, inner, ignored: str) -> None:
        self.inner, self.ignored = inner, ignored

    def put_bytes_if(self, key, data, *, version):
        if (version is None) == (self.ignored == "If-None-Match"):
            self.inner.put_bytes(key, data)
            return True
        return self.inner.put_bytes_if(key, data, version=version)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("ignored", ["If-None-Match", "If-Match"])
def test_the_check_before_training_warns_of_a_store_that_ignores_conditions(store, caplog,
                                                                            ignored):
    """The write check before training also writes the way pointers are written, and warns
    when the store lets a conditional write that had to fail through (the pointer race is
    back there); a store that honours both conditions passes without a word."""
    check_can_publish(store)
    assert "did not refuse" not in caplog.text
    check_can_publish(IgnoresACondition(store, ignored))
    assert f"{store.location} did not refuse a conditional write that had to fail" in caplog.text


class RefusesItsOwnVersion:
    """A store whose conditional writes always conflict, as behind a proxy that rewrites
    ETags: every pointer move would fail after training."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def put_bytes_if(self, key, data, *, version):
        return False

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_check_before_training_fails_where_no_pointer_could_move(store):
    """Hours of training would end in pointer moves refused ten times each: said first."""
    with pytest.raises(StorageError, match=r"refused a write conditional on the version it "
                                           r"had just given"):
        check_can_publish(RefusesItsOwnVersion(store))


class OthersWriteInBetween:
    """A store where, three times over, another run's write check lands between our read of
    the object's version and our conditional write (on a bucket whose every write gets a new
    ETag, an SSE-KMS one, identical bytes change the version too)."""

    def __init__(self, inner) -> None:
        self.inner, self.raced = inner, 0

    def put_bytes_if(self, key, data, *, version):
        if key == WRITE_CHECK and self.raced < 3:
            self.raced += 1
            return False
        return self.inner.put_bytes_if(key, data, version=version)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_runs_checking_the_store_at_the_same_moment_all_pass(store):
    """Runs started together each write the check object: losing a race to another is
    tried again, not taken for a store that cannot move pointers (which failed the run)."""
    racing = OthersWriteInBetween(store)
    check_can_publish(racing)
    assert racing.raced == 3


def test_a_pointer_fer_did_not_write_is_replaced_with_a_warning(store, runs, caplog):
    """A latest.json or champion.json that is not fer's (hand-edited, another tool's) made
    every publish fail, and --force-champion could not get past it: the next run replaces
    it, saying so."""
    store.put_bytes("latest.json", b"not json")
    store.put_bytes("champion.json", json.dumps({"run_id": "../../etc"}).encode())
    result = publish_run(make_run(runs, "r1", accuracy=0.5), store)
    assert result.is_champion
    assert pointers(store) == ("r1", "r1")
    assert "latest.json is not a JSON object" in caplog.text
    assert "champion.json" in caplog.text and "replacing it" in caplog.text


# --- reading errors -------------------------------------------------------------------------


def test_a_run_folder_inside_a_folder_store_is_named_not_a_traceback(tmp_path, runs, caplog):
    """`fer train --out artifacts/runs` puts a run folder where the default store keeps its
    published runs: a listing leaves it out with a warning naming it (it had been a
    KeyError traceback), and reading or publishing it says what it is."""
    store = open_store(str(tmp_path / "artifacts"))
    publish_run(make_run(runs, "published", accuracy=0.5), store)
    inside = make_run(tmp_path / "artifacts" / "runs", "trained-here", accuracy=0.6)
    assert [r.run_id for r in list_runs(store)] == ["published"]
    assert "runs/trained-here/manifest.json is not the manifest of a published run" in caplog.text
    expected = r"trained-here/manifest\.json is not the manifest of a published run .*--out"
    with pytest.raises(StorageError, match=expected):
        resolve_run(store, "trained-here")
    # `fer publish` of it says where it is; the advice for a damaged published manifest
    # ("delete that one object and publish the run again") would delete the run's own
    with pytest.raises(StorageError, match=r"artifacts/runs: is where the store .* keeps its "
                                           r"published runs; .*keep run folders outside the "
                                           r"store") as refused:
        publish_run(inside, store)
    assert "delete" not in str(refused.value)
    assert (inside / "manifest.json").is_file()
    # a published run's own folder there publishes, as before: how a champion is rolled back
    publish_run(make_run(runs, "newer", accuracy=0.9, minute=5), store)
    rolled_back = publish_run(tmp_path / "artifacts" / "runs" / "published", store,
                              force_champion=True)
    assert rolled_back.became_champion and pointers(store) == ("newer", "published")


class DeniesReadingManifests(StoreAround):
    """A store whose keys may list runs but not read their manifests (S3 AccessDenied)."""

    def get_versioned(self, key):
        if key.endswith("/manifest.json"):
            raise StorageError(f"S3 denied access while reading {key} (AccessDenied)")
        return self.inner.get_versioned(key)


def test_a_manifest_that_cannot_be_read_stops_the_listing(store, runs):
    """Only objects fer did not write are left out of a listing; denied access is the
    error it is, not an empty listing with exit 0."""
    publish_run(make_run(runs, "good", accuracy=0.5), store)
    with pytest.raises(StorageError, match=r"denied access while reading runs/good"):
        list_runs(DeniesReadingManifests(store))


def test_a_copy_of_a_runs_folder_in_the_store_is_not_listed_as_that_run(store, runs, caplog):
    """runs/good/ copied to runs/copy/ in the bucket: the listing showed run 'good' twice
    (its rows read the manifests' run ids), and `fer reports get copy` fetched 'good' under
    another name. The copy is left out with a warning, and named when asked for."""
    publish_run(make_run(runs, "good", accuracy=0.5), store)
    store.put_bytes("runs/copy/manifest.json", store.get_bytes("runs/good/manifest.json"))
    assert [r.run_id for r in list_runs(store)] == ["good"]
    assert "copy/manifest.json is the manifest of run 'good', not of 'copy'" in caplog.text
    with pytest.raises(StorageError, match=r"manifest of run 'good', not of 'copy': a copy"):
        resolve_run(store, "copy")


def test_a_manifest_that_is_not_json_hides_only_its_own_run(store, runs, caplog):
    """One unreadable manifest in the store is left out of a listing with a warning; the
    other runs are still listed."""
    publish_run(make_run(runs, "good", accuracy=0.5), store)
    store.put_bytes("runs/broken/manifest.json", b"{not json")
    assert [r.run_id for r in list_runs(store)] == ["good"]
    assert "broken/manifest.json is not a JSON object" in caplog.text
    # publishing that run again is refused (it may be someone's file), saying how to repair
    # a damaged copy of its own manifest (it had only said "not written by fer")
    with pytest.raises(StorageError, match=r"broken/manifest\.json is not a JSON object; .*; "
                                           r"if it is this run's published manifest, damaged .*"
                                           r"delete that one object and publish the run again"):
        publish_run(make_run(runs, "broken", accuracy=0.5), store)


@pytest.mark.parametrize("damage", [
    {"files": {"model.keras": {"size": 3}}}, {"files": {"model.keras": ["not", "a", "dict"]}},
    {"parameters": None, "data": []}, {"created": None},
], ids=["file-without-sha256", "file-entry-a-list", "data-a-list", "created-missing"])
def test_a_manifest_of_the_wrong_shape_is_named_not_a_traceback(store, runs, tmp_path, caplog,
                                                               damage):
    """A manifest whose fields are not what fer writes (edited by hand, or another tool's):
    a listing leaves it out with a warning, and reading or downloading it is one
    StorageError (these were KeyError, TypeError and AttributeError tracebacks)."""
    publish_run(make_run(runs, "good", accuracy=0.5, minute=1), store)
    publish_run(make_run(runs, "odd", accuracy=0.5, minute=2), store)
    manifest = json.loads(store.get_bytes("runs/odd/manifest.json"))
    manifest.update(damage)
    store.put_bytes("runs/odd/manifest.json", json.dumps(manifest).encode())
    assert [r.run_id for r in list_runs(store)] == ["good"]
    assert "runs/odd/manifest.json is not the manifest of a published run" in caplog.text
    with pytest.raises(StorageError, match=r"odd/manifest\.json is not the manifest"):
        download_run(store, "odd", dest=tmp_path / "got")


@pytest.mark.parametrize("figure", ["0.99", float("inf"), float("nan")])
def test_a_champion_pointer_whose_figure_is_not_a_number_is_rebuilt(store, runs, figure):
    """champion.json with a val_accuracy that is not a finite number is compared through its
    run's manifest (0.65), as an older pointer is (a string was a TypeError in the
    comparison); read as it is, "0.99" or Infinity would keep the champion for ever, and NaN
    (neither above nor below) would pass it to any newer run, 0.64 too."""
    publish_run(make_run(runs, "old", accuracy=0.50, val_accuracy=0.65, minute=1), store)
    record = json.loads(store.get_bytes("champion.json"))
    record["val_accuracy"] = figure
    store.put_bytes("champion.json", json.dumps(record).encode())
    assert not publish_run(make_run(runs, "new", accuracy=0.70, val_accuracy=0.64, minute=2),
                           store).became_champion
    assert publish_run(make_run(runs, "newer", accuracy=0.40, val_accuracy=0.66, minute=3),
                       store).became_champion


def test_a_report_edited_in_another_encoding_is_shown_not_refused(store, runs):
    """A classification report saved as Latin-1 before publishing (`café`) is shown with the
    byte it cannot read replaced: `fer reports show` had ended in a UnicodeDecodeError
    traceback, though its bytes were verified."""
    folder = make_run(runs, "latin", accuracy=0.5)
    (folder / "classification_report.txt").write_bytes(b"caf\xe9 report\n")
    publish_run(folder, store)
    assert read_report(store, "latin").text == "caf\ufffd report\n"


def test_a_run_whose_validation_accuracy_is_not_finite_does_not_take_the_champion(store, runs):
    """A metrics.json with NaN (which Python's json reads) for the validation accuracy is
    an unknown figure, which never wins; compared as a number it tied every champion and
    won by age."""
    publish_run(make_run(runs, "r1", accuracy=0.60, val_accuracy=0.65, minute=1), store)
    published = publish_run(make_run(runs, "r2", accuracy=0.60, val_accuracy=float("nan"),
                                     minute=2), store)
    assert not published.became_champion
    assert json.loads(store.get_bytes("champion.json"))["run_id"] == "r1"
    # nor is the best epoch's figure taken for the saved model's NaN (another model's)
    folder = make_run(runs, "r3", accuracy=0.60, val_accuracy=0.90, minute=3)
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics,
                                                     "saved_model_val_accuracy": float("nan")}))
    assert not publish_run(folder, store).became_champion


@pytest.mark.parametrize(("ref", "message"), [
    ("nope", r"run 'nope' not found in .*; list the published runs"),
    ("latest", r"no run is marked 'latest' in .* yet; publish a run"),
    ("champion", r"no run is marked 'champion' in .* yet; publish a run"),
    ("../etc", r"'../etc' is not a run id, 'latest' or 'champion'"),
])
def test_unknown_reference_is_a_clear_error(store, ref, message):
    """Resolving a missing run or an unset pointer names what was asked and where."""
    with pytest.raises(StorageError, match=message):
        resolve_run(store, ref)


def test_download_detects_sha256_mismatch(store, runs, tmp_path):
    """A stored artifact whose bytes differ from the manifest's sha256 is refused by name."""
    publish_run(make_run(runs, "run-a", accuracy=0.5), store)
    store.put_bytes("runs/run-a/history.csv", b"tampered\n")
    with pytest.raises(StorageError, match=r"history\.csv of run 'run-a' is corrupt: sha256"):
        download_run(store, "run-a", dest=tmp_path / "download")
    assert not (tmp_path / "download" / "run-a" / "history.csv").exists()


def test_a_file_missing_from_the_store_is_named_with_the_remedy(store, runs, tmp_path):
    """A published file deleted from the store (a lifecycle rule, a cut-short bucket copy)
    had been 'cannot read ...: No such file or directory; check the storage folder' or
    'S3 ... refused ...: 404 Not Found': now it is named as missing, with what restores it."""
    publish_run(make_run(runs, "run-a", accuracy=0.5), store)

    def delete(name: str) -> None:
        if isinstance(store, LocalStore):
            (store.root / "runs" / "run-a" / name).unlink()
        else:
            store._client.delete_object(Bucket=store.bucket, Key=store._key(f"runs/run-a/{name}"))

    delete("model.keras")
    where = re.escape(store.url("runs/run-a/model.keras"))  # which store: a user may have several
    with pytest.raises(StorageError, match=rf"^model\.keras of run 'run-a' is missing from the "
                                           rf"store \(not found at {where}\); publish the run again$"):
        download_run(store, "run-a", dest=tmp_path / "download")
    delete("classification_report.txt")
    with pytest.raises(StorageError, match=r"^classification_report\.txt of run 'run-a' is "
                                           r"missing from the store \(not found at .*/runs/run-a/"
                                           r"classification_report\.txt\); publish the run again$"):
        read_report(store, "run-a")


def test_report_detects_sha256_mismatch(store, runs):
    """read_report refuses a report whose bytes do not match the manifest."""
    publish_run(make_run(runs, "run-a", accuracy=0.5), store)
    store.put_bytes("runs/run-a/classification_report.txt", b"forged report\n")
    with pytest.raises(StorageError, match=r"classification_report\.txt of run 'run-a' is corrupt"):
        read_report(store, "champion")


# --- run folder validation ------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["metrics.json", "manifest.json"])
def test_publish_refuses_incomplete_run_folder(tmp_path, runs, missing):
    """A run folder without metrics.json or manifest.json is refused, naming folder and file."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    (folder / missing).unlink()
    store = LocalStore(tmp_path / "artifacts")
    with pytest.raises(FerError, match=rf"run folder .*run-a has no {missing}"):
        publish_run(folder, store)
    assert store.run_ids() == []


@pytest.mark.parametrize("unreadable", ["history.csv", "metrics.json"])
def test_a_run_file_that_cannot_be_read_is_named_not_a_traceback(tmp_path, runs, unreadable):
    """A file the system will not let fer read (a run written by another account with umask
    077; here /proc/self/mem, which refuses reads even to root, as these tests run) had
    been an OSError traceback: one error line names it, and nothing is uploaded."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    (folder / unreadable).unlink()
    (folder / unreadable).symlink_to("/proc/self/mem")
    store = LocalStore(tmp_path / "artifacts")
    with pytest.raises(FerError, match=rf"^cannot read {re.escape(str(folder / unreadable))} "
                                       r"\(Input/output error\); check the run folder's"):
        publish_run(folder, store)
    assert store.run_ids() == []


def test_publishing_a_stopped_run_says_how_to_finish_it(tmp_path, runs):
    """A run stopped mid-training has its checkpoint and no manifest yet; one stopped while
    scoring the test split has its manifest and still its checkpoint."""
    folder = runs / "run-a"
    (folder / "checkpoint" / "member-1").mkdir(parents=True)
    with pytest.raises(FerError, match=r"run-a is not complete: its training stopped before "
                                       r"the end; `fer train --resume .*run-a` finishes it"):
        publish_run(folder, LocalStore(tmp_path / "artifacts"))
    scored = make_run(runs, "run-b", accuracy=0.6)
    (scored / "checkpoint").mkdir()
    with pytest.raises(FerError, match=r"run-b is not complete: its scoring stopped before "):
        publish_run(scored, LocalStore(tmp_path / "artifacts"))
    spaced = runs / "my runs" / "run-c"  # the hint pastes into a shell as it is
    (spaced / "checkpoint").mkdir(parents=True)
    with pytest.raises(FerError, match=rf"`fer train --resume '{re.escape(str(spaced))}'` "):
        publish_run(spaced, LocalStore(tmp_path / "artifacts"))


@pytest.mark.parametrize(("file", "patch", "message"), [
    ("manifest.json", {"run_id": "latest"}, r"manifest\.json: run_id 'latest' is not a valid"),
    ("manifest.json", {"run_id": "a/b"}, r"run_id 'a/b' is not a valid run id"),
    ("manifest.json", {"created": "yesterday"}, r"created 'yesterday' is not an ISO-8601 time"),
    ("metrics.json", {"accuracy": "high"}, r"metrics\.json: accuracy 'high' must be a number"),
])
def test_publish_refuses_bad_run_metadata(tmp_path, runs, file, patch, message):
    """Unusable run ids, times or accuracies are refused before anything is uploaded."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    data = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**data, **patch}))
    with pytest.raises(FerError, match=message):
        publish_run(folder, LocalStore(tmp_path / "artifacts"))


def test_publish_uploads_only_the_artifacts_the_manifest_lists(store, runs):
    """`fer evaluate` writes evaluation/ into the run folder, and a user may add notes:
    publishing leaves out what the list does not name, not only what a run of a fer
    before the list would leave out (evaluation/, hidden files)."""
    folder = make_run(runs, "run-a", accuracy=0.5)
    listed = sorted(local_files(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "artifacts": listed}))
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "classification_report.txt").write_text("other data\n")
    (folder / "notes.txt").write_text("tried a lower learning rate first\n")
    publish_run(folder, store)
    assert sorted(resolve_run(store, "run-a").manifest["files"]) == listed
    publish_run(folder, store)  # still the same files: harmless, not "different files"


def test_publish_names_a_listed_artifact_that_is_missing(tmp_path, runs):
    folder = make_run(runs, "run-a", accuracy=0.5)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(
        {**manifest, "artifacts": ["model.keras", "confusion_matrix.png"]}))
    (folder / "confusion_matrix.png").unlink()
    with pytest.raises(FerError, match=r"run-a has no confusion_matrix\.png \(listed in manifest"):
        publish_run(folder, LocalStore(tmp_path / "artifacts"))


def test_downloads_of_one_run_into_one_folder_at_once_all_succeed(store, runs, tmp_path):
    """Two `fer reports get` of the same run into the same --dest (two jobs of a pipeline)
    had written the same `<file>.part`: one truncated or renamed the other's, which then
    failed as 'corrupt ... publish the run again' or vanished mid-check."""
    folder = make_run(runs, "run-a", accuracy=0.5, big=True)
    publish_run(folder, store)
    dest = tmp_path / "download"
    with ThreadPoolExecutor(6) as pool:
        done = list(pool.map(lambda _: download_run(store, "run-a", dest=dest), range(6)))
    assert all(local_files(run) == local_files(folder) for run in done)
    assert not list(dest.rglob("*.part"))


def test_a_folder_store_that_fails_to_read_is_named_not_the_destination(tmp_path, monkeypatch):
    """An I/O error reading the store (a network file system gone stale) names the store's
    file and the storage folder; it had been reported as the --dest file that could not be
    written, with advice about --dest's permissions and free space."""
    import builtins
    import errno

    import fer.storage

    store = open_store(str(tmp_path / "artifacts"))
    publish_run(make_run(tmp_path / "runs", "run-a", accuracy=0.6), store)

    class FailingReader:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def read(self, size):
            raise OSError(errno.EIO, "Input/output error")

    def store_reads_fail(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return FailingReader(file) if mode == "rb" and "artifacts" in str(path) else file

    monkeypatch.setattr(fer.storage, "open", store_reads_fail, raising=False)
    with pytest.raises(StorageError, match=r"cannot read .*artifacts/runs/run-a/.*: Input/output "
                                           r"error; check the storage folder") as error:
        download_run(store, "run-a", dest=tmp_path / "got")
    assert "--dest" not in str(error.value)


def test_a_download_stopped_while_writing_the_manifest_leaves_none(tmp_path, monkeypatch):
    """The manifest, written last, marks a downloaded run complete: a stop while it is
    written leaves no manifest (and no partial file), never half of one."""
    import os

    import fer.runs

    store = open_store(str(tmp_path / "artifacts"))
    publish_run(make_run(tmp_path / "runs", "run-a", accuracy=0.6), store)
    real_replace = os.replace

    def stopped_at_the_manifest(source, target):
        if os.path.basename(target) == "manifest.json":
            raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(fer.runs.os, "replace", stopped_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        download_run(store, "run-a", dest=tmp_path / "got")
    left = sorted(p.name for p in (tmp_path / "got" / "run-a").iterdir())
    assert "manifest.json" not in left and not [n for n in left if n.endswith(".part")]
    assert "model.keras" in left


def test_publishers_back_off_by_waits_that_training_did_not_seed(monkeypatch):
    """Training seeds Python's shared random module (keras.utils.set_random_seed) and leaves
    it seeded: two runs of one --seed whose publishes met drew the same waits, and met
    again at each retry."""
    import random

    import fer.runs

    waits: list[float] = []
    monkeypatch.setattr(fer.runs.time, "sleep", waits.append)
    for _ in range(2):
        random.seed(1337)  # as each run's training left it
        fer.runs._back_off(5)
    assert len(waits) == 2 and waits[0] != waits[1]
