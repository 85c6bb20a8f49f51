"""Dataset sources: the original ``fer2013.csv`` and Kaggle's image-folder layout.

Both forms arrive plain, as a folder, or inside a .zip/.tar(.gz) archive (the CSV parser
itself is fer.csv_reader). Labels are
mapped to ``fer.labels.CLASS_NAMES`` by name, never by position. Decoded arrays are
cached as ``.npz`` keyed by the source's sha256 so a second load costs milliseconds.

Splits: image layout ``train/`` -> train, ``test/`` -> test; CSV ``Training`` -> train,
``PublicTest`` -> validation, ``PrivateTest`` -> test (without PrivateTest, PublicTest is
the test split). A missing validation split is carved from train, stratified and seeded.
The test split is never used for model selection.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import logging
import os
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from fer.config import DEFAULT_SEED, DEFAULT_VAL_FRACTION
from fer.csv_reader import read_fer_csv
from fer.errors import DataError
from fer.files import remove_abandoned, temporaries_of, written_whole
from fer.labels import CLASS_INDEX, CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from fer.manifest import RUN_ID_PATTERN, read_json, write_json

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "test")
# The training history `fer train` writes into a run folder: a run trained into the
# dataset's folder leaves it there, not a second CSV.
RUN_HISTORY = "history.csv"
# How a folder's sha256 is computed; memos of another format are computed again. 2: clutter
# (dotfiles such as fetch-data's unpack marker, __MACOSX, Thumbs.db) is left out. 3: only
# the files the dataset is read from (the split folders' files, or the one CSV), so that
# runs/, artifacts/ or notes written beside them leave it as it was (a folder holding
# nothing else hashes as under 2).
HASH_FORMAT = 3
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# How an image file OpenCV cannot decode is described, in datasets and in `fer predict`.
UNDECODABLE = ("not a decodable image (expected a jpg, png or other format OpenCV reads, "
               "of at most 2^30 pixels)")
# How an image is described that OpenCV could not find the memory to decode (a valid file,
# so not "undecodable": the same file decodes where there is more memory).
TOO_LARGE_FOR_MEMORY = ("too large to decode in the memory free here (expected an image of "
                        "fewer pixels, or more memory: a pixel takes a byte or more)")
# What counts as an image when telling an image layout from a CSV beside other files: the
# file types OpenCV's imread reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".jp2", ".bmp", ".dib", ".gif",
                  ".webp", ".avif", ".tif", ".tiff", ".pbm", ".pgm", ".ppm", ".pxm", ".pnm",
                  ".pfm", ".sr", ".ras", ".exr", ".hdr", ".pic")
CACHE_FORMAT = 8  # bump when decoding changes (2: one resize for train and predict; 3: each
# CSV row's pixel count checked, so a cache decoded with pixels shifted between rows is redone;
# 4: one CSV beside image folders is not the dataset, labels are ASCII digits only; 5: images
# with an alpha channel are seen on white; 6: so are PNGs with tRNS, turned alpha follows EXIF;
# 7: an archive's images in name order, as its unpacked folder's, so that both split alike;
# 8: a side that shrinks is area-averaged where the other grows, as where both shrink)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ALPHA_COLOUR_TYPES = (4, 6)  # IHDR colour type: grey + alpha, RGB + alpha
PNG_TRNS_COLOUR_TYPES = (2, 3)  # RGB, palette: transparent with a tRNS chunk (pngquant's)


@dataclass(frozen=True)
class Split:
    """Images (uint8, n x 48 x 48, raw 0-255 pixels) and labels (indices into CLASS_NAMES)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=NUM_CLASSES)
        return {name: int(n) for name, n in zip(CLASS_NAMES, counts, strict=True)}


@dataclass(frozen=True)
class Dataset:
    """The splits of one source. ``train``/``validation`` are None for test-only sources."""

    source: str
    sha256: str
    test: Split
    train: Split | None = None
    validation: Split | None = None
    # "source, copies of training images left out" (the CSV's PublicTest), or
    # "carved from train (0.1, seed N, copies on one side)"
    validation_origin: str = "none"


# --------------------------------------------------------------------------- loading


def load_dataset(
    source: Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    cache_dir: Path | None = None,
    require_train: bool = True,
) -> Dataset:
    """Read ``source`` (file, folder or archive), using the decoded cache when present.

    A source the system will not read (permissions, a name too long, an I/O error) is a
    DataError naming it; a decode cache that cannot be written is a warning, not a stop.
    """
    source = Path(source)
    check_val_fraction(val_fraction)
    try:
        if not source.exists():
            raise DataError(f"{source}: data source not found (expected a .csv, a folder or "
                            "an archive)")
        if cache_dir:
            tag_cache_dir(cache_dir)  # before hashing: it may lie inside ``source``
        digest = source_sha256(source, cache_dir=cache_dir)
        splits = _load_cached(cache_dir, digest) if cache_dir else None
        if splits is None:
            splits = read_splits(source)
            if cache_dir:
                _save_cached(cache_dir, digest, splits)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(source) else ""
        raise DataError(f"{source}: cannot be read: {exc.strerror or exc}{where}") from None
    return _assemble(source, digest, splits, val_fraction=val_fraction, seed=seed,
                     require_train=require_train)


def _assemble(source: Path, digest: str, splits: dict[str, Split], *, val_fraction: float,
              seed: int, require_train: bool) -> Dataset:
    if "test" not in splits:
        raise DataError(f"{source}: missing split 'test' (expected test/<class>/ folders "
                        "or PublicTest/PrivateTest rows)")
    if require_train and "train" not in splits:
        raise DataError(f"{source}: missing split 'train' (expected train/<class>/ folders "
                        "or Training rows); a test-only source can be evaluated, not trained on")
    for name, split in splits.items():
        empty = [c for c, n in split.class_counts().items() if n == 0]
        if empty:
            log.warning("%s: split '%s' has no samples of class %s", source, name, ", ".join(empty))
    train, validation, origin = splits.get("train"), splits.get("validation"), "source"
    unused = [*([f"the validation fraction asked for (--val-fraction, a flow's val_fraction: "
                 f"{val_fraction:g})"] if val_fraction != DEFAULT_VAL_FRACTION else []),
              *([f"split seed {seed} (--split-seed, a flow's split_seed)"]
                if seed != DEFAULT_SEED else [])]
    if validation is not None and unused:
        log.warning("%s: validation is the source's own split (the CSV's PublicTest rows); %s "
                    "%s not used", source, " and ".join(unused),
                    "are" if len(unused) > 1 else "is")
    if train is not None and validation is None:
        train, validation = split_validation(train, fraction=val_fraction, seed=seed)
        origin = f"carved from train ({val_fraction:g}, seed {seed}, {COPIES_ON_ONE_SIDE})"
    elif train is not None:
        validation = _without_copies_of(validation, train, source=source)
        origin = f"source, {COPIES_LEFT_OUT}"
    return Dataset(source=str(source), sha256=digest, test=splits["test"], train=train,
                   validation=validation, validation_origin=origin)


