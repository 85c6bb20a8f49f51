"""fer.csv_reader, through fer.data.read_splits as a user's CSV reaches it: labels by the
CSV's integers, usages to splits, every malformed row named by file and line."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_labels_match_shades, csv_row, shaded_image, write_csv

from fer.data import load_dataset, read_splits
from fer.errors import DataError
from fer.labels import CLASS_NAMES


def test_csv_labels_map_by_csv_integer(shaded_csv):
    """CSV label k gets class CLASS_NAMES[k] for every k (the original script swapped three)."""
    splits = read_splits(shaded_csv)
    for split in splits.values():
        assert_labels_match_shades(split)
        assert set(split.labels.tolist()) == set(range(7))


def test_csv_usages_map_to_splits(tmp_path):
    """Training -> train, PublicTest -> validation, PrivateTest -> test (each usage has its
    own count here, so swapping any two shows; choosing a model on PrivateTest would be
    choosing it on the test set)."""
    rows = [csv_row(label, shaded_image(name, serial=serial), usage)
            for serial, (usage, label, name) in enumerate(
                (usage, label, name)
                for usage, count in (("Training", 3), ("PublicTest", 2), ("PrivateTest", 1))
                for label, name in enumerate(CLASS_NAMES) for _ in range(count))]
    source = write_csv(tmp_path / "fer2013.csv", rows)
    splits = read_splits(source)
    assert {k: len(v) for k, v in splits.items()} == {"train": 21, "validation": 14, "test": 7}
    dataset = load_dataset(source)
    assert dataset.validation_origin == "source, copies of training images left out"
    assert len(dataset.validation) == 14  # none of them a copy of a training image


def test_csv_without_private_test_uses_public_test_as_test(tmp_path):
    """Without PrivateTest rows, PublicTest is the test split and validation is carved."""
    rows = [csv_row(label, shaded_image(name, serial=serial), usage)
            for serial, (usage, label, name) in enumerate(
                (usage, label, name) for usage, count in (("Training", 10), ("PublicTest", 4))
                for label, name in enumerate(CLASS_NAMES) for _ in range(count))]
    dataset = load_dataset(write_csv(tmp_path / "f.csv", rows), val_fraction=0.2, seed=1)
    assert len(dataset.test) == 28 and len(dataset.validation) == 14 and len(dataset.train) == 56
    assert dataset.validation_origin.startswith("carved from train")


GOOD = " ".join(["7"] * 2304)


@pytest.mark.parametrize(("row", "message"), [
    (f"0,{' '.join(['7'] * 2303)},Training", r"line 3: 2303 pixel values, expected 2304"),
    (f"0,{GOOD}x,Training", r"line 3: pixel 2304 is '7x', expected an integer 0-255"),
    (f"0,{GOOD[:-1]}1.5,Training", r"line 3: pixel 2304 is '1\.5', expected an integer"),
    (f"0,256 {GOOD[2:]},Training", r"line 3: pixel 1 is 256, out of range 0-255"),
    # under NumPy 1.x's casting (pyproject allows it) hundreds wrapped in uint8: 300 read as
    # 44, 999 as 231; these rows guard a NumPy 1.x install (the lock's NumPy 2 read them right)
    (f"0,300 {GOOD[2:]},Training", r"line 3: pixel 1 is 300, out of range 0-255"),
    (f"0,{GOOD[:-1]}999,Training", r"line 3: pixel 2304 is 999, out of range 0-255"),
    (f"0,-1 {GOOD[2:]},Training", r"line 3: pixel 1 is '-1', expected an integer"),
    (f"7,{GOOD},Training", r"line 3: emotion '7' is not a label 0-6"),
    (f"happy,{GOOD},Training", r"line 3: emotion 'happy' is not a label 0-6"),
    (f"{'9' * 20},{GOOD},Training", r"line 3: emotion '9{20}' is not a label 0-6"),  # > int64
    (f"{'x' * 100},{GOOD},Training", r"line 3: emotion 'x{40}\.\.\.' is not a label 0-6"),
    # another script's digit three, in quotes so that pandas reads the file: it was label 3
    (f'\u0663,"{GOOD}",Training', r"line 3: emotion '\u0663' is not a label 0-6"),
    (f"0,{GOOD},Validation", r"line 3: unknown Usage 'Validation'"),
    # 3 MiB without a space: the parallel parse finds nowhere to cut it into chunks
    (f"0,{'7' * (3 << 20)},Training", r"line 3: 1 pixel values, expected 2304"),
    (f"0,{GOOD.replace(' ', chr(9))},Training", r"line 3: 1 pixel values, expected 2304 "
                                                r"\(48x48\) separated by spaces"),
    (f"0,0255 {GOOD[2:]},Training", r"line 3: pixel 1 is 0255, expected at most 3 digits"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, row, message):
    """Each malformed CSV row is reported with its file and line and the rule it broke."""
    path = write_csv(tmp_path / "bad.csv", [f"0,{GOOD},PublicTest", row])
    with pytest.raises(DataError, match=rf"bad\.csv, {message}"):
        read_splits(path)


@pytest.mark.parametrize(("quote", "good_rows"), [("", 0), ('"', 0), ("", 500)],
                         ids=["plain", "quoted", "plain-after-500-rows"])
def test_rows_short_and_long_by_one_are_not_evened_out(tmp_path, quote, good_rows):
    """A row one value short and a later row one value long add up to the right total;
    each row is still counted (also across the parser's 2 MiB chunks: 500 rows are ~2.3 MB),
    so no pixel moves from one face into the next unnoticed; the good rows alone still read."""
    short, long = " ".join(["7"] * 2303), " ".join(["7"] * 2305)
    good = [f"0,{quote}{GOOD}{quote},PublicTest"] + [f"0,{GOOD},Training"] * good_rows
    read = read_splits(write_csv(tmp_path / "good.csv", good))
    assert [len(read[name]) if name in read else 0 for name in ("test", "train")] == [1, good_rows]
    rows = good + [f"0,{quote}{short}{quote},Training", f"1,{quote}{long}{quote},Training"]
    with pytest.raises(DataError, match=rf"bad\.csv, line {3 + good_rows}: 2303 pixel values, "
                                        "expected 2304"):
        read_splits(write_csv(tmp_path / "bad.csv", rows))


@pytest.mark.parametrize("row", [f"7,{GOOD},Training", f"0,{GOOD},Validation",
                                 f"0,{GOOD}x,Training"], ids=["emotion", "usage", "pixels"])
def test_line_numbers_count_blank_lines(tmp_path, row):
    """A blank line between rows is skipped, but the bad row is still named by its real line."""
    path = write_csv(tmp_path / "bad.csv", [f"0,{GOOD},PublicTest", "", row])
    with pytest.raises(DataError, match=r"bad\.csv, line 4: "):
        read_splits(path)


def test_a_latin1_superscript_digit_is_not_a_label(tmp_path):
    """Byte 0xB2 read as latin-1 is '²', which str.isdigit accepts and int() refuses: it
    raised ValueError with a traceback."""
    path = tmp_path / "bad.csv"
    path.write_bytes(f"emotion,pixels,Usage\n0,{GOOD},PublicTest\n".encode()
                     + b"\xb2," + GOOD.encode() + b",Training\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: emotion '\xb2' is not a label"):
        read_splits(path)


def test_a_byte_that_is_not_utf8_in_the_pixels_is_named_by_line_and_pixel(tmp_path):
    """Byte 0xB2 inside a pixel field: the message was pandas' UnicodeDecodeError with a
    byte offset, naming neither the line nor the pixel."""
    path = tmp_path / "bad.csv"
    path.write_bytes(f"emotion,pixels,Usage\n0,{GOOD},PublicTest\n".encode()
                     + b"0,7 \xb2" + GOOD[3:].encode() + b",Training\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: pixel 2 is '\ufffd', expected an "
                                        r"integer"):
        read_splits(path)


def test_a_row_name_before_every_row_is_left_out(tmp_path):
    """R's write.table writes a quoted row name before each row and none in the header:
    pandas takes it for an index, as it did before trailing commas were handled."""
    path = tmp_path / "r.csv"
    path.write_text(f'"emotion","pixels","Usage"\n"1",3,"{GOOD}","Training"\n'
                    f'"2",5,"{GOOD}","PublicTest"\n')
    splits = read_splits(path)
    assert splits["train"].labels.tolist() == [3] and splits["test"].labels.tolist() == [5]
    assert int(splits["train"].images.max()) == 7


def test_a_comma_ending_every_row_reads_like_none(tmp_path):
    """Some exports end each row with a comma: one empty field too many. pandas took the
    first column for an index, shifted every column by one and blamed 'emotion' for the
    pixels, in a message of 9 KB."""
    pixels = " ".join(str(v % 256) for v in range(2304))
    path = tmp_path / "trailing.csv"
    path.write_text(f"emotion,pixels,Usage\n3,{pixels},Training,\n5,{GOOD},PublicTest,\n")
    splits = read_splits(path)
    assert splits["train"].labels.tolist() == [3] and splits["test"].labels.tolist() == [5]
    assert splits["train"].images.ravel().tolist() == [v % 256 for v in range(2304)]
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r"))  # old Mac line endings
    assert read_splits(path)["train"].labels.tolist() == [3]


@pytest.mark.parametrize("export", ["crlf", "utf-8 bom", "bom and crlf"])
def test_excels_csv_exports_read_like_a_plain_csv(shaded_csv, tmp_path, export):
    """Excel writes CRLF line endings and, as "CSV UTF-8", a byte-order mark before the
    header: the same rows, pixels and splits as the plain file."""
    plain = read_splits(shaded_csv)
    data = shaded_csv.read_bytes()
    if "crlf" in export:
        data = data.replace(b"\n", b"\r\n")
    if "bom" in export:
        data = b"\xef\xbb\xbf" + data
    path = tmp_path / "exported.csv"
    path.write_bytes(data)
    exported = read_splits(path)
    assert sorted(exported) == sorted(plain)
    for split in plain:
        assert np.array_equal(exported[split].images, plain[split].images), split
        assert np.array_equal(exported[split].labels, plain[split].labels), split


def test_blank_lines_between_rows_are_skipped(tmp_path):
    path = write_csv(tmp_path / "ok.csv", [f"0,{GOOD},Training", "", f"3,{GOOD},PublicTest", ""])
    splits = read_splits(path)
    assert splits["train"].labels.tolist() == [0] and splits["test"].labels.tolist() == [3]


def test_quoted_csv_reads_like_plain(tmp_path):
    """Quoted fields (as some exports write them) parse the same via the robust path."""
    path = tmp_path / "q.csv"
    path.write_text(f'emotion,pixels,Usage\n3,"{GOOD}",Training\n4,"{GOOD}",PublicTest\n')
    splits = read_splits(path)
    assert splits["train"].labels.tolist() == [3] and int(splits["test"].images.max()) == 7


@pytest.mark.parametrize(("content", "message"), [
    ("", r"empty\.csv: not a readable CSV"),
    ("emotion,pixels,Usage\n", r"empty\.csv: the CSV has a header but no rows"),
    ("label,pixels\n1,2\n", r"empty\.csv: missing column\(s\) emotion, Usage"),
])
def test_empty_or_headerless_csv(tmp_path, content, message):
    """Empty files and wrong headers are named, with what was expected."""
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_splits(path)


def test_a_large_csv_is_parsed_exactly_across_its_parallel_chunks(tmp_path):
    """5,000 rows (11 MB) are cut into 2 MiB chunks parsed in parallel: every pixel comes
    back in its row and place. How fast is measured by benchmarks/data_benchmark.py, not
    timed here: a wall-clock bound fails on a busy machine and proves nothing on a fast one."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5000, 2304))
    lines = [f"{i % 7},{' '.join(map(str, row))},Training" for i, row in enumerate(pixels)]
    lines += [f"0,{GOOD},PublicTest"]
    splits = read_splits(write_csv(tmp_path / "big.csv", lines))
    assert np.array_equal(splits["train"].images.reshape(5000, -1), pixels)
    assert np.array_equal(splits["train"].labels, np.arange(5000) % 7)
