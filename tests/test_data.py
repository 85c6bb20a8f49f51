"""fer.data: both source forms, label mapping by name, splits, cache, and bad input."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CLASS_SHADE,
    assert_labels_match_shades,
    csv_row,
    encode_image,
    large_grey_png,
    run_short_of_memory,
    shaded_image,
    write_csv,
    write_image_tree,
    zip_folder,
)

import fer.data
from fer.data import (
    Split,
    load_dataset,
    read_splits,
    safe_extract,
    split_validation,
    to_model_input,
)
from fer.errors import DataError
from fer.labels import CLASS_INDEX, CLASS_NAMES

# Every archive, download and cache file these read is closed once read (an unclosed one is a
# ResourceWarning, raised from the garbage collector, so both warnings fail the test).
pytestmark = [pytest.mark.filterwarnings("error::ResourceWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


@pytest.mark.parametrize("shape", [(48, 144), (144, 48), (40, 480), (480, 40), (144, 144)])
def test_a_side_that_shrinks_is_averaged_whatever_the_other_does(shape):
    """Stripes of one bright column (or row) in every `period` average to 255 / period along
    a side shrunk a multiple of `period` times, as where both sides shrink: where the other
    side stayed or grew, one linear resize sampled the columns (stripes of 0 and 255)."""
    scale = max(shape) // 48
    period = 3 if scale % 3 == 0 else 5  # linear sampling hits 0 and 255 alike at period 2
    stripes = np.where(np.arange(max(shape)) % period == 0, 255, 0).astype(np.uint8)
    image = np.broadcast_to(stripes if shape[1] > shape[0] else stripes[:, None], shape).copy()
    resized = to_model_input(image)
    assert resized.shape == (48, 48) and resized.dtype == np.uint8
    assert np.abs(resized.astype(int) - 255 / period).max() <= 2, np.unique(resized)


def test_canonical_class_order_is_the_csv_label_order():
    """CSV integers are positions in CLASS_NAMES: 0 angry ... 4 sad, 5 surprise, 6 neutral."""
    assert CLASS_NAMES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def test_image_folder_labels_map_by_folder_name(image_tree):
    """Folder names decide labels, whatever their alphabetical position."""
    splits = read_splits(image_tree)
    assert set(splits) == {"train", "test"}
    for split in splits.values():
        assert_labels_match_shades(split)


def test_image_zip_with_top_folder_and_jpgs(tmp_path):
    """A zip whose entries sit under one top folder, with JPEGs of another size, reads the same."""
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for split in ("train", "test"):
            for name in CLASS_NAMES:
                big = shaded_image(name, size=96)
                handle.writestr(f"fer/{split}/{name}/a.jpg", encode_image(big, ".jpg"))
        handle.writestr("__MACOSX/fer/train/happy/._a.jpg", b"not an image")  # macOS clutter
    splits = read_splits(archive)
    assert splits["train"].images.shape == (7, 48, 48)
    for split in splits.values():
        for image, label in zip(split.images, split.labels, strict=True):
            assert abs(int(image[24, 24]) - CLASS_SHADE[CLASS_NAMES[label]]) <= 2


def test_csv_inside_tar_gz(tmp_path, shaded_csv):
    """A fer2013.csv packed in a .tar.gz is found and parsed."""
    archive = tmp_path / "fer.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(shaded_csv, arcname="fer2013/fer2013.csv")
    assert len(read_splits(archive)["train"]) == 21


def test_macos_clutter_beside_the_csv_is_ignored(tmp_path, shaded_csv):
    """A zip made by macOS's Finder carries __MACOSX/._fer2013.csv (a resource fork), and a
    tar made there ._fer2013.csv: the one real CSV is still the dataset."""
    zipped = tmp_path / "mac.zip"
    with zipfile.ZipFile(zipped, "w") as handle:
        handle.write(shaded_csv, "fer2013.csv")
        handle.writestr("__MACOSX/._fer2013.csv", b"\x00\x05\x16\x07 resource fork")
    assert len(read_splits(zipped)["train"]) == 21
    (tmp_path / "._fer2013.csv").write_bytes(b"\x00\x05\x16\x07")
    assert len(read_splits(tmp_path)["train"]) == 21  # the folder holding both


def test_a_zip_with_windows_separators_is_read_and_unpacked(tmp_path, image_tree):
    """Some Windows tools (PowerShell 5's Compress-Archive) store train\\happy\\0.png."""
    archive = tmp_path / "windows.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(image_tree.rglob("*.png")):
            handle.write(path, str(path.relative_to(image_tree)).replace("/", "\\"))
    assert len(read_splits(archive)["train"]) == 21
    unpacked = safe_extract(archive, tmp_path / "out")
    assert len(list((unpacked / "train" / "happy").glob("*.png"))) == 3


def test_several_csvs_are_named_not_called_empty(tmp_path, shaded_csv):
    """Kaggle's challenge zip holds train.csv, test.csv and icml_face_data.csv: say which
    files were found, rather than 'no images found'."""
    archive = tmp_path / "challenge.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name in ("train.csv", "test.csv"):
            handle.write(shaded_csv, name)
    with pytest.raises(DataError, match=r"challenge\.zip: holds 2 CSV files \(test\.csv, "
                                        r"train\.csv\); expected one fer2013\.csv"):
        read_splits(archive)


def test_one_csv_beside_the_image_folders_leaves_the_images_the_dataset(tmp_path, image_tree,
                                                                          shaded_csv):
    """A single CSV beside train/ and test/ (FER+'s labels, or a fer2013.csv of other data)
    is another file in an archive, in its unpacked folder and in what fetch-data unpacks: the
    same source gives the same dataset whichever way it comes (the archive read the CSV)."""
    from fer.fetch import fetch_data

    (image_tree / "labels.csv").write_bytes(shaded_csv.read_bytes())  # even a valid fer2013.csv
    archive = zip_folder(image_tree, tmp_path / "images.zip")
    fetched = fetch_data(str(archive), data_dir=tmp_path / "data")
    for source in (archive, image_tree, fetched.path):
        splits = read_splits(source)
        assert (len(splits["train"]), len(splits["test"])) == (21, 21), source
        assert "validation" not in splits, source  # the CSV's PublicTest rows would be


def test_files_that_are_not_images_in_class_folders_are_counted_not_decoded(tmp_path,
                                                                           image_tree, caplog):
    """Kaggle's archive unpacked on Windows and copied into WSL brings a `:Zone.Identifier`
    beside every image, and a class folder may hold a desktop.ini: they are other files,
    counted in the warning (they had stopped the load as undecodable images), and a code
    tree's `src/train/models/net.py` is not taken for a second set of split folders."""
    for name in ("train/happy/x.png:Zone.Identifier", "test/sad/desktop.ini",
                 "src/train/models/net.py"):
        (image_tree / name).parent.mkdir(parents=True, exist_ok=True)
        (image_tree / name).write_text("[ZoneTransfer]\nZoneId=3\n")
    # an image without a suffix is still read, as it was (the decode cache holds it)
    (image_tree / "train" / "happy" / "img001").write_bytes(encode_image(shaded_image("happy")))
    for source in (image_tree, zip_folder(image_tree, tmp_path / "layout.zip")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fer.data"):
            splits = read_splits(source)
        assert (len(splits["train"]), len(splits["test"])) == (22, 21), source
        assert caplog.messages == [f"{source}: 3 files outside <train|test>/<class>/ were not "
                                   "read (the first: 'src/train/models/net.py')"]


def test_files_outside_split_class_folders_are_counted_in_a_warning(tmp_path, image_tree,
                                                                       caplog):
    """A val/ folder, images one folder deeper and a note are not read; the warning counts
    them (they were dropped without a word), while clutter and CSVs are not counted."""
    image = (image_tree / "train" / "happy").iterdir().__next__().read_bytes()
    for name in ("val/happy/v.png", "train/happy/batch1/deep.png", "notes.txt",
                 "labels.csv", "__MACOSX/._x.png"):
        (image_tree / name).parent.mkdir(parents=True, exist_ok=True)
        (image_tree / name).write_bytes(image)
    for source in (image_tree, zip_folder(image_tree, tmp_path / "layout.zip")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fer.data"):
            assert len(read_splits(source)["train"]) == 21
        assert caplog.messages == [f"{source}: 3 files outside <train|test>/<class>/ were not read "
                                   "(the first: 'notes.txt')"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="fer.data"):
        read_splits(write_image_tree(tmp_path / "clean"))
    assert caplog.messages == []


@pytest.mark.parametrize("other", ["test/README.md", "src/train/models/net.py"])
def test_a_csv_beside_folders_of_other_files_is_the_dataset(tmp_path, shaded_csv, other):
    """Only images in <split>/<class>/ make a source an image layout: a CSV beside a test/
    folder of notes or a train/ folder of code is the dataset, in the folder and its zip."""
    folder = tmp_path / "ds"
    (folder / other).parent.mkdir(parents=True)
    (folder / other).write_text("not an image")
    (folder / "fer2013.csv").write_bytes(shaded_csv.read_bytes())
    for source in (folder, zip_folder(folder, tmp_path / "ds.zip")):
        assert len(read_splits(source)["validation"]) == 21, source


def test_any_image_type_opencv_reads_makes_an_image_layout(tmp_path, shaded_csv):
    """JPEGs named .jfif beside a CSV are still the dataset (any suffix OpenCV reads counts
    as an image when telling an image layout from a CSV beside other files)."""
    folder = tmp_path / "ds"
    for split in ("train", "test"):
        (folder / split / "happy").mkdir(parents=True)
        (folder / split / "happy" / "0.jfif").write_bytes(
            encode_image(np.full((48, 48), 200, np.uint8), ".jpg"))
    (folder / "fer2013.csv").write_bytes(shaded_csv.read_bytes())
    for source in (folder, zip_folder(folder, tmp_path / "ds.zip")):
        splits = read_splits(source)
        assert "validation" not in splits and splits["train"].labels.tolist() == [3], source


def test_two_sets_of_split_folders_are_refused(tmp_path):
    """a/train... and b/train... (a copy beside the original) were merged into one dataset:
    every image counted twice, and a copy's test images could be another's train images.
    One set inside a folder (fer2013/train...) is fine."""
    write_image_tree(tmp_path / "two" / "a")
    write_image_tree(tmp_path / "two" / "b")
    for source in (tmp_path / "two", zip_folder(tmp_path / "two", tmp_path / "two.zip")):
        with pytest.raises(DataError, match=r"holds two sets of split folders \('a/test/angry/"
                                            r"0\.png' and 'b/test/angry/0\.png'\)"):
            read_splits(source)
    assert len(read_splits(tmp_path / "two" / "a")["train"]) == 21


def test_train_and_test_unpacked_into_folders_of_their_own_are_one_set(tmp_path):
    """`unzip train.zip -d ds/train; unzip test.zip -d ds/test` gives ds/train/train/...
    and ds/test/test/...: one train/ and one test/, read as one dataset (they had been
    refused as "two sets of split folders", a copy beside the original)."""
    write_image_tree(tmp_path / "whole")
    for split in ("train", "test"):
        shutil.copytree(tmp_path / "whole" / split, tmp_path / "ds" / split / split)
    splits = read_splits(tmp_path / "ds")
    assert (len(splits["train"]), len(splits["test"])) == (21, 21)


def test_images_may_sit_beside_other_csvs(tmp_path, image_tree):
    """CSVs beside train/ and test/ image folders (a labels list, say) leave the images the
    dataset, in an archive and in a folder, with the image folders one level down too."""
    (image_tree / "train" / "labels.csv").write_text("a,b\n")
    (image_tree / "notes.csv").write_text("a,b\n")
    archive = zip_folder(image_tree, tmp_path / "images.zip")
    assert len(read_splits(archive)["train"]) == 21
    outer = tmp_path / "outer"
    outer.mkdir()
    image_tree.rename(outer / "fer")
    for name in ("a.csv", "b.csv"):
        (outer / name).write_text("a,b\n")
    assert len(read_splits(outer)["train"]) == 21


def _reshaded(png: bytes, class_name: str) -> bytes:
    """The shaded PNG with its class's grey replaced by ``class_name``'s (its serial pixels
    kept): a uniform image of the same size encoded."""
    import cv2

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    image[:-1] = CLASS_SHADE[class_name]
    image[-1, :-2] = CLASS_SHADE[class_name]
    return encode_image(image)


@pytest.mark.parametrize("kind", ["csv", "folder"])
def test_an_edit_that_keeps_size_and_mtime_is_not_served_from_the_cache(tmp_path, shaded_csv,
                                                                         image_tree, kind):
    """Relabelling one row (4 -> 6, same size) and putting the mtime back, as `cp -p`,
    `rsync -a` or `touch -r` do, must not reuse the old sha256 and so the old decoded
    arrays (the run would train on stale labels and record the wrong data hash)."""
    cache = tmp_path / "cache"
    if kind == "csv":
        source = edited = shaded_csv
        old, new = b"\n4,", b"\n6,"
    else:  # a happy face replaced by an angry one: uniform shades, the same PNG size
        source = image_tree
        edited = image_tree / "train" / "happy" / "0.png"
    before = load_dataset(source, cache_dir=cache)
    stat = edited.stat()
    content = edited.read_bytes()
    changed = content.replace(old, new, 1) if kind == "csv" else _reshaded(content, "angry")
    assert len(changed) == len(content) and changed != content
    edited.write_bytes(changed)
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    if edited.stat().st_ctime_ns == stat.st_ctime_ns:
        pytest.skip("this filesystem's ctime did not move within the test")
    assert edited.stat().st_mtime_ns == stat.st_mtime_ns and edited.stat().st_size == stat.st_size
    after = load_dataset(source, cache_dir=cache)
    assert after.sha256 != before.sha256
    if kind == "csv":
        assert np.bincount(after.train.labels, minlength=7)[6] == 4  # one 4 became a 6


def test_a_killed_writers_decode_cache_temporary_is_removed_when_a_day_old(tmp_path,
                                                                             image_tree):
    """A decode-cache write killed mid-way leaves its temporary (tens of MB for FER2013);
    the next write of that cache removes it once it is a day old, and leaves a younger one,
    which may be another process's write in progress. So it does for one named as a fer
    before fer.files named them."""
    import os
    import time

    cache = tmp_path / "cache"
    load_dataset(image_tree, cache_dir=cache)
    [written] = (cache / "decoded").glob("*.npz")
    abandoned = written.with_name(f".{written.name}.1-aa.tmp.npz")
    older_fers = written.with_name(f"{written.stem}.3-cc.tmp.npz")
    fresh = written.with_name(f".{written.name}.2-bb.tmp.npz")
    for path in (abandoned, older_fers, fresh):
        path.write_bytes(b"half")
    for path in (abandoned, older_fers):
        os.utime(path, (time.time() - 2 * 24 * 3600,) * 2)
    written.unlink()  # so the next load decodes again and writes the cache
    load_dataset(image_tree, cache_dir=cache)
    assert written.exists() and fresh.exists()
    assert not abandoned.exists() and not older_fers.exists()


def test_a_data_folder_inside_the_dataset_folder_leaves_its_sha256_alone(tmp_path, image_tree):
    """FER_DATA_DIR inside the folder passed as --data (`ds/cache`): the decode cache and
    memo fer writes there had changed the folder's sha256 on every run (each run's manifest
    named other data, and no champion compared). FER_DATA_DIR carries a CACHEDIR.TAG
    (https://bford.info/cachedir/), and tagged folders inside a dataset are left out."""
    import shutil

    plain = load_dataset(shutil.copytree(image_tree, tmp_path / "copy")).sha256
    first = load_dataset(image_tree, cache_dir=image_tree / "cache")
    second = load_dataset(image_tree, cache_dir=image_tree / "cache")
    assert first.sha256 == second.sha256 == plain
    assert (image_tree / "cache" / "CACHEDIR.TAG").read_bytes().startswith(
        b"Signature: 8a477f597d28d172789f06886806bc55")
    assert len(first.test) == len(load_dataset(tmp_path / "copy").test)


def test_an_archive_of_a_dataset_folder_with_its_data_folder_inside_reads_the_same(
        tmp_path, image_tree):
    """A dataset folder archived with its FER_DATA_DIR inside, which holds an unpacked copy
    of the data: the folder leaves the tagged cache out, and so must the archive, or it
    reads two sets of split folders where the folder reads one."""
    import shutil
    import tarfile

    cache = image_tree / "cache"
    load_dataset(image_tree, cache_dir=cache)  # tags it
    # a tag at the dataset's own root is not a cache inside it, in an archive (`tar -C
    # folder .` names it ./CACHEDIR.TAG) as in the folder
    (image_tree / "CACHEDIR.TAG").write_bytes((cache / "CACHEDIR.TAG").read_bytes())
    shutil.copytree(image_tree / "train", cache / "sources" / "x" / "train")
    shutil.copytree(image_tree / "test", cache / "sources" / "x" / "test")
    with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as archive:
        archive.add(image_tree, arcname=".")
    folder, packed = read_splits(image_tree), read_splits(tmp_path / "ds.tar.gz")
    assert {k: len(v) for k, v in packed.items()} == {k: len(v) for k, v in folder.items()}


def test_a_file_without_a_suffix_is_refused_with_what_its_bytes_say(tmp_path, image_tree):
    """`--data ./fer2013`, a zip saved without its suffix: the refusal says what the file is
    and the two ways to read it."""
    from conftest import zip_folder

    archive = zip_folder(image_tree, tmp_path / "fer2013")
    with pytest.raises(DataError, match=r"unsupported source type .*; its first bytes are a "
                                        r"\.zip's: name it fer2013\.zip, or fetch it with "
                                        r"`fer fetch-data --source`"):
        load_dataset(archive)


def test_a_data_folder_holding_other_files_is_not_tagged_a_cache(tmp_path, image_tree):
    """FER_DATA_DIR pointed at a folder of the user's own (`/mnt/datasets`): tagging it
    would drop their data from every backup that honours CACHEDIR.TAG. Only a folder that
    holds nothing but fer's files (an older fer's included) is tagged."""
    own = tmp_path / "datasets"
    (own / "ferA").mkdir(parents=True)
    older = tmp_path / "older-fer"
    (older / "decoded").mkdir(parents=True)
    (older / "current.json").write_text("{}")
    for cache in (own, older):
        load_dataset(image_tree, cache_dir=cache)
    assert not (own / "CACHEDIR.TAG").exists() and (older / "CACHEDIR.TAG").exists()


def test_files_beside_a_dataset_leave_its_sha256_alone(tmp_path, image_tree, shaded_csv):
    """`fer train --data .` in a folder holding train/ and test/: the runs/ it writes there
    (and a folder store, notes) had changed the data sha256 with every run, so a stopped
    run could not resume and no later run could become champion (another sha256). The
    sha256 covers the files the dataset is read from, and is the same as before for a
    folder holding nothing else, so that earlier runs' sha256 still compare."""
    import hashlib

    def as_before(root: Path) -> str:  # HASH_FORMAT 2: every file but clutter, by name
        digest = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(os.fsencode(path.relative_to(root).as_posix()) + b"\0"
                          + hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    plain = load_dataset(image_tree).sha256
    assert plain == as_before(image_tree)
    stamp = fer.data.stat_stamp(image_tree, change_time=True)
    run = image_tree / "runs" / "20261206-083000-default-ab12"
    (run / "checkpoint" / "member-1").mkdir(parents=True)
    for name in ("history.csv", "curves.png", "manifest.json", "checkpoint/run.json",
                 "checkpoint/member-1/state.json"):
        (run / name).write_bytes(b"written by a run")
    (image_tree / "artifacts" / "runs").mkdir(parents=True)
    (image_tree / "artifacts" / "latest.json").write_text("{}")
    (image_tree / "notes.txt").write_text("trained on Monday")
    assert load_dataset(image_tree).sha256 == plain
    assert fer.data.stat_stamp(image_tree, change_time=True) == stamp  # no hashing again
    (image_tree / "train" / "happy" / "0.png").write_bytes(
        (image_tree / "train" / "sad" / "0.png").read_bytes())
    assert load_dataset(image_tree).sha256 != plain  # the data itself still counts

    folder = tmp_path / "csv-folder"
    folder.mkdir()
    shutil.copy(shaded_csv, folder / "fer2013.csv")
    alone = load_dataset(folder).sha256
    assert alone == as_before(folder)
    stamp = fer.data.stat_stamp(folder, change_time=True)
    (folder / "notes.txt").write_text("the Kaggle CSV")
    # a finished run's history.csv, one of a run still training (beside its checkpoint's
    # run.json), one a publish or download cut short left without its manifest, one in a run
    # folder renamed: none is a second CSV of the dataset
    for run, record in (("runs/20261206-083000-default-ab12", "manifest.json"),
                        ("runs/20261206-090000-default-cd34", "checkpoint/run.json"),
                        ("artifacts/runs/20261206-093000-wide-full-res-ef56", None),
                        ("best-run", "manifest.json")):
        (folder / run / "checkpoint").mkdir(parents=True)
        (folder / run / "history.csv").write_text("epoch,accuracy\n1,0.5\n")
        if record:
            (folder / run / record).write_text("{}")
    (folder / "manifest.json").write_text("{}")  # the user's own, beside the dataset's CSV
    assert load_dataset(folder).sha256 == alone
    # nor do they change the memo's stamp: a load does not hash the dataset again
    assert fer.data.stat_stamp(folder, change_time=True) == stamp
    (folder / "other.csv").write_text("emotion,pixels,Usage\n")  # a CSV of the user's own
    with pytest.raises(DataError, match=r"holds 2 CSV files \(fer2013\.csv, other\.csv\)"):
        load_dataset(folder)


def test_a_class_folder_linked_to_nothing_is_an_error(tmp_path):
    """A class folder linked from a disk that is not mounted: the listing skipped the broken
    link without a word, and the model trained without that class. A broken link elsewhere
    in the folder (a virtual environment's) is not the dataset's."""
    root = write_image_tree(tmp_path / "ds", per_class=2)
    (root / "venv" / "bin").mkdir(parents=True)
    (root / "venv" / "bin" / "python").symlink_to(tmp_path / "gone" / "python3")
    (root / "__MACOSX" / "train").mkdir(parents=True)  # clutter is never read
    (root / "__MACOSX" / "train" / "happy").symlink_to(tmp_path / "gone" / "happy")
    assert load_dataset(root).train.class_counts()["happy"] == 2
    elsewhere = shutil.move(root / "test", tmp_path / "test")
    (root / "test").symlink_to(tmp_path / "unmounted" / "test", target_is_directory=True)
    with pytest.raises(DataError, match=r"cannot be read: a link to nothing .*ds/test\)"):
        load_dataset(root, require_train=False)  # was a test split missing, or none at all
    (root / "test").unlink()
    shutil.move(elsewhere, root / "test")
    shutil.rmtree(root / "train" / "happy")
    (root / "train" / "happy").symlink_to(tmp_path / "unmounted" / "happy",
                                          target_is_directory=True)
    with pytest.raises(DataError, match=r"ds: cannot be read: a link to nothing \(an unmounted "
                                        r"disk\? a moved folder\?\) \(.*ds/train/happy\)"):
        load_dataset(root)


def test_a_folder_hash_memo_of_an_older_format_is_computed_again(tmp_path, image_tree):
    """The memo of a folder's sha256 is keyed by its stat stamp; one written by a version that
    hashed differently (same stamp) must not survive an upgrade."""
    cache = tmp_path / "cache"
    right = load_dataset(image_tree, cache_dir=cache).sha256
    index = cache / "sha256-index.json"
    memo = json.loads(index.read_text())
    for record in memo.values():
        record.update(sha256="0" * 64)
        del record["format"]
    index.write_text(json.dumps(memo))
    assert load_dataset(image_tree, cache_dir=cache).sha256 == right


def test_test_only_source_can_be_loaded_for_evaluation(tmp_path):
    """A source with only test/ loads without train when training is not requested."""
    root = write_image_tree(tmp_path / "t", splits=("test",))
    dataset = load_dataset(root, require_train=False)
    assert dataset.train is None and len(dataset.test) == 21


def test_another_val_fraction_for_a_source_with_its_own_validation_is_a_warning(shaded_csv,
                                                                                 caplog):
    """A CSV with PrivateTest rows brings its validation split (PublicTest): a --val-fraction
    asked of it cannot be honoured, and the user is told instead of left to assume it was."""
    with caplog.at_level("WARNING", logger="fer.data"):
        dataset = load_dataset(shaded_csv, val_fraction=0.2)
    assert dataset.validation_origin.startswith("source") and len(dataset.validation) == 21
    assert caplog.messages == [f"{shaded_csv}: validation is the source's own split (the CSV's "
                               "PublicTest rows); the validation fraction asked for (--val-fraction, a "
                               "flow's val_fraction: 0.2) is not used"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="fer.data"):
        load_dataset(shaded_csv, seed=7)
    assert caplog.messages == [f"{shaded_csv}: validation is the source's own split (the CSV's "
                               "PublicTest rows); split seed 7 (--split-seed, a flow's "
                               "split_seed) is not used"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="fer.data"):
        load_dataset(shaded_csv)
    assert caplog.messages == []


def test_copies_of_an_image_stay_on_one_side_of_the_carved_split():
    """FER2013's training images hold pixel-identical copies (213 of a carved validation's
    2,872 had one in train): validation must not score images the model trained on. Every
    group of copies lands whole on one side, and each class still gives its share."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 60)
    images = rng.integers(0, 256, (len(labels), 4, 4), dtype=np.uint8)
    for first in range(0, len(labels), 6):  # a third of the images: pairs and triples of copies
        images[first + 1] = images[first]
        images[first + 2] = images[first] if first % 12 == 0 else images[first + 2]
    train, validation = split_validation(Split(images=images, labels=labels), fraction=0.1, seed=3)
    trained_on = {image.tobytes() for image in train.images}
    assert not [image for image in validation.images if image.tobytes() in trained_on]
    held = [image.tobytes() for image in validation.images]
    assert len(set(held)) < len(held)  # groups of copies went to validation whole, too
    assert np.bincount(validation.labels, minlength=7).tolist() == [6] * 7
    again, _ = split_validation(Split(images=images, labels=labels), fraction=0.1, seed=3)
    assert np.array_equal(again.images, train.images)


def test_a_sources_own_validation_leaves_out_copies_of_training_images(tmp_path, caplog):
    """The CSV's PublicTest repeats some Training images: validation is scored without them."""
    rows = [csv_row(label, shaded_image(name, serial=serial), usage)
            for serial, (usage, label, name) in enumerate(
                (usage, label, name) for usage in ("Training", "PublicTest", "PrivateTest")
                for label, name in enumerate(CLASS_NAMES) for _ in range(3))]
    rows.append(csv_row(0, shaded_image("angry", serial=0), "PublicTest"))  # a training image
    with caplog.at_level("INFO", logger="fer.data"):
        dataset = load_dataset(write_csv(tmp_path / "fer2013.csv", rows))
    assert len(dataset.validation) == 21 and len(dataset.train) == 21
    assert "validation is scored without its 1 copy of training images" in caplog.text


def test_validation_split_is_stratified_and_seeded():
    """Same seed -> same split; each class keeps its share; different seed -> different split."""
    labels = np.repeat(np.arange(7), [100, 10, 100, 200, 100, 80, 120])
    split = Split(images=np.arange(len(labels), dtype=np.int64)[:, None, None] * np.ones((1, 2, 2),
                  dtype=np.int64), labels=labels)
    train_a, val_a = split_validation(split, fraction=0.1, seed=7)
    train_b, val_b = split_validation(split, fraction=0.1, seed=7)
    _, val_c = split_validation(split, fraction=0.1, seed=8)
    assert np.array_equal(val_a.images, val_b.images) and np.array_equal(train_a.labels, train_b.labels)
    assert not np.array_equal(val_a.images, val_c.images)
    assert np.bincount(val_a.labels).tolist() == [10, 1, 10, 20, 10, 8, 12]
    assert len(train_a) + len(val_a) == len(split)
    assert not set(val_a.images[:, 0, 0]) & set(train_a.images[:, 0, 0])


def test_a_split_seeds_validation_is_the_same_images_in_every_release():
    """A champion is compared only with runs carved by its split seed (validation_origin
    names the seed): a change to how the generator is drawn, or to the order it shuffles
    in, would carve other images under the same name, and new runs would be compared with
    the champion on different validation images. The indices fer carved on 2026-12-07."""
    labels = np.repeat(np.arange(7), 10)
    split = Split(images=np.arange(70)[:, None, None] * np.ones((1, 2, 2), dtype=np.int64),
                  labels=labels)
    _, validation = split_validation(split, fraction=0.2, seed=1337)
    assert sorted(validation.images[:, 0, 0].tolist()) == [
        6, 7, 11, 14, 21, 22, 30, 37, 40, 48, 55, 56, 65, 69]


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_archive_in_any_entry_order_carves_its_folders_validation(tmp_path, suffix):
    """One --split-seed carves the same validation images from a folder and from an archive
    of it whose entries are in another order (a zip tool's, a file manager's): validation
    is carved by position, and the archive's images had kept the order they were added in."""
    import random
    import tarfile

    folder = write_image_tree(tmp_path / "layout", per_class=12)
    if (folder / "TRAIN").exists():
        pytest.skip("Train/ and train/ are one folder on this case-insensitive file system")
    for n, name in enumerate(CLASS_NAMES):  # Train/ beside train/: one split, two folders
        (folder / "Train" / name).mkdir(parents=True)
        for k in range(4):
            image = shaded_image(name, serial=1000 + 10 * n + k)
            (folder / "Train" / name / f"{k}.png").write_bytes(encode_image(image))
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    random.Random(3).shuffle(files)
    archive = tmp_path / f"ds{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as handle:
            for path in files:
                handle.write(path, path.relative_to(folder).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as handle:
            for path in files:
                handle.add(path, arcname=path.relative_to(folder).as_posix())
    unpacked = load_dataset(folder, cache_dir=tmp_path / "cache", val_fraction=0.25, seed=9)
    packed = load_dataset(archive, cache_dir=tmp_path / "cache", val_fraction=0.25, seed=9)
    for name in ("train", "validation", "test"):
        ours, theirs = getattr(packed, name), getattr(unpacked, name)
        assert np.array_equal(ours.images, theirs.images), name
        assert np.array_equal(ours.labels, theirs.labels), name


def test_decoded_cache_is_used_on_second_load(tmp_path, shaded_csv, monkeypatch):
    """The second load reads the sha256-keyed npz cache (no decoding) and returns the same."""
    cache = tmp_path / "cache"
    first = load_dataset(shaded_csv, cache_dir=cache)
    assert len(list((cache / "decoded").glob(f"{first.sha256}*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds this source")

    monkeypatch.setattr(fer.data, "read_splits", no_decoding)
    second = load_dataset(shaded_csv, cache_dir=cache)
    assert np.array_equal(first.train.images, second.train.images)
    assert np.array_equal(first.test.labels, second.test.labels)


def test_a_cache_of_an_older_format_is_replaced(tmp_path, shaded_csv):
    """A cache written before a decoding change is decoded again and the old file removed."""
    cache = tmp_path / "cache"
    first = load_dataset(shaded_csv, cache_dir=cache)
    (current,) = (cache / "decoded").glob(f"{first.sha256}*.npz")
    old = current.with_name(f"{first.sha256}.v0.npz")
    current.rename(old)
    load_dataset(shaded_csv, cache_dir=cache)
    assert [p.name for p in (cache / "decoded").glob("*.npz")] == [current.name]


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 cut short"])
def test_a_damaged_cache_is_decoded_again(tmp_path, shaded_csv, caplog, damage):
    """A cache file left empty or cut short (a power loss) is a warning and a fresh decode,
    not a traceback on every later run."""
    cache = tmp_path / "cache"
    first = load_dataset(shaded_csv, cache_dir=cache)
    (cached,) = (cache / "decoded").glob(f"{first.sha256}*.npz")
    cached.write_bytes(damage)
    with caplog.at_level("WARNING", logger="fer"):
        again = load_dataset(shaded_csv, cache_dir=cache)
    assert "damaged decode cache" in caplog.text
    assert np.array_equal(first.train.images, again.train.images)
    assert cached.stat().st_size > 1000  # written anew
    assert [p.name for p in (cache / "decoded").iterdir()] == [cached.name]  # no temp left


def test_moving_an_image_to_another_class_folder_is_seen(tmp_path):
    """Relabelling by `mv` keeps file count, sizes and mtimes; the cache must still notice."""
    root = write_image_tree(tmp_path / "layout", per_class=3)
    cache = tmp_path / "cache"
    before = load_dataset(root, cache_dir=cache)
    (root / "train" / "sad" / "0.png").rename(root / "train" / "neutral" / "moved.png")
    after = load_dataset(root, cache_dir=cache)
    assert after.sha256 != before.sha256
    train, validation = after.train.class_counts(), after.validation.class_counts()
    assert (train["sad"] + validation["sad"], train["neutral"] + validation["neutral"]) == (2, 4)


def test_empty_class_is_a_warning_not_a_crash(tmp_path, caplog):
    """A class with no samples loads and logs a warning naming the class."""
    rows = [csv_row(label, shaded_image(name), usage)
            for usage in ("Training", "PublicTest") for label, name in enumerate(CLASS_NAMES)
            if name != "disgust" for _ in range(5)]
    dataset = load_dataset(write_csv(tmp_path / "f.csv", rows))
    assert dataset.test.class_counts()["disgust"] == 0
    assert "disgust" in caplog.text


def test_unknown_class_folder(tmp_path):
    """A class folder outside the canonical list is named with the valid names."""
    root = write_image_tree(tmp_path / "t")
    (root / "train" / "contempt").mkdir()
    (root / "train" / "contempt" / "x.png").write_bytes(encode_image(shaded_image("angry")))
    with pytest.raises(DataError, match=r"entry 'train/contempt/x\.png' is in unknown class "
                                        r"folder 'contempt' \(expected one of angry, disgust"):
        read_splits(root)


@pytest.mark.parametrize("content", [b"this is not a jpeg", b"", b"P5\n70000 70000\n255\n"],
                         ids=["text", "empty", "huge-header"])
def test_undecodable_image(tmp_path, content):
    """A file that is not an image is named; so are an empty one and a header claiming
    more than 2^30 pixels, on which OpenCV raises instead of returning None."""
    root = write_image_tree(tmp_path / "t")
    (root / "test" / "happy" / "broken.jpg").write_bytes(content)
    with pytest.raises(DataError, match=r"entry 'test/happy/broken\.jpg' is not a decodable image"):
        read_splits(root)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_an_image_too_large_for_the_memory_free_is_not_called_undecodable(tmp_path):
    """A valid 20000x20000 PNG (400 MB decoded) read where 200 MB more may be mapped: OpenCV
    raises its out-of-memory cv2.error, which had read as "not a decodable image", blaming
    the file for the machine. It is named as too large for the memory free."""
    root = write_image_tree(tmp_path / "t")
    (root / "test" / "happy" / "big.png").write_bytes(large_grey_png(20000, 20000))
    done = run_short_of_memory(
        "import cv2\nfrom pathlib import Path\nfrom fer.data import read_splits\n"
        "from fer.errors import DataError",  # cv2 first: fer imports it when it decodes
        f"try:\n    read_splits(Path({str(root)!r}))\nexcept DataError as exc:\n    print(exc)")
    assert done.returncode == 0, done.stderr
    assert ("entry 'test/happy/big.png' is too large to decode in the memory free here"
            in done.stdout)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_a_source_the_system_will_not_read_is_one_error(tmp_path):
    """An I/O error reading the source (here /proc/self/mem, which even root cannot read
    from offset 0) and a name too long for the filesystem are DataErrors naming the source,
    not OSError tracebacks."""
    unreadable = tmp_path / "fer2013.csv"
    unreadable.symlink_to("/proc/self/mem")
    with pytest.raises(DataError, match=r"fer2013\.csv: cannot be read: Input/output error"):
        load_dataset(unreadable)
    with pytest.raises(DataError, match=r"a{300}\.csv: cannot be read: File name too long"):
        load_dataset(tmp_path / ("a" * 300 + ".csv"))


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, shaded_csv, caplog):
    """Neither the sha256 memo nor the decode cache can be written (here something stands
    in their way, as a full disk or a read-only FER_DATA_DIR would fail the writes): the
    data still loads, with a warning for each, and the source is not called unreadable."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "decoded").write_text("a file where the folder goes")
    (cache / "sha256-index.json").mkdir()  # a folder where the file goes
    with caplog.at_level("WARNING", logger="fer.data"):
        dataset = load_dataset(shaded_csv, cache_dir=cache)
    assert len(dataset.train) == 21
    assert "cannot write the sha256 memo" in caplog.text
    assert "cannot write the decode cache" in caplog.text


def test_empty_source_folder(tmp_path):
    """A folder without images says so."""
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: no images found \(empty source"):
        read_splits(tmp_path / "nothing")


def test_missing_test_split(tmp_path):
    """A source without test data cannot be trained on or evaluated: the split is named."""
    root = write_image_tree(tmp_path / "t", splits=("train",))
    with pytest.raises(DataError, match=r"missing split 'test'"):
        load_dataset(root)


def test_missing_train_split_when_training(tmp_path):
    """A test-only source is refused for training, with the reason."""
    root = write_image_tree(tmp_path / "t", splits=("test",))
    with pytest.raises(DataError, match=r"missing split 'train'.*can be evaluated, not trained on"):
        load_dataset(root)


@pytest.mark.parametrize("evil", ["../outside.png", "/etc/evil.png", "train/../../evil.png",
                                  "C:evil.png", "c:/evil.png"])
def test_zip_slip_entries_are_refused(tmp_path, evil):
    """Archive entries escaping the target folder are refused, reading and unpacking."""
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("train/happy/ok.png", encode_image(shaded_image("happy")))
        handle.writestr(evil, b"x")
    with pytest.raises(DataError, match=r"evil\.zip: entry .* would be written outside"):
        read_splits(archive)
    with pytest.raises(DataError, match=r"zip-slip"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "outside.png").exists()


def test_a_gzipped_csv_named_csv_is_told_to_be_gunzipped(tmp_path, shaded_csv):
    """A gzipped fer2013.csv (an object stored with Content-Encoding: gzip, which neither
    urllib nor boto3 undoes) had been 'not a readable CSV' or 'missing column(s)'."""
    import gzip

    source = tmp_path / "fer2013.csv"
    source.write_bytes(gzip.compress(shaded_csv.read_bytes()))
    with pytest.raises(DataError, match=r"fer2013\.csv: is gzip-compressed: gunzip it first"):
        read_splits(source)


def test_a_colon_in_a_top_level_name_is_not_zip_slip(tmp_path, image_tree):
    """Windows' `fer2013.csv:Zone.Identifier` beside the data (a WSL user's zip of a folder's
    contents) had refused the whole archive as zip-slip: only a drive (C:) leaves the folder."""
    (image_tree / "readme.txt:Zone.Identifier").write_text("[ZoneTransfer]\nZoneId=3\n")
    archive = zip_folder(image_tree, tmp_path / "faces.zip")
    assert set(read_splits(archive)) == {"train", "test"}
    assert (safe_extract(archive, tmp_path / "out") / "readme.txt:Zone.Identifier").is_file()


def test_a_damaged_lzma_entry_is_named(tmp_path):
    """A zip of LZMA-compressed entries (7z -mm=LZMA) with one damaged: one line naming the
    entry, not an LZMAError traceback (the other compressions' errors were caught)."""
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_LZMA) as handle:
        handle.writestr("train/happy/a.png", encode_image(shaded_image("happy")) * 20)
    data = bytearray(archive.read_bytes())
    start = data.index(b"a.png") + len(b"a.png")
    data[start + 20:start + 60] = bytes(40)  # inside the compressed stream
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"faces\.zip: entry 'train/happy/a\.png' cannot be read "
                                        r"\(Corrupt input data\)"):  # LZMAError's words
        read_splits(archive)


def test_a_folder_of_class_folders_one_level_short_is_not_called_empty(tmp_path, image_tree,
                                                                        caplog):
    """`--data fer2013/test` holds thousands of images in angry/, happy/...: they were
    counted in a warning, then the error said 'no images found (empty source)'. The error
    counts them now, once (no warning before it)."""
    expected = (r"test: no images in <train\|test>/<class>/ folders \(21 files elsewhere, "
                r"the first: '[a-z]+/0\.png'\); expected .*pass the folder that holds train/ "
                r"and test/")
    with caplog.at_level("WARNING", logger="fer"), pytest.raises(DataError, match=expected):
        read_splits(image_tree / "test")
    assert "not read" not in caplog.text


def test_tar_symlink_escape_is_refused(tmp_path):
    """A tar member linking outside the target folder is refused."""
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as handle:
        link = tarfile.TarInfo("train/happy/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        handle.addfile(link)
        data = encode_image(shaded_image("happy"))
        info = tarfile.TarInfo("test/happy/a.png")
        info.size = len(data)
        handle.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"entry 'train/happy/link\.png' links to "
                                        r"'\.\./\.\./\.\./etc/passwd', outside the archive"):
        read_splits(archive)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_link_out_of_an_archive_away_from_the_data_is_left_out(tmp_path, kind):
    """A venv beside the split folders holds links out of it (bin/python ->
    /usr/bin/python3): the unpacked folder reads with them left out, and so does its tarball
    or zip (the whole archive was refused for them). A link out of it that stands where data
    is read is still refused (the test above)."""
    data = encode_image(shaded_image("happy"))
    images = ("ds/train/happy/a.png", "ds/test/happy/a.png")
    outside = ("ds/venv/bin/python", "/usr/bin/python3")
    archive = tmp_path / f"ds.{kind}"
    if kind == "tar":
        with tarfile.open(archive, "w") as handle:
            for name in images:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                handle.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo(outside[0])
            link.type, link.linkname = tarfile.SYMTYPE, outside[1]
            handle.addfile(link)
    else:
        with zipfile.ZipFile(archive, "w") as handle:
            for name in images:
                handle.writestr(name, data)
            link = zipfile.ZipInfo(outside[0])
            link.external_attr = (0o120777 << 16)  # a symbolic link, as zip -y writes it
            handle.writestr(link, outside[1])
    splits = read_splits(archive)
    assert {name: len(split) for name, split in splits.items()} == {"train": 1, "test": 1}


def test_a_chain_of_links_out_of_a_tar_from_where_data_is_read_is_refused(tmp_path):
    """An image that links, through a link away from the data, out of the archive is judged
    where the chain starts, among the images: refused, not left out unsaid."""
    archive = tmp_path / "chain.tar"
    data = encode_image(shaded_image("happy"))
    with tarfile.open(archive, "w") as handle:
        info = tarfile.TarInfo("ds/test/happy/a.png")
        info.size = len(data)
        handle.addfile(info, io.BytesIO(data))
        for name, target in (("ds/train/happy/b.png", "../../x"), ("ds/x", "/etc/passwd")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            handle.addfile(link)
    with pytest.raises(DataError, match=r"entry 'ds/x' links to '/etc/passwd', outside the "
                                        r"archive"):
        read_splits(archive)


def test_links_inside_a_tar_are_read_as_the_files_they_name(tmp_path):
    """A deduplicated folder's tarball stores second copies as hard links, and a symbolic
    link may point at an image elsewhere in it: both are images of their class (hard
    links were left out without a word; a relative symbolic link was refused as zip-slip)."""
    archive = tmp_path / "linked.tar"
    data = encode_image(shaded_image("happy"))
    with tarfile.open(archive, "w") as handle:  # names as `tar -C ds -cf x.tar .` writes them
        for name in ("./train/happy/a.png", "./test/happy/a.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
        links = [("./train/happy/copy.png", tarfile.LNKTYPE, "./train/happy/a.png"),
                 ("./train/sad/pointer.png", tarfile.SYMTYPE, "../happy/a.png"),
                 ("./train/fear/chain.png", tarfile.SYMTYPE, "../sad/pointer.png"),
                 ("./train/calm", tarfile.SYMTYPE, "neutral")]  # a link to nothing: nothing
        for name, kind, target in links:
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            handle.addfile(link)
    splits = read_splits(archive)
    assert sorted(splits["train"].labels.tolist()) == sorted(
        [CLASS_INDEX["happy"]] * 2 + [CLASS_INDEX["sad"], CLASS_INDEX["fear"]])
    assert len(read_splits(safe_extract(archive, tmp_path / "out"))["train"]) == 4


def test_a_symbolic_link_in_a_zip_is_read_as_the_file_it_names(tmp_path):
    """`zip -y` stores a link as an entry holding the path it names: read as that image, not
    refused as "not a decodable image" with the whole dataset."""
    archive = tmp_path / "linked.zip"
    data = encode_image(shaded_image("happy"))
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("train/happy/a.png", data)
        handle.writestr("test/happy/a.png", data)
        for name, target in (("train/happy/b.png", "a.png"), ("train/sad/c.png", "../happy/b.png"),
                             ("train/calm", "neutral")):  # a file, a chain, a folder
            link = zipfile.ZipInfo(name)
            link.external_attr = (0o120777 << 16)  # a symbolic link, as zip -y writes it
            handle.writestr(link, target)
        handle.writestr("train/neutral/", b"")
    assert len(read_splits(archive)["train"]) == 3


def _linked_class_archive(archive: Path, *, links: dict[str, str] | None = None) -> None:
    """train/ and test/ with two happy images each, kept in folders outside them that
    train/happy and test/happy link to (as `tar` without -h and `zip -y` pack a linked class
    folder); train/sad/loop links back up to train/, a loop. ``links``: others instead."""
    images = {f"kept/{folder}/{n}.png": encode_image(shaded_image("happy", serial=serial))
              for serial, (folder, n) in enumerate((f, n) for f in ("happy", "test-happy")
                                                   for n in (1, 2))}
    links = links or {"train/happy": "../kept/happy", "test/happy": "../kept/test-happy",
                      "train/sad/loop": ".."}
    images["train/sad/a.png"] = encode_image(shaded_image("sad"))
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as handle:
            for name, content in images.items():
                handle.writestr(name, content)
            for name, target in links.items():
                link = zipfile.ZipInfo(name)
                link.external_attr = (0o120777 << 16)
                handle.writestr(link, target)
        return
    with tarfile.open(archive, "w") as handle:
        for name, content in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            handle.addfile(info, io.BytesIO(content))
        for name, target in links.items():
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            handle.addfile(link)


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
def test_class_folders_linked_inside_an_archive_are_read(tmp_path, suffix):
    """An archive of a tree whose class folders are links (packed without following them)
    reads as the tree itself does: each linked folder's images in its class (a tar read
    them as nothing, silently; a zip as one file that is no image), and unpacking it gives
    the same images. A link back up the tree is not followed."""
    archive = tmp_path / f"linked{suffix}"
    _linked_class_archive(archive)
    for source in (archive, safe_extract(archive, tmp_path / "out")):
        splits = read_splits(source)
        assert splits["train"].class_counts()["happy"] == 2, source
        assert splits["train"].class_counts()["sad"] == 1, source
        assert splits["test"].class_counts()["happy"] == 2, source


@pytest.mark.parametrize("suffix", [".zip", ".tar"])
@pytest.mark.parametrize("links", [
    {"train/happy": "../kept/happy", "test/happy": "../kept/happy"},  # one folder, twice
    {"train/happy": "../kept/happy", "test/happy": "../train/happy"},
    {"train": "kept", "test/happy": "../kept/happy"},  # one inside the other
])
def test_a_folder_linked_into_two_splits_of_an_archive_is_refused(tmp_path, suffix, links):
    """README: linked folders are read once each. One folder linked as train/happy and
    test/happy was read as both, and its images tested a model trained on them."""
    archive = tmp_path / f"twice{suffix}"
    _linked_class_archive(archive, links=links)
    with pytest.raises(DataError, match=rf"twice\{suffix}: '(test|train)(/happy)?' reads the "
                                        r"same folder as '(kept|train|test)(/happy)?', through a "
                                        r"symbolic link: its "
                                        r"images would be read twice"):
        read_splits(archive)


def test_split_links_to_folders_one_inside_the_other_sharing_no_class_folder_are_read(
        tmp_path):
    """`train -> raw` and `test -> raw/heldout`: nested, but images are read at
    <split>/<class>/ only, so no face is read twice (train/heldout/angry is one folder too
    deep); the archive reads as the unpacked tree does, not refused."""
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("raw/angry/1.png", encode_image(shaded_image("angry", serial=1)))
        handle.writestr("raw/heldout/angry/2.png", encode_image(shaded_image("angry", serial=2)))
        for name, target in {"train": "raw", "test": "raw/heldout"}.items():
            link = zipfile.ZipInfo(name)
            link.external_attr = (0o120777 << 16)
            handle.writestr(link, target)
    splits = read_splits(archive)
    assert splits["train"].class_counts()["angry"] == 1
    assert splits["test"].class_counts()["angry"] == 1


@pytest.mark.parametrize("link", ["test", "test/happy"])
def test_a_folder_linked_into_two_splits_is_refused(tmp_path, link):
    """`ln -s train test` to get past "missing split 'test'" (or one class folder linked
    into both splits) read the training images as the test split too, and the run reported
    a test accuracy on images it trained on, without a word."""
    root = write_image_tree(tmp_path / "ds", per_class=2)
    shutil.rmtree(root / link)
    (root / link).symlink_to(root / link.replace("test", "train"), target_is_directory=True)
    with pytest.raises(DataError, match=r"ds: '(test|train)/[a-z]+' reads the same folder as "
                                        r"'(train|test)/[a-z]+', through a symbolic link"):
        read_splits(root)


def test_a_linked_folder_outside_the_class_folders_may_be_reached_twice(tmp_path):
    """A venv beside the images (`python -m venv` links lib64 to lib; TensorFlow installs
    folders called test/ and train/) reaches the same folders twice: not data, so read as
    before, not refused as a class folder read twice."""
    root = write_image_tree(tmp_path / "ds", per_class=2)
    package = root / "venv" / "lib" / "site-packages" / "tensorflow" / "_api" / "v2"
    for split in ("train", "test"):
        (package / split / "experimental").mkdir(parents=True)
        (package / split / "experimental" / "__init__.py").write_text("")
    (root / "venv" / "lib64").symlink_to("lib", target_is_directory=True)
    assert read_splits(root)["test"].class_counts()["happy"] == 2


def test_class_folders_linked_from_elsewhere_are_read(tmp_path):
    """A class folder that is a symbolic link (images kept on a bigger disk) is read (the
    listing skipped it and the model trained without that class); a link back up the tree
    is not followed round and round."""
    root = write_image_tree(tmp_path / "ds", per_class=2)
    elsewhere = tmp_path / "big-disk" / "happy"
    shutil.move(root / "train" / "happy", elsewhere)
    (root / "train" / "happy").symlink_to(elsewhere, target_is_directory=True)
    (root / "train" / "sad" / "loop").symlink_to(root / "train", target_is_directory=True)
    (root / "all").symlink_to(root / "train", target_is_directory=True)  # sorts first
    counts = read_splits(root)["train"].class_counts()
    assert counts["happy"] == 2 and counts["sad"] == 2 and counts["neutral"] == 2


def test_missing_source_and_unsupported_type(tmp_path):
    """Paths that do not exist, and files of unknown type, get one clear line."""
    with pytest.raises(DataError, match=r"nope\.csv: data source not found"):
        load_dataset(tmp_path / "nope.csv")
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match=r"data\.parquet: unsupported source type"):
        read_splits(tmp_path / "data.parquet")


@pytest.mark.parametrize("layout", ["csv", "images"])
def test_damaged_zip_entry_is_named(tmp_path, shaded_csv, layout):
    """An intact index with damaged entry data (bad CRC) names the entry, no traceback."""
    archive = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as handle:
        if layout == "csv":
            handle.writestr("fer2013.csv", shaded_csv.read_bytes())
        else:
            handle.writestr("train/happy/0.png", encode_image(shaded_image("happy")))
    data = bytearray(archive.read_bytes())
    data[100] ^= 0xFF  # inside the first entry's stored bytes, after its 30-byte local header
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"damaged\.zip: entry '.*' cannot be read \(Bad CRC"):
        read_splits(archive)


def test_corrupt_zip(tmp_path):
    """A truncated or non-zip .zip is named as unreadable."""
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match=r"broken\.zip: not a readable archive"):
        read_splits(tmp_path / "broken.zip")


PAGE = b"<!DOCTYPE html><html><body>Sign in</body></html>"


def _zip_bytes() -> bytes:
    held = io.BytesIO()
    with zipfile.ZipFile(held, "w") as handle:
        handle.writestr("notes.txt", "x")
    return held.getvalue()


@pytest.mark.parametrize(("name", "content", "said"), [
    # a share's sign-in page saved under the name asked for (zipfile: "File is not a zip file")
    ("fer2013.zip", PAGE, r"fer2013\.zip: not a readable archive \(it is a web page\)"),
    ("fer2013", PAGE, r"fer2013: unsupported source type .*; it is a web page \(a download "
                      r"site's page saved in place of the file\?\)"),
    # pandas had named the columns missing
    ("fer2013.csv", PAGE, r"fer2013\.csv: is a web page .*, not a CSV"),
    ("fer2013.csv", _zip_bytes(), r"fer2013\.csv: its first bytes are a \.zip's, not a CSV's: "
                                  r"give it the suffix \.zip"),
    # any text had been told to take the suffix .csv
    ("README.md", b"# notes\n", r"README\.md: unsupported source type .*; it is text, and its "
                               r"first line is not the FER2013 CSV's header emotion,pixels,Usage"),
])
def test_a_file_of_another_kind_is_said_what_it_is(tmp_path, name, content, said):
    """Whatever its name, a file that is no dataset fer reads is said what it is, in one
    line, by its first bytes."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=said) as raised:
        read_splits(tmp_path / name)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("content", "said"), [
    (b"<!doctype html><html>sign in</html>", r"it is a web page"),
    (b"x", r"it is text, and its first line is not the FER2013 CSV's header "
           r"emotion,pixels,Usage"),
    (b"emotion,pixels,Usage\n", r"its first bytes are a \.csv's"),
    # mtime fixed: the bytes name the test, and both xdist processes must collect one name
    (gzip.compress(b"emotion,pixels,Usage\n0,1 2 3,Training\n", mtime=0),
     r"gzip-compressed, and not a tarball: gunzip it first"),
])
def test_a_tar_gz_that_is_not_a_tarball_is_said_in_one_line(tmp_path, content, said):
    """A `.tar.gz` URL serving a login page, a stray file, a gzipped CSV: one line saying
    what the file is (tarfile's own error lists every method it tried, a line each)."""
    (tmp_path / "ds.tar.gz").write_bytes(content)
    with pytest.raises(DataError, match=rf"ds\.tar\.gz: not a readable archive \({said}\)$") as raised:
        read_splits(tmp_path / "ds.tar.gz")
    assert "\n" not in str(raised.value)


def test_a_gzipped_csv_without_a_suffix_is_not_called_a_tarball(tmp_path):
    """`--data fer2013.csv.gz`: not told to rename it .tar.gz (it would then fail as a
    damaged tarball), but to gunzip it."""
    (tmp_path / "fer2013.csv.gz").write_bytes(gzip.compress(b"emotion,pixels,Usage\n"))
    with pytest.raises(DataError, match=r"unsupported source type .*; it is gzip-compressed, "
                                        r"and not a tarball: gunzip it first$"):
        load_dataset(tmp_path / "fer2013.csv.gz")


def test_a_file_name_that_is_not_utf8_is_read_like_any_other(tmp_path, image_tree):
    """An image saved by a tool writing Latin-1 names (`café.png` as bytes 63 61 66 e9): read
    and hashed like the others; hashing its name raised UnicodeEncodeError."""
    happy = image_tree / "train" / "happy"
    before = load_dataset(image_tree, cache_dir=tmp_path / "cache")
    shutil.copy(next(happy.iterdir()), os.fsdecode(os.fsencode(happy) + b"/caf\xe9.png"))
    after = load_dataset(image_tree, cache_dir=tmp_path / "cache")
    assert len(after.train) + len(after.validation) == len(before.train) + len(before.validation) + 1
    assert after.sha256 != before.sha256


def test_image_zip_and_folder_agree(tmp_path, image_tree):
    """The same images read from a folder and from its zip give the same arrays."""
    from_folder = read_splits(image_tree)
    from_zip = read_splits(zip_folder(image_tree, tmp_path / "layout.zip"))
    for name in ("train", "test"):
        assert np.array_equal(from_folder[name].images, from_zip[name].images)
        assert np.array_equal(from_folder[name].labels, from_zip[name].labels)


def test_csv_and_image_layout_of_same_data_agree(tmp_path, fer_subset):
    """The real subset written as a CSV parses to the same pixels and labels as the images."""
    images = read_splits(fer_subset)
    rows = [csv_row(int(label), image, usage)
            for name, usage in (("train", "Training"), ("test", "PublicTest"))
            for label, image in zip(images[name].labels, images[name].images, strict=True)]
    splits = read_splits(write_csv(tmp_path / "subset.csv", rows))
    for name in ("train", "test"):
        assert np.array_equal(images[name].images, splits[name].images)
        assert np.array_equal(images[name].labels, splits[name].labels)


def test_real_subset_labels_follow_folder_names(fer_subset):
    """Counts per class name in the real archive subset match what was put in per folder.

    The subset gives each class its own count, so any two labels swapped would show here.
    """
    splits = read_splits(fer_subset)
    with zipfile.ZipFile(fer_subset) as handle:
        names = handle.namelist()
    for split in ("train", "test"):
        in_folders = {name: sum(1 for n in names if n.startswith(f"{split}/{name}/"))
                      for name in CLASS_NAMES}
        assert len(set(in_folders.values())) == len(CLASS_NAMES)
        assert splits[split].class_counts() == in_folders
    assert CLASS_INDEX["neutral"] == 6


def test_a_spread_sample_reaches_both_ends_and_never_exceeds_the_images():
    """pca_first_conv and the batch-norm recalibration sample this way: class-ordered sources
    must not give them the first class only."""
    from fer.data import spread_sample

    images = np.arange(100)
    sample = spread_sample(images, 5)
    assert sample[0] == 0 and sample[-1] == 99 and len(sample) == 5
    assert len(spread_sample(images, 1000)) == 100


@pytest.mark.parametrize(("suffix", "depth", "options"), [
    (".png", np.uint8, []),
    (".png", np.uint16, []),  # 16-bit: alpha 65535 is opaque
    (".webp", np.uint8, [64, 101]),  # cv2.IMWRITE_WEBP_QUALITY 101: lossless, alpha exact
])
def test_an_image_with_alpha_is_seen_on_white(suffix, depth, options):
    """A transparent cut-out of a face (RGB 0 where alpha is 0, as editors save it) was seen
    on black, which no viewer shows; it is now composited on white, half-transparent pixels
    half way, in training and in `fer predict` alike (both decode here)."""
    import cv2

    scale = np.iinfo(depth).max // 255
    colour = np.zeros((4, 4, 3), depth)
    colour[:, 1:] = 100 * scale
    alpha = np.zeros((4, 4), depth)
    alpha[:, 1:3], alpha[:, 3] = 255 * scale, 128 * scale
    ok, encoded = cv2.imencode(suffix, np.dstack([colour, alpha]), options)
    assert ok
    gray = fer.data.decode_grayscale(encoded.tobytes())
    assert gray.dtype == np.uint8 and gray.shape == (4, 4)
    assert (gray[:, 0] == 255).all() and (gray[:, 1:3] == 100).all()
    assert (abs(gray[:, 3].astype(int) - round(100 * 128 / 255 + 255 * 127 / 255)) <= 1).all()


def test_a_large_cut_out_is_composited_in_a_few_bytes_a_pixel():
    """A large transparent PNG: composited over the whole image at once, its float32
    temporaries took about 21 bytes a pixel beside the 4 of its colour decode (2.5 GB for
    a 100-megapixel cut-out, an out-of-memory kill in a small container). In strips of
    rows it takes a few, and gives the same pixels."""
    import tracemalloc

    import cv2

    rgba = np.random.default_rng(0).integers(0, 256, (2000, 2000, 4), dtype=np.uint8)
    encoded = cv2.imencode(".png", rgba)[1].tobytes()
    as_saved = np.frombuffer(encoded, np.uint8)
    gray = cv2.imdecode(as_saved, cv2.IMREAD_GRAYSCALE)
    opacity = cv2.imdecode(as_saved, cv2.IMREAD_UNCHANGED)[..., 3].astype(np.float32) / 255
    expected = np.rint(gray * opacity + 255.0 * (1.0 - opacity)).astype(np.uint8)
    tracemalloc.start()
    try:
        composited = fer.data.decode_grayscale(encoded)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(composited, expected)
    assert peak < 10 * gray.size, f"{peak / gray.size:.1f} bytes a pixel"


def test_only_images_whose_headers_say_they_have_alpha_are_looked_at_for_it():
    """The second decode, with alpha, is for PNGs and WebPs whose headers say they have
    transparency: FER's JPEGs, opaque PNGs and lossy WebPs cost what they did."""
    import cv2

    def encoded(suffix, channels, *options):
        return cv2.imencode(suffix, np.full((4, 4, channels), 90, np.uint8),
                            list(options))[1].tobytes()

    opaque = [encoded(".png", 3), encoded(".png", 1), encoded(".jpg", 3),
              encoded(".webp", 3, cv2.IMWRITE_WEBP_QUALITY, 80),
              encoded(".webp", 3, cv2.IMWRITE_WEBP_QUALITY, 101)]
    assert not any(fer.data._may_have_alpha(data) for data in opaque)
    assert all(fer.data._may_have_alpha(encoded(suffix, 4, *options)) for suffix, *options in
               [(".png",), (".webp", cv2.IMWRITE_WEBP_QUALITY, 80),
                (".webp", cv2.IMWRITE_WEBP_QUALITY, 101)])
    assert (fer.data.decode_grayscale(encoded(".png", 3)) == 90).all()


def _transparent_left_column() -> np.ndarray:
    """4x6 RGBA: the left column transparent (RGB 0, as editors save it), the rest grey 100."""
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, 1:] = (100, 100, 100, 255)
    return rgba


def test_a_palette_png_with_transparency_is_seen_on_white():
    """pngquant's and TinyPNG's output (palette + tRNS chunk, the usual web cut-out) is
    transparent too; its header says palette, not alpha."""
    import io

    from PIL import Image

    saved = io.BytesIO()
    Image.fromarray(_transparent_left_column(), "RGBA").quantize(4).save(saved, "PNG")
    assert saved.getvalue()[25] == 3  # palette
    gray = fer.data.decode_grayscale(saved.getvalue())
    assert (gray[:, 0] == 255).all() and (gray[:, 1:] == 100).all()


def test_transparency_follows_the_exif_orientation():
    """A PNG saved upside down with EXIF orientation 3 (a phone's cut-out): the grey is
    turned by it, so its alpha must be too (read unturned, the face was whitened and the
    background left black)."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: rotate 180
    saved = io.BytesIO()
    Image.fromarray(_transparent_left_column(), "RGBA").save(saved, "PNG", exif=exif)
    gray = fer.data.decode_grayscale(saved.getvalue())
    assert (gray[:, -1] == 255).all() and (gray[:, :-1] == 100).all()


def test_a_decode_cache_of_a_newer_fer_sharing_the_folder_is_kept(tmp_path):
    """A worker image with an older fer and a CLI with a newer one on one FER_DATA_DIR:
    each removes only older formats' caches, not the other's, which it would decode
    again on every load."""
    from fer.data import CACHE_FORMAT, DECODED, source_sha256

    root = write_image_tree(tmp_path / "ds", per_class=1)
    cache = tmp_path / "cache"
    digest = source_sha256(root)
    (cache / DECODED).mkdir(parents=True)
    older, newer = (cache / DECODED / f"{digest}.v{v}.npz"
                    for v in (CACHE_FORMAT - 1, CACHE_FORMAT + 1))
    older.write_bytes(b"old")
    newer.write_bytes(b"new")
    load_dataset(root, cache_dir=cache)
    assert (cache / DECODED / f"{digest}.v{CACHE_FORMAT}.npz").is_file()
    assert not older.exists() and newer.read_bytes() == b"new"


def test_a_class_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """A folder fer may not list (another user's, mode 000: simulated, as tests run as
    root) stops the load with its name, instead of training without that class."""
    root = write_image_tree(tmp_path / "ds", per_class=1)
    locked = root / "train" / "disgust"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=rf"cannot be read: Permission denied \({locked}\)"):
        load_dataset(root)