def spread_sample(images: np.ndarray, count: int) -> np.ndarray:
    """``count`` of ``images`` (all if fewer) spread evenly over them, not the first ones:
    a source may list its images class by class."""
    return images[np.linspace(0, len(images) - 1, min(count, len(images))).astype(int)]


# How the carved validation split keeps copies apart; recorded in its origin, which the
# champion rule compares, so that runs on splits carved before (copies on both sides:
# validation accuracy inflated by memorised images) are not compared with later ones.
COPIES_ON_ONE_SIDE = "copies on one side"
COPIES_LEFT_OUT = "copies of training images left out"  # a source's own validation split


def split_validation(split: Split, *, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded split: the same data and seed always give the same indices.

    Pixel-identical copies go to the same side: FER2013's training images hold hundreds of
    them (213 of a carved validation's 2,872 images had a copy in train), and a validation
    image the model trained on scores its memory, not how it generalises, favouring the
    later, more overfitted epochs. Each class gives ``fraction`` of its images, counted in
    whole groups of copies (a group goes with its first image's class).
    """
    rng = np.random.default_rng(seed)
    first_copy = _first_copies(split.images)
    group_size = np.bincount(first_copy, minlength=len(split))
    is_val = np.zeros(len(split), dtype=bool)
    for class_index in range(NUM_CLASSES):
        wanted = int(round(np.count_nonzero(split.labels == class_index) * fraction))
        groups = np.flatnonzero((split.labels == class_index)
                                & (first_copy == np.arange(len(split))))
        rng.shuffle(groups)
        taken = 0
        for group in groups:  # in the shuffled order, each group that still fits
            if taken + group_size[group] <= wanted:
                is_val[group] = True
                taken += group_size[group]
    is_val = is_val[first_copy]  # each image goes where its group's first copy went
    return _take(split, ~is_val), _take(split, is_val)


def _first_copies(images: np.ndarray) -> np.ndarray:
    """For each image, the index of the first image with the same pixels (itself if none),
    found by 128-bit digests (sorting the raw rows took 2.8 s for FER2013's training set)."""
    rows = np.ascontiguousarray(images).reshape(len(images), -1)
    digests = np.array([hashlib.blake2b(row, digest_size=16).digest() for row in rows],
                       dtype="S16")
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def _without_copies_of(validation: Split, train: Split, *, source: Path) -> Split:
    """A source's own validation split without its copies of training images (FER2013's
    CSV: PublicTest repeats some Training images), for the reason split_validation gives."""
    both = np.concatenate([train.images, validation.images])
    copies = _first_copies(both)[len(train):] < len(train)
    if copies.any():
        log.info("%s: validation is scored without its %d cop%s of training images", source,
                 int(copies.sum()), "y" if copies.sum() == 1 else "ies")
    return _take(validation, ~copies)


def _take(split: Split, mask: np.ndarray) -> Split:
    return Split(images=split.images[mask], labels=split.labels[mask])


# --------------------------------------------------------------------------- source kinds


def read_splits(source: Path) -> dict[str, Split]:
    """Decode every split a source holds, keyed 'train', 'validation', 'test'."""
    name = source.name.lower()
    if source.is_dir():
        return _splits_of(list(_folder_entries(source)), source=source, separator="/")
    if name.endswith(".csv"):
        return _csv_splits(source.read_bytes(), origin=str(source))
    if name.endswith(ARCHIVE_SUFFIXES):
        with _archive_entries(source) as entries:
            return _splits_of(_without_tagged_caches(entries), source=source, separator="!")
    suffix = suffix_by_content(source)
    if suffix == ".csv" and not has_fer_csv_header(source):  # notes, a README: no dataset
        hint = f"; {TEXT_NOT_FER_CSV}"
    elif suffix not in (None, WEB_PAGE, GZIP):
        hint = (f"; its first bytes are a {suffix}'s: name it {source.name}{suffix}, or fetch "
                "it with `fer fetch-data --source`, which reads a file by its first bytes")
    else:
        hint = {GZIP: f"; it is {_GZIP_NOT_TAR}", WEB_PAGE: f"; it {WEB_PAGE_SAVED}"}.get(
            suffix, "")
    raise DataError(f"{source}: unsupported source type (expected .csv, .zip, .tar, .tar.gz "
                    f"or a folder with train/ and test/){hint}")


try:
    from lzma import LZMAError
    _LZMA_ERRORS: tuple[type[Exception], ...] = (LZMAError,)
except ImportError:  # a Python built without xz support: tarfile reads the rest without it
    _LZMA_ERRORS = ()

WEB_PAGE = "web page"
WEB_PAGE_SAVED = "is a web page (a download site's page saved in place of the file?)"
FER_CSV_HEADER = ("emotion", "pixels", "Usage")
TEXT_NOT_FER_CSV = ("it is text, and its first line is not the FER2013 CSV's header "
                    f"{','.join(FER_CSV_HEADER)}")
GZIP = "gzip"  # a gzip holding something other than a tarball (a gzipped CSV)
_GZIP_NOT_TAR = "gzip-compressed, and not a tarball: gunzip it first"


def suffix_by_content(path: Path) -> str | None:
    """The suffix a file's first bytes say it should have: ".zip", ".tar.gz" (a gzip whose
    content starts as a tar does), ".tar", ".csv" for other text; WEB_PAGE for HTML or XML
    (a download site's page in place of the file); GZIP for another gzip (a gzipped CSV:
    named .tar.gz it would fail as a damaged tarball); None for another binary kind."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    return _suffix_of_head(head, gunzipped=lambda: _gunzipped_head(path))


def _suffix_of_head(head: bytes, *, gunzipped: Callable[[], bytes]) -> str | None:
    """suffix_by_content of a file's first 512 bytes; ``gunzipped`` gives those of what a
    gzip holds."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ".zip"
    if head.startswith(b"\x1f\x8b"):
        return ".tar.gz" if _is_tar(gunzipped()) else GZIP
    if _is_tar(head):
        return ".tar"
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().lower().startswith(
            (b"<!doctype html", b"<html", b"<!--", b"<?xml", b"<head", b"<body")):
        return WEB_PAGE
    if b"\x00" not in head and not head.startswith((b"BZh", b"\xfd7zXZ")):  # bzip2, xz
        return ".csv"
    return None


def has_fer_csv_header(path: Path) -> bool:
    """Whether a text file's first line holds FER2013's header (emotion,pixels,Usage), as a
    lenient reader sees it: without a byte-order mark, spaces or quotes; its end CR LF, LF
    or CR alone (as old Mac exports write, which fer's CSV reader takes)."""
    with open(path, "rb") as handle:
        line = re.split(rb"\r\n|\r|\n", handle.read(64 * 1024), maxsplit=1)[0]
    text = line.decode("utf-8", errors="replace").removeprefix("\ufeff")
    return set(FER_CSV_HEADER) <= {field.strip().strip('"').strip() for field in text.split(",")}


def _is_tar(head: bytes) -> bool:
    """A POSIX or GNU tar's first header ("ustar" at 257); fer's archives all have one."""
    return head[257:262] == b"ustar"


def _gunzipped_head(path: Path) -> bytes:
    """The first 512 bytes a gzip decompresses to; what it gives before failing if damaged."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a gzip header and trailer
    with open(path, "rb") as handle:
        try:
            return inflater.decompress(handle.read(64 * 1024), 512)
        except zlib.error:
            return b""


def _splits_of(entries: list[tuple[str, Callable[[], bytes]]], *, source: Path,
               separator: str) -> dict[str, Split]:
    """A folder's or an archive's splits, decided alike for both, so that an archive and
    its unpacked folder read the same: its images where it holds an image layout, else its
    one CSV, at any depth (named ``source`` + ``separator`` + its path)."""
    csvs = dict(_csv_entries(entries))
    csv = _the_csv(list(csvs), entries, source=source)
    if csv is not None:
        return _csv_splits(csvs[csv](), origin=f"{source}{separator}{csv}")
    return read_image_layout(iter(entries), origin=str(source))


def _read_entries(entries: list[tuple[str, Callable[[], bytes]]], *, source: Path
                  ) -> list[tuple[str, Callable[[], bytes]]]:
    """The entries ``_splits_of`` reads the dataset from: the one CSV, or the files in split
    folders (``<split>/<class>/<file>``; CSVs there are other files). What the data sha256
    covers: a run folder, a store or notes beside the dataset do not change it."""
    csv = _dataset_csv(entries, source=source)
    if csv is not None:
        return [(n, read) for n, read in entries if n == csv]
    return [(n, read) for n, read in entries
            if _in_a_split_folder(PurePosixPath(n).parts) and not n.lower().endswith(".csv")]


def _folder_read_entries(folder: Path) -> list[tuple[str, Callable[[], bytes]]]:
    """``_read_entries`` of a folder: what its data sha256 and memo stamp cover."""
    return _read_entries(list(_folder_entries(folder)), source=folder)


def _in_a_split_folder(parts: tuple[str, ...]) -> bool:
    return len(parts) >= 3 and parts[-3].lower() in SPLIT_FOLDERS and not _is_noise(parts)


def _csv_entries(entries: list[tuple[str, Callable[[], bytes]]]):
    """The CSVs that may be the dataset: not clutter, nor a run's history.csv (`fer train
    --data .` in the CSV's folder writes runs/ there; so does a folder store)."""
    names = {n for n, _ in entries}
    return [(n, read) for n, read in entries
            if n.lower().endswith(".csv") and not _is_noise(PurePosixPath(n).parts)
            and not _in_a_run_folder(n, names)]


def _in_a_run_folder(name: str, names: set[str]) -> bool:
    """Whether ``name`` is a run's history.csv: in a folder named as `fer train` names runs
    (``20261125-134501-default-3f9a``), or beside a run's manifest.json or checkpoint (a
    run folder renamed). A CSV of the user's own beside a manifest.json is not one."""
    folder, file = posixpath.split(name)
    if file != RUN_HISTORY:
        return False
    return bool(RUN_ID_PATTERN.fullmatch(posixpath.basename(folder))) or any(
        posixpath.join(folder, *record) in names
        for record in (("manifest.json",), ("checkpoint", "run.json")))


def _in_split_folders(entries: list[tuple[str, Callable[[], bytes]]]) -> bool:
    """Whether any entry is an image laid out as ``<split>/<class>/<image>`` at any depth,
    not clutter (a `scripts/test/check.py` or `src/train/models/net.py` is not one)."""
    return any(_is_layout_image(PurePosixPath(name).parts) for name, _ in entries)


def _is_layout_image(parts: tuple[str, ...]) -> bool:
    return _in_a_split_folder(parts) and parts[-1].lower().endswith(IMAGE_SUFFIXES)


def dataset_root(folder: Path) -> Path | None:
    """Where in ``folder`` (an unpacked archive) :func:`read_splits` finds what reading the
    archive itself finds: its one CSV; or, for an image layout, the one top folder all its
    images are in (an archive of ``fer2013/train/...``: the data sha256 hashes paths from
    there), else ``folder``; None where it holds neither. Several CSVs are a DataError."""
    entries = list(_folder_entries(folder))
    csv = _dataset_csv(entries, source=folder)
    if csv is not None:
        return folder / csv
    images = [PurePosixPath(n).parts for n, _ in entries
              if _is_layout_image(PurePosixPath(n).parts)]
    if not images:  # a train/ or test/ folder of something else: read_splits says what
        return folder if any(part.lower() in SPLIT_FOLDERS for n, _ in entries
                             for part in PurePosixPath(n).parts[:-1]) else None
    tops = {parts[0] for parts in images}
    if len(tops) == 1 and all(len(parts) > 3 for parts in images):
        return folder / tops.pop()
    return folder


def _dataset_csv(entries: list[tuple[str, Callable[[], bytes]]], *, source: Path) -> str | None:
    """The name of the one CSV that is the dataset among ``entries``; None (see _the_csv)."""
    return _the_csv([n for n, _ in _csv_entries(entries)], entries, source=source)


def _the_csv(csvs: list[str], entries: list[tuple[str, Callable[[], bytes]]], *, source: Path):
    """The one CSV that is the source's dataset; None where its images are (CSVs beside
    images in train/ and test/ class folders are other files) or it has no CSV. Several
    CSVs and no images cannot be told apart."""
    if not csvs or _in_split_folders(entries):
        return None
    if len(csvs) > 1:
        raise DataError(f"{source}: holds {len(csvs)} CSV files "
                        f"({', '.join(sorted(csvs))}); expected one fer2013.csv "
                        "(pass the CSV to use itself)")
    return csvs[0]


def _csv_splits(data: bytes, *, origin: str) -> dict[str, Split]:
    # pandas would call these unreadable or name missing columns
    found = _suffix_of_head(data[:512], gunzipped=bytes)  # any gzip: GZIP
    if found == GZIP:
        raise DataError(f"{origin}: is gzip-compressed: gunzip it first (an object stored "
                        "with Content-Encoding: gzip downloads compressed)")
    if found == WEB_PAGE:
        raise DataError(f"{origin}: {WEB_PAGE_SAVED}, not a CSV")
    if found in (".zip", ".tar"):
        raise DataError(f"{origin}: its first bytes are a {found}'s, not a CSV's: give it "
                        f"the suffix {found} (or fetch it with `fer fetch-data --source`, which "
                        "reads a file by its first bytes)")
    return {name: Split(images=images, labels=labels)
            for name, (images, labels) in read_fer_csv(data, origin=origin).items()}


def _folder_entries(root: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """A folder's files as (relative name, reader), without clutter: the data sha256 is the
    same wherever the folder is (fetch-data's unpack marker holds the archive's path)."""
    for path in _data_files(root):
        name = path.relative_to(root).as_posix()
        if not _is_noise(PurePosixPath(name).parts):
            yield name, path.read_bytes


def _data_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, leaving out cache folders inside it (those holding
    a CACHEDIR.TAG, as FER_DATA_DIR does): a FER_DATA_DIR inside the dataset folder would
    otherwise change the folder's sha256 with every decode cache and memo fer writes."""
    return sorted(_walk_files(root))


def _walk_files(root: Path) -> Iterator[Path]:
    """The files under ``root``, into folders that are symbolic links too (a class folder
    linked from a bigger disk), but not round a link back up to a folder above it, nor into
    a cache folder below the root. A folder that cannot be listed is an OSError naming it:
    Path.rglob skipped both kinds of folder without a word, and the model trained without
    that class. A folder read as data twice, through links, is refused (see _read_twice)."""
    def refuse(error: OSError) -> None:
        if not isinstance(error, FileNotFoundError):  # removed meanwhile: not there to read
            raise error

    read_as: dict[str, str] = {}  # a real folder that holds data -> where it was read
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=refuse):
        here = Path(folder)
        if here != root and (_is_loop(here, root) or (
                CACHEDIR_TAG in names and _is_cachedir_tag((here / CACHEDIR_TAG).read_bytes))):
            subfolders.clear()
            continue
        parts = here.relative_to(root).parts
        if _is_class_folder(parts):  # (a split folder's name may be anyone's: a venv's test/)
            name = "/".join(parts)
            earlier = read_as.setdefault(os.path.realpath(here), name)
            if earlier != name:
                raise _read_twice(str(root), name, earlier)
        for name in names:
            path = here / name
            if path.is_file():  # a file, or a link to one; not a broken link or a socket
                yield path
            elif path.is_symlink() and not path.exists() and _may_hold_data(path, root):
                raise FileNotFoundError(errno.ENOENT, "a link to nothing (an unmounted disk? "
                                        "a moved folder?)", str(path))


def _may_hold_data(path: Path, root: Path) -> bool:
    """Whether ``path`` stands where the dataset is read from: a split folder, a class
    folder in one, an image in one, or a CSV (a broken link elsewhere, in a venv say, or
    in clutter, is not)."""
    return _stands_where_data_is(path.relative_to(root).parts)


def _stands_where_data_is(parts: tuple[str, ...]) -> bool:
    """_may_hold_data for a path's parts below the dataset's top (an archive's entry's)."""
    if not parts or _is_noise(parts):
        return False
    return (parts[-1].lower() in SPLIT_FOLDERS
            or len(parts) >= 2 and parts[-2].lower() in SPLIT_FOLDERS
            or _in_a_split_folder(parts) or parts[-1].lower().endswith(".csv"))


def _is_loop(folder: Path, root: Path) -> bool:
    """Whether ``folder`` is, through a link, one of the folders above it (up to ``root``)."""
    real = os.path.realpath(folder)
    return any(os.path.realpath(above) == real for above in folder.parents
               if above == root or above.is_relative_to(root))


CACHEDIR_TAG = "CACHEDIR.TAG"
_CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


def _without_tagged_caches(entries: list[tuple[str, Callable[[], bytes]]]
                           ) -> list[tuple[str, Callable[[], bytes]]]:
    """An archive's entries without those under a cache folder (see _data_files), so that
    an archive and the folder it unpacks to read the same."""
    paths = [PurePosixPath(name) for name, _ in entries]
    caches = [path.parent.parts for path, (_, read) in zip(paths, entries, strict=True)
              if path.name == CACHEDIR_TAG
              and path.parent.parts not in ((), (".",))  # not the root's
              and _is_cachedir_tag(read)]
    return [entry for path, entry in zip(paths, entries, strict=True)
            if not any(path.parts[:len(cache)] == cache for cache in caches)]


def _is_cachedir_tag(read: Callable[[], bytes]) -> bool:
    """Whether a file (its reader) is a cache tag; one that cannot be read is not."""
    try:
        return read()[:len(_CACHEDIR_SIGNATURE)] == _CACHEDIR_SIGNATURE
    except (OSError, DataError):  # a folder's file, an archive's entry
        return False


# FER_DATA_DIR's layout, named once: fer.fetch writes the first five, this module the rest.
CURRENT_POINTER = "current.json"  # the dataset `fer fetch-data` made current, and its origin
FETCH_LOCK = ".fetch.lock"
DOWNLOADS = "downloads"  # fetched files as they came
BY_CONTENT = "by-content"  # links to fetched files under a name that says their kind
SOURCES = "sources"  # unpacked archives and CSVs, by sha256
DECODED = "decoded"  # decoded arrays (.npz), by the source's sha256
HASH_MEMO = "sha256-index.json"
# a folder holding anything else is not only fer's cache
_DATA_DIR_ENTRIES = frozenset({CACHEDIR_TAG, CURRENT_POINTER, FETCH_LOCK, DOWNLOADS, BY_CONTENT,
                               SOURCES, DECODED, HASH_MEMO})


def tag_cache_dir(cache_dir: Path) -> None:
    """Mark ``cache_dir`` (FER_DATA_DIR) a cache folder by the Cache Directory Tagging
    Specification (https://bford.info/cachedir/): backup tools leave it out, and so does fer
    when it lies inside a dataset folder fer reads. Only a folder that holds nothing but
    fer's own files is tagged (a FER_DATA_DIR pointed at a folder of the user's data must
    not drop out of their backups), and one fer cannot write is left as it is (writing
    the cache warns about that)."""
    tag = cache_dir / CACHEDIR_TAG
    if tag.exists():
        return
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        if any(entry.name not in _DATA_DIR_ENTRIES and not entry.name.startswith(".")
               for entry in cache_dir.iterdir()):  # (dotfiles: fer's partial writes, say)
            return
        tag.write_bytes(_CACHEDIR_SIGNATURE + b"\n# fer's data folder (FER_DATA_DIR): "
                        b"downloads, unpacked sources and decoded arrays, all made again "
                        b"when needed\n")


@contextlib.contextmanager
def _archive_entries(archive: Path) -> Iterator[list[tuple[str, Callable[[], bytes]]]]:
    """The archive's files as (entry name, reader) pairs, readable until the ``with`` ends,
    which closes the archive; entries that would escape a target folder are refused."""
    is_zip = archive.name.lower().endswith(".zip")
    with _readable_archive(archive):
        handle = zipfile.ZipFile(archive) if is_zip else tarfile.open(archive)
    with handle:
        with _readable_archive(archive):
            entries = (_zip_entries if is_zip else _tar_entries)(handle, archive)
        yield entries


@contextlib.contextmanager
def _readable_archive(archive: Path) -> Iterator[None]:
    """An archive's index that cannot be read, as one DataError naming it: damaged (zlib's
    and lzma's errors come through tarfile unwrapped), or not an archive at all (tarfile
    lists each method it tried, a line each: said as what the file's first bytes are)."""
    try:
        yield
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile,
            *_LZMA_ERRORS) as exc:
        detail = " ".join(str(exc).split())
        is_zip = isinstance(exc, zipfile.BadZipFile) and "is not a zip file" in detail
        if is_zip or isinstance(exc, tarfile.ReadError) and "could not be opened" in detail:
            found = suffix_by_content(archive)
            detail = (detail if is_zip and found == ".zip" else  # a zip cut short
                      f"not a {'zip archive' if is_zip else 'tarball, compressed or not'}"
                      if found is None else
                      _GZIP_NOT_TAR if found == GZIP else
                      TEXT_NOT_FER_CSV if found == ".csv" and not has_fer_csv_header(archive)
                      else f"its first bytes are a {found}'s" if found.startswith(".") else
                      f"it is a {found}")
        raise DataError(f"{archive}: not a readable archive ({detail})") from None


def _zip_entries(handle: zipfile.ZipFile, archive: Path) -> list[tuple[str, Callable[[], bytes]]]:
    for info in handle.infolist():
        check_entry_name(info.filename, archive=archive)
    by_name = {posixpath.normpath(info.filename): info for info in handle.infolist()}

    def link_target(info: zipfile.ZipInfo, chain: str) -> str | None:
        """`zip -y` stores a link as an entry holding the path it links to."""
        held = _entry_reader(archive, info.filename, lambda: handle.read(info))()
        return _link_target(info.filename, held.decode(errors="replace"), archive=archive,
                            chain=chain)

    files, links = [], {}
    for info in handle.infolist():
        if info.is_dir():
            continue
        name, target = (_follow_links(info.filename, info, by_name, is_link=_is_zip_symlink,
                                      target_of=link_target)
                        if _is_zip_symlink(info) else (info.filename, info))
        if target is None or target.is_dir():  # a link to a folder, to nothing, round a loop
            links[info] = name
            continue
        files.append((info.filename.replace("\\", "/"),  # Windows tools: train\happy\0.png
                      _entry_reader(archive, info.filename, lambda t=target: handle.read(t))))
    folder_links = _folder_links(links, files)
    # the others read as themselves, files that are not images (counted in the warning)
    files += [(info.filename.replace("\\", "/"),
               _entry_reader(archive, info.filename, lambda i=info: handle.read(i)))
              for info in links if info not in folder_links]
    return _through_folder_links(files, {posixpath.normpath(info.filename): folder
                                         for info, folder in folder_links.items()},
                                 archive=archive)


def _is_zip_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _tar_entries(handle: tarfile.TarFile, archive: Path) -> list[tuple[str, Callable[[], bytes]]]:
    """Files, and links to files inside the archive (a deduplicated folder's hard links, a
    symbolic link to an image elsewhere in it), read through the entry they name; links to
    folders as _through_folder_links says."""
    members = handle.getmembers()
    for member in members:
        check_entry_name(member.name, archive=archive)
        if member.islnk():  # relative to the archive's top (a symbolic link's, to its own
            check_entry_name(member.linkname, archive=archive)  # folder: resolve checks it)
    by_name = {posixpath.normpath(member.name): member for member in members}  # ./train/...

    def read(member: tarfile.TarInfo) -> bytes:
        handle_of_member = handle.extractfile(member)  # follows links, chains included
        if handle_of_member is None:  # a hard link to a folder, in a hand-made archive
            raise tarfile.TarError("a link to something that is not a file")
        return handle_of_member.read()

    files, links = [], {}
    for member in members:
        name, target = _follow_links(
            member.name, member, by_name, is_link=tarfile.TarInfo.issym,
            target_of=lambda m, chain: _link_target(m.name, m.linkname, archive=archive,
                                                    chain=chain))
        if target is not None and (target.isfile() or target.islnk()):
            files.append((member.name, _entry_reader(archive, member.name,
                                                     lambda m=member: read(m))))
        elif member.issym():  # to a folder, to nothing (left out, as before), round a loop
            links[member] = name
    return _through_folder_links(files, {posixpath.normpath(member.name): folder
                                         for member, folder in _folder_links(links, files).items()},
                                 archive=archive)


def _follow_links(name: str, entry, by_name: dict, *, is_link: Callable, target_of: Callable):
    """The name and entry a chain of symbolic links from ``entry`` (called ``name``) ends at
    (``target_of(link, name)``: where a link of the chain points, judged as the chain's):
    the entry None where nothing has that name (perhaps a folder the archive stored no entry
    for), both None where the chain is longer than _LINK_HOPS (round a loop)."""
    name = first = posixpath.normpath(name)
    for _ in range(_LINK_HOPS + 1):  # up to _LINK_HOPS links, then the entry named
        if not is_link(entry):
            return name, entry
        name = target_of(entry, first)
        entry = by_name.get(name)
        if entry is None:
            return name, None
    return None, None


def _folder_links(links: dict, files: list[tuple[str, Callable[[], bytes]]]) -> dict:
    """Those of ``links`` (entry -> the name its chain ends at, None round a loop) that
    name a folder holding files: the ones _through_folder_links has something to add for.
    One pass over the files' folders, so that thousands of links to nothing cost no more."""
    folders = {parent for name, _ in files
               for parent in PurePosixPath(posixpath.normpath(name)).parents}
    return {entry: name for entry, name in links.items()
            if name is not None and PurePosixPath(name) in folders}


def _through_folder_links(files: list[tuple[str, Callable[[], bytes]]],
                          folder_links: dict[str, str], *, archive: Path
                          ) -> list[tuple[str, Callable[[], bytes]]]:
    """``files`` and, for each link to a folder (its name -> the folder it names), the files
    under that folder once more under the link's name, as a folder tree's linked class
    folder reads (a link to anything else adds nothing). One level: links to folders inside
    the linked folder are not followed again, nor a link to a folder holding it (a loop). A
    folder read as data twice is refused (see _read_twice)."""
    _check_read_once(folder_links, archive=archive)
    linked = []
    for link, folder in folder_links.items():
        if _is_loop_link(link, folder):
            continue
        prefix = folder + "/"
        linked += [(f"{link}/{name[len(prefix):]}", read)
                   for name, read in files
                   for name in [posixpath.normpath(name)] if name.startswith(prefix)]
    return files + linked


def _check_read_once(folder_links: dict[str, str], *, archive: Path) -> None:
    """An archive's links to folders (name -> folder) that would read one class folder as
    data twice are refused, as the walk of an unpacked tree refuses them: a split or class
    folder linked to another, or two links whose class folders meet (`train -> pool` and
    `test/happy -> pool/happy`). Folders one inside the other that share no class folder
    (`train -> raw`, `test -> raw/heldout`: images are read at <split>/<class>/ only) pass."""
    read_by: dict[str, str] = {}  # a class folder a link reads (lower case) -> that link
    for link, folder in sorted(folder_links.items()):
        if _is_loop_link(link, folder) or not _is_split_or_class_folder(link):
            continue
        if _is_split_or_class_folder(folder):
            raise _read_twice(str(archive), link, folder)
        split_link = link.split("/")[-1].lower() in SPLIT_FOLDERS
        reads = ({f"{folder}/{name}".lower() for name in CLASS_INDEX} if split_link
                 else {folder.lower()})
        for read in reads:
            earlier = read_by.setdefault(read, link)
            if earlier != link:
                raise _read_twice(str(archive), link, earlier)


def _is_loop_link(link: str, folder: str) -> bool:
    """Whether an archive's link names a folder holding it (followed, it would loop)."""
    return link == folder or link.startswith(folder + "/")


def _is_class_folder(parts: tuple[str, ...]) -> bool:
    """Whether a folder (its path's parts below the dataset's top) is ``<split>/<class>``."""
    return (len(parts) >= 2 and parts[-2].lower() in SPLIT_FOLDERS
            and parts[-1].lower() in CLASS_INDEX and not _is_noise(parts))


def _is_split_or_class_folder(name: str) -> bool:
    parts = tuple(name.split("/"))
    return _is_class_folder(parts) or parts[-1].lower() in SPLIT_FOLDERS and not _is_noise(parts)


def _read_twice(source: str, name: str, earlier: str) -> DataError:
    """One folder read as data under two names, through symbolic links (`ln -s train
    test`, train/happy and test/happy linked to one folder): its images would count twice,
    in the test split too a model's own training images, scored as if unseen."""
    return DataError(f"{source}: '{name}' reads the same folder as '{earlier}', through a "
                     "symbolic link: its images would be read twice (in both splits, the "
                     "test images being training images); give each split and class its own "
                     "folder")


_LINK_HOPS = 8  # a link to a link ...: as far as a sane archive goes, never round a loop


def _link_target(name: str, target: str, *, archive: Path, chain: str) -> str | None:
    """The entry a symbolic link ``name`` points at, as an archive path. One that leaves the
    archive (an absolute path, or ``..`` above its top) is a DataError where the ``chain``
    of links it ends stands where data is read (see _may_hold_data), and otherwise a link
    to nothing, left out as the walk of the unpacked folder leaves it (a venv's bin/python
    -> /usr/bin/python3)."""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if posixpath.isabs(target) or joined == ".." or joined.startswith("../"):
        if not _stands_where_data_is(PurePosixPath(chain).parts):
            return None
        raise DataError(f"{archive}: entry '{name}' links to '{target}', outside the archive; "
                        "refusing this archive")
    return joined


def _entry_reader(archive: Path, name: str, read: Callable[[], bytes]) -> Callable[[], bytes]:
    """``read``, with the failures of one damaged entry (bad CRC, truncated data, encryption,
    an unsupported compression) named instead of raised as tracebacks.

    Entries are read lazily, after the archive's index was checked, so this cannot be one
    ``try`` around the loop above.
    """
    def checked() -> bytes:
        try:
            return read()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, RuntimeError,
                NotImplementedError, OSError, KeyError,  # KeyError: a link's target
                *_LZMA_ERRORS) as exc:  # a damaged entry of a 7z -mm=LZMA zip
            raise DataError(f"{archive}: entry '{name}' cannot be read ({exc})") from None

    return checked


# A Windows drive (C:, C:foo): a colon elsewhere is part of a name (fer2013.csv:Zone.Identifier)
_DRIVE = re.compile(r"[A-Za-z]:")


def check_entry_name(name: str, *, archive: Path) -> str:
    """Return ``name`` if it stays inside the folder it is unpacked to (no zip-slip)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and _DRIVE.match(path.parts[0])):
        raise DataError(f"{archive}: entry '{name}' would be written outside the target folder "
                        "(zip-slip); refusing this archive")
    return name


def safe_extract(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` after checking every entry name; return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with _archive_entries(archive) as entries:
        for name, read in entries:
            target = dest / check_entry_name(name, archive=archive)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read())
    return dest


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


# --------------------------------------------------------------------------- image layout


def read_image_layout(entries: Iterator[tuple[str, Callable[[], bytes]]], *, origin: str) -> dict[str, Split]:
    """Decode ``<split>/<class>/<image>`` entries: one set of split folders, at the top or
    inside folders (``fer2013/train/...``).

    Two sets (a copy beside the original, ``a/train`` and ``b/train``) are a DataError:
    read as one dataset, their images would count twice and could cross from test to train.
    ``train/`` and ``test/`` in different folders (``ds/train/train``, ``ds/test/test``: two
    archives unpacked each into a folder of its name) are one set.
    Other files (a val/ folder, images one folder deeper, notes, files in a class folder
    that neither have an image's suffix nor decode as one) are not read; a warning counts
    them and names the first, so a layout fer does not know is not lost unseen.
    CSV files are left out of the count: beside image folders they are other files.
    """
    images: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_FOLDERS}
    labels: dict[str, list[int]] = {s: [] for s in SPLIT_FOLDERS}
    # (split folder, class folder, file name) of each image, to put a split in a folder's
    # sorted order (Train/ and train/ make one split)
    names: dict[str, list[tuple[str, ...]]] = {s: [] for s in SPLIT_FOLDERS}
    skipped: list[str] = []
    # per split: the folder holding it -> its first entry (train/ and test/ may sit in
    # different folders, as two archives unpacked each into its own, but one split once)
    roots: dict[str, dict[str, str]] = {}
    for name, read in entries:
        parts = PurePosixPath(name).parts
        if _is_noise(parts) or name.lower().endswith(".csv"):
            continue
        if len(parts) < 3 or parts[-3].lower() not in SPLIT_FOLDERS:
            skipped.append(name)
            continue
        # A file without an image's suffix is read if it decodes (images were, before) and
        # otherwise not counted as one (a desktop.ini, a :Zone.Identifier, src/train/x.py).
        try:
            pixels = decode_grayscale(read())
        except MemoryError:
            raise DataError(f"{origin}: entry '{name}' is {TOO_LARGE_FOR_MEMORY}") from None
        if pixels is None and not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            skipped.append(name)
            continue
        split, class_folder = parts[-3].lower(), parts[-2].lower()
        split_roots = roots.setdefault(split, {})
        split_roots.setdefault("/".join(parts[:-3]) + "/", name)
        if len(split_roots) > 1:
            (first, other) = split_roots.values()
            raise DataError(f"{origin}: holds two sets of split folders ('{first}' and "
                            f"'{other}'); expected one {parts[-3]}/, so that no image is "
                            "read twice (keep one copy, or pass its folder)")
        if class_folder not in CLASS_INDEX:
            raise DataError(f"{origin}: entry '{name}' is in unknown class folder "
                            f"'{parts[-2]}' (expected one of {', '.join(sorted(CLASS_NAMES))})")
        if pixels is None:
            raise DataError(f"{origin}: entry '{name}' is {UNDECODABLE}")
        images[split].append(to_model_input(pixels))
        labels[split].append(CLASS_INDEX[class_folder])
        names[split].append(parts[-3:])
    splits = {s: _in_name_order(images[s], labels[s], names[s]) for s in SPLIT_FOLDERS
              if images[s]}
    if splits and skipped:
        log.warning("%s: %d file%s outside <train|test>/<class>/ %s not read (the first: '%s')",
                    origin, len(skipped), "" if len(skipped) == 1 else "s",
                    "was" if len(skipped) == 1 else "were", skipped[0])
    if not splits and skipped:  # `--data fer2013/test`: its class folders one level short
        raise DataError(f"{origin}: no images in <train|test>/<class>/ folders ({len(skipped)} "
                        f"file{'' if len(skipped) == 1 else 's'} elsewhere, the first: "
                        f"'{skipped[0]}'); expected train/<class>/*.jpg and test/<class>/*.jpg "
                        "(pass the folder that holds train/ and test/), or a fer2013.csv")
    if not splits:
        raise DataError(f"{origin}: no images found (empty source; expected train/<class>/*.jpg "
                        "and test/<class>/*.jpg, or a fer2013.csv)")
    return splits


def _in_name_order(images: list[np.ndarray], labels: list[int],
                   names: list[tuple[str, ...]]) -> Split:
    """A split's images sorted by their folders and file name, as a folder's are read: an
    archive lists them in the order they were added (a zip tool's, a file manager's), and
    validation is carved by position, so an archive and its unpacked folder carve the same
    validation images from one --split-seed. (Sorted after decoding: a .tar.gz read out of
    order would decompress it again for each image.)"""
    order = sorted(range(len(names)), key=names.__getitem__)  # stable: a zip's repeated name
    return Split(images=np.stack([images[i] for i in order]),
                 labels=np.asarray([labels[i] for i in order], dtype=np.int64))


def decode_grayscale(data: bytes) -> np.ndarray | None:
    """Image bytes as 8-bit grayscale at their own size; None when OpenCV cannot decode them.

    OpenCV raises instead of saying None for an empty buffer and for a header that claims
    more than its limit of 2^30 pixels (a 19-byte file can), so both are None here too.
    Running out of memory raises MemoryError (callers say TOO_LARGE_FOR_MEMORY with the
    file's name): OpenCV raises it as its cv2.error, which had read as an undecodable file.
    """
    import cv2

    if not data:
        return None
    encoded = np.frombuffer(data, dtype=np.uint8)
    try:
        gray = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
        if gray is not None and _may_have_alpha(data):
            # turned by its EXIF orientation as the grey is (IMREAD_UNCHANGED is not); these
            # flags keep the alpha since OpenCV 4.11 (hence pyproject's floor)
            return _on_white(gray, _alpha_of(cv2.imdecode(
                encoded, cv2.IMREAD_COLOR | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH), gray))
        return gray
    except cv2.error as exc:
        if exc.code == cv2.Error.StsNoMem:
            raise MemoryError(exc.err) from None
        return None


def _may_have_alpha(data: bytes) -> bool:
    """A PNG or WebP whose headers say it has transparency; only these are decoded a second
    time, with their alpha."""
    if data.startswith(PNG_SIGNATURE):
        colour_type = data[25] if len(data) > 25 else None
        return colour_type in PNG_ALPHA_COLOUR_TYPES or (
            colour_type in PNG_TRNS_COLOUR_TYPES and _png_has_trns(data))
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    if data[12:16] == b"VP8X":  # extended: flags byte, alpha bit 0x10
        return len(data) > 20 and bool(data[20] & 0x10)
    if data[12:16] == b"VP8L":  # lossless: an alpha_is_used bit after width and height
        return len(data) >= 25 and bool(int.from_bytes(data[21:25], "little") >> 28 & 1)
    return False  # VP8: lossy without alpha


def _png_has_trns(data: bytes) -> bool:
    """Whether a tRNS chunk comes before the image data (where PNG puts it)."""
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        kind = data[position + 4:position + 8]
        if kind in (b"tRNS", b"IDAT"):
            return kind == b"tRNS"
        position += 12 + int.from_bytes(data[position:position + 4], "big")
    return False


def _alpha_of(with_alpha: np.ndarray | None, gray: np.ndarray) -> np.ndarray | None:
    """A copy of the alpha channel of a decode with colour and alpha, which is dropped on
    return (4 or 8 bytes a pixel); None where it has none fitting ``gray``."""
    if (with_alpha is None or with_alpha.ndim != 3 or with_alpha.shape[2] != 4
            or with_alpha.shape[:2] != gray.shape):
        return None
    return with_alpha[..., 3].copy()


ALPHA_STRIP_ROWS = 256  # rows composited at a time: float32 temporaries for these alone


def _on_white(gray: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """``gray`` over a white background as its alpha channel says, as a viewer shows it: a
    transparent cut-out of a face was seen on whatever its transparent pixels hold (black,
    mostly), which no viewer shows. In strips of rows: over the whole image at once, its
    float32 temporaries took about 21 bytes a pixel (2 GB for a 100-megapixel cut-out)."""
    if alpha is None:
        return gray
    opaque = np.iinfo(alpha.dtype).max
    out = np.empty_like(gray)
    for start in range(0, gray.shape[0], ALPHA_STRIP_ROWS):
        rows = slice(start, start + ALPHA_STRIP_ROWS)
        opacity = alpha[rows].astype(np.float32) / opaque
        out[rows] = np.rint(gray[rows] * opacity + 255.0 * (1.0 - opacity))
    return out


def check_val_fraction(val_fraction: float, *, what: str = "--val-fraction") -> None:
    """A fraction a split can be carved at. A new run takes VAL_FRACTION_RANGE only
    (fer.options.check_config); a run begun before that range resumes at its own."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"{what} {val_fraction}: expected a fraction between 0 and 1")


def to_model_input(gray: np.ndarray) -> np.ndarray:
    """Resize to the 48x48 the models take, the same way for training and prediction:
    area interpolation along each side that shrinks (every pixel counts), linear along
    each that grows. OpenCV averages areas only where no side grows, so an image that
    shrinks one way and grows the other (48x144, 40x480) is resized in two steps; in one
    linear step its long side had been sampled, not averaged (stripes came out as stripes)."""
    import cv2

    height, width = gray.shape
    if height > IMAGE_SIZE or width > IMAGE_SIZE:
        gray = cv2.resize(gray, (min(width, IMAGE_SIZE), min(height, IMAGE_SIZE)),
                          interpolation=cv2.INTER_AREA)
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        gray = cv2.resize(gray, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    return gray


def _is_noise(parts: tuple[str, ...]) -> bool:
    """Archive clutter that is not data: macOS resource forks, dotfiles, Thumbs.db."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1] == "Thumbs.db"


# --------------------------------------------------------------------------- hashing and cache


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def split_sha256(split: Split) -> str:
    """sha256 of a split's images and labels, in any order: the same test split read from
    another copy of the data (the archive a folder was unpacked from, another machine's
    folder, whose files may list in another order) has the same one."""
    images = np.ascontiguousarray(split.images, dtype=np.uint8)
    rows = sorted(hashlib.sha256(memoryview(image)).digest() + int(label).to_bytes(1, "big")
                  for image, label in zip(images, split.labels, strict=True))
    return hashlib.sha256(b"".join(rows)).hexdigest()


def pixels_sha256(dataset: Dataset) -> str:
    """sha256 of the decoded splits, pixels and labels in order: what the model sees.

    The source's sha256 stays the same where another fer decodes its images differently
    (CACHE_FORMAT: transparency seen on white, say), so a resumed run compares this too.
    """
    digest = hashlib.sha256()
    for name in ("train", "validation", "test"):
        split = getattr(dataset, name)
        if split is None:
            continue
        images = np.ascontiguousarray(split.images, dtype=np.uint8)
        digest.update(f"{name} {images.shape}\0".encode())
        digest.update(memoryview(images))  # no copy of a large dataset's pixels
        digest.update(memoryview(np.ascontiguousarray(split.labels, dtype=np.int64)))
    return digest.hexdigest()


def source_sha256(source: Path, *, cache_dir: Path | None = None) -> str:
    """sha256 of a file, or of the sorted (path, content) pairs of the files a folder's
    dataset is read from (``_read_entries``); memoised by stat."""
    stamp = stat_stamp(source, change_time=True)
    index_path = cache_dir / HASH_MEMO if cache_dir else None
    index = read_json(index_path) if index_path else {}
    key = str(source.resolve())
    memo = index.get(key, {})
    if memo.get("stamp") == stamp and memo.get("format") == HASH_FORMAT:
        return memo["sha256"]
    if source.is_dir():
        digest = hashlib.sha256()
        for name, read in _folder_read_entries(source):
            digest.update(os.fsencode(name) + b"\0" + hashlib.sha256(read()).digest())
        value = digest.hexdigest()
    else:
        value = file_sha256(source)
    if index_path:
        index[key] = {"stamp": stamp, "sha256": value, "format": HASH_FORMAT}
        try:
            write_json(index_path, index)
        except OSError as exc:  # a full or read-only cache folder: only the next load is slower
            log.warning("%s: cannot write the sha256 memo (%s); going on without it",
                        index_path, exc.strerror or exc)
    return value


def stat_stamp(source: Path, *, change_time: bool = False) -> list[int] | str:
    """What changes whenever the content may have: size and mtime, and for a folder those
    and the path of each file the dataset is read from (``_read_entries``: moving an image
    to another class folder changes its label).

    With ``change_time``, also each file's ctime, which no user tool sets: an edit that
    keeps size and mtime (``cp -p``, ``rsync -a``, ``touch -r``) changes it. (Not the
    inode, which some FUSE and network mounts renumber on every mount.) Not for
    comparing a copy with its original, whose ctime differs.
    """
    def fields(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, *((st.st_ctime_ns,) if change_time else ())]

    if source.is_file():
        return fields(source.stat())
    digest = hashlib.sha256()
    for name, _ in _folder_read_entries(source):
        stamp = "\0".join(map(str, fields((source / name).stat())))
        digest.update(os.fsencode(f"{name}\0{stamp}\n"))
    return digest.hexdigest()


def _cache_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / DECODED / f"{digest}.v{CACHE_FORMAT}.npz"


def _load_cached(cache_dir: Path, digest: str) -> dict[str, Split] | None:
    path = _cache_path(cache_dir, digest)
    if not path.exists():
        return None
    try:
        # np.load leaves its file open when a damaged .npz fails to parse: ours closes it
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as arrays:
            names = {key.rsplit("_", 1)[0] for key in arrays.files}
            return {n: Split(images=arrays[f"{n}_images"], labels=arrays[f"{n}_labels"])
                    for n in names}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("%s: damaged decode cache (%s); decoding the source again", path, exc)
        return None


def _save_cached(cache_dir: Path, digest: str, splits: dict[str, Split]) -> None:
    path = _cache_path(cache_dir, digest)
    arrays = {}
    for name, split in splits.items():
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split.images, split.labels
    # a fer before fer.files named them `{digest}.vN.<pid>-<hex>.tmp.npz`
    remove_abandoned([*temporaries_of(path, suffix=".tmp.npz"),
                      *path.parent.glob(f"{digest}.v*.tmp.npz")])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path, suffix=".tmp.npz") as tmp:  # numpy names it .npz otherwise
            np.savez(tmp, **arrays)
    except OSError as exc:  # a full disk, say: the data is decoded, only the next load is slower
        log.warning("%s: cannot write the decode cache (%s); going on without it", path,
                    exc.strerror or exc)
        return
    for stale in path.parent.glob(f"{digest}.v*.npz"):  # older formats are never read again
        version = re.fullmatch(rf"{digest}\.v(\d+)\.npz", stale.name)
        if version and int(version[1]) < CACHE_FORMAT:  # a newer fer's, sharing the folder, stays
            with contextlib.suppress(OSError):  # (another user's, say: it only takes space)
                stale.unlink(missing_ok=True)


