"""The original ``emotion,pixels,Usage`` fer2013.csv, parsed without a Python loop per row.

About 300 MB of text: the pixel column is tokenised with numpy in place, in cache-sized
chunks on every core, and only when that fast pass finds something wrong does a slow pass
walk the rows to name the first bad line and the rule it broke. Files the fast pass cannot
split (quoted fields, blank lines between rows, other column orders) are read with pandas.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fer.errors import DataError
from fer.labels import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES

PIXELS_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE
CSV_USAGES = ("Training", "PublicTest", "PrivateTest")


def read_fer_csv(data: bytes, *, origin: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images (uint8, n x 48 x 48) and labels of each split the CSV holds, keyed 'train',
    'validation' (PublicTest, when PrivateTest is present), 'test'. ``origin`` names the
    file in errors."""
    columns = _split_plain_csv(data) or _split_csv_with_pandas(data, origin=origin)
    emotions, pixel_region, row_starts, usages, lines = columns
    if not emotions:
        raise DataError(f"{origin}: the CSV has a header but no rows (empty source)")
    labels = _parse_labels(emotions, lines=lines, origin=origin)
    images = _parse_pixels(pixel_region, row_starts=row_starts)
    if images is None:
        _diagnose_pixels(data, origin=origin)
    usage = np.asarray(usages)
    unknown = ~np.isin(usage, CSV_USAGES)
    if unknown.any():
        row = int(np.argmax(unknown))
        raise DataError(f"{origin}, line {lines[row]}: unknown Usage '{usage[row]}' "
                        f"(expected one of {', '.join(CSV_USAGES)})")
    has_private = bool((usage == "PrivateTest").any())
    mapping = {"Training": "train",
               "PublicTest": "validation" if has_private else "test",
               "PrivateTest": "test"}
    splits = {}
    for usage_name, split_name in mapping.items():
        mask = usage == usage_name
        if mask.any():
            splits[split_name] = (images[mask], labels[mask])
    return splits


CsvColumns = tuple[list[str], np.ndarray, np.ndarray, list[str], np.ndarray]
"""emotions, the pixel text as one byte region (rows separated by spaces), where each row's
pixels start in it, usages, and each row's line in the file."""


def _split_plain_csv(data: bytes) -> CsvColumns | None:
    """Columns of an unquoted ``emotion,pixels,Usage`` file without copying the pixels.

    Returns None for anything else (quotes, other column order, blank lines between rows),
    which the pandas path reads.
    The pixel bytes are parsed in place: the text between one row's pixels and the next
    (``,Training\\n3,``) is overwritten with spaces so one pass tokenises every row.
    """
    header_end = data.find(b"\n")
    if header_end < 0 or data[:header_end].strip().decode("latin-1") != "emotion,pixels,Usage":
        return None
    if b'"' in data:
        return None
    buffer = np.frombuffer(bytearray(data), dtype=np.uint8)
    body = buffer[header_end + 1:]
    line_ends = np.flatnonzero(body == 10)
    if len(line_ends) == 0 or line_ends[-1] != len(body) - 1:
        line_ends = np.append(line_ends, len(body))
    line_starts = np.concatenate(([0], line_ends[:-1] + 1))
    keep = line_ends > line_starts
    if not keep.all() and keep[np.argmin(keep):].any():
        return None  # a blank line between rows: the pandas path keeps the line numbers right
    line_starts, line_ends = line_starts[keep], line_ends[keep]
    commas = np.flatnonzero(body == 44)
    if len(commas) != 2 * len(line_starts) or len(line_starts) == 0:
        return None
    first, second = commas[0::2], commas[1::2]
    if not ((first > line_starts) & (second < line_ends)).all() or \
            not (first[1:] > line_ends[:-1]).all():
        return None
    raw = data[header_end + 1:]
    emotions = [raw[s:e].decode("latin-1") for s, e in zip(line_starts, first, strict=True)]
    usages = [raw[s + 1:e].decode("latin-1").strip()
              for s, e in zip(second, line_ends, strict=True)]
    for end_of_pixels, start_of_next in zip(second[:-1], first[1:], strict=True):
        body[end_of_pixels:start_of_next + 1] = 32
    return (emotions, body[first[0] + 1:second[-1]], first - first[0], usages,
            np.arange(2, len(emotions) + 2))


def _split_csv_with_pandas(data: bytes, *, origin: str) -> CsvColumns:
    frame, lines = _read_csv_frame(data, origin=origin)
    # Characters outside latin-1 become '?', which the pixel parse rejects, naming the row.
    texts = [text.encode("latin-1", errors="replace") for text in frame["pixels"]]
    row_starts = np.cumsum([0] + [len(text) + 1 for text in texts[:-1]])
    return (frame["emotion"].tolist(), np.frombuffer(bytearray(b" ".join(texts)), dtype=np.uint8),
            row_starts, frame["Usage"].str.strip().tolist(), lines)


def _read_csv_frame(data: bytes, *, origin: str):
    """The CSV's non-blank rows as strings, and the line each came from (blank lines count)."""
    import pandas as pd

    # A row with one field more than the header is either a comma ending every row (some
    # exports) or a row name before it (R's write.table): pandas reads the second right by
    # taking the first field for an index, and must be told not to for the first, else it
    # shifts every column by one.
    trailing_comma = _first_row(data).rstrip().endswith(b",")
    try:
        with warnings.catch_warnings():  # pandas warns that it drops the trailing empty field
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            # a byte that is not UTF-8 becomes U+FFFD: the row checks then name its line
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False,
                                skip_blank_lines=False, encoding_errors="replace",
                                index_col=False if trailing_comma else None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{origin}: not a readable CSV ({exc})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in ("emotion", "pixels", "Usage") if c not in frame.columns]
    if missing:
        raise DataError(f"{origin}: missing column(s) {', '.join(missing)} "
                        "(expected the header emotion,pixels,Usage)")
    blank = (frame == "").all(axis=1)
    return frame[~blank], np.flatnonzero(~blank.to_numpy()) + 2


def _first_row(data: bytes) -> bytes:
    """The first non-blank line after the header (b"" if none), read from the file's first
    64 KiB, with any line ending (CR alone too, as old Mac exports write)."""
    lines = re.split(rb"\r\n|\r|\n", data[:1 << 16])
    return next((line for line in lines[1:] if line.strip()), b"")


def _parse_labels(emotions: list[str], *, lines: np.ndarray, origin: str) -> np.ndarray:
    text = np.char.strip(np.asarray(emotions, dtype=str))
    # ASCII digits only, and few: str.isdigit also takes '²' (a latin-1 byte) and other
    # scripts' digits, which int() then rejects or reads; 20 digits overflow int64.
    is_label = np.asarray([len(t) <= 2 and t.isascii() and t.isdigit() for t in text.tolist()],
                          dtype=bool)
    values = np.where(is_label, text, "-1").astype(np.int64)
    bad = (values < 0) | (values >= NUM_CLASSES)
    if bad.any():
        row = int(np.argmax(bad))
        legend = ", ".join(f"{i} {n}" for i, n in enumerate(CLASS_NAMES))
        shown = text[row] if len(text[row]) <= 40 else text[row][:40] + "..."
        raise DataError(f"{origin}, line {lines[row]}: emotion '{shown}' is not a label "
                        f"0-{NUM_CLASSES - 1} ({legend})")
    return values


def _parse_pixels(region: np.ndarray, *, row_starts: np.ndarray) -> np.ndarray | None:
    """Tokenise space-separated 0-255 integers, PIXELS_PER_IMAGE per row (each row's text
    starts at its ``row_starts`` offset); None when anything is off (then diagnose).

    Every row's count is checked, not only the total: a row one value short followed by one a
    value too long would otherwise shift pixels from one face into the next.
    """
    chunk_bytes = 2 << 20  # cache-sized pieces, split at spaces, parsed in parallel
    cuts = [0]
    while cuts[-1] + chunk_bytes < len(region):
        cut = cuts[-1] + chunk_bytes
        while cut < len(region) and region[cut] != 32:
            cut += 1
        if cut == len(region):  # no space left to cut at: the rest is one chunk
            break
        cuts.append(cut)
    cuts.append(len(region))

    def parse(start: int, stop: int) -> tuple[np.ndarray, int, np.ndarray] | None:
        """The chunk's values, and how many of them each row it overlaps holds (from row
        ``first``): the rows' starts looked up among the values' offsets, in order."""
        parsed = _parse_pixel_chunk(region[start:stop])
        if parsed is None:
            return None
        values, last_digits = parsed
        first = int(np.searchsorted(row_starts, start, side="right")) - 1
        last = int(np.searchsorted(row_starts, stop))
        values_before = np.searchsorted(last_digits + start, row_starts[first:last])
        return values, first, np.diff(values_before, append=len(values))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = list(pool.map(parse, cuts[:-1], cuts[1:]))
    if any(p is None for p in parts):
        return None
    per_row = np.zeros(len(row_starts), dtype=np.int64)
    for _, first, counts in parts:
        per_row[first:first + len(counts)] += counts
    values = np.concatenate([v for v, _, _ in parts])
    if (per_row != PIXELS_PER_IMAGE).any() or values.max() > 255:
        return None
    return values.astype(np.uint8).reshape(len(row_starts), IMAGE_SIZE, IMAGE_SIZE)


def _parse_pixel_chunk(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The chunk's integers and the offset of each one's last digit in the chunk."""
    padded = np.empty(len(chunk) + 4, dtype=np.uint8)
    padded[:3], padded[3:-1], padded[-1] = 32, chunk, 32
    digits = np.subtract(padded, 48, out=padded)  # spaces wrap around to 240
    is_digit = digits < 10
    if not (is_digit | (digits == 240)).all():
        return None
    ends = np.flatnonzero(is_digit[:-1] > is_digit[1:])
    tens = is_digit[ends - 1]
    hundreds = tens & is_digit[ends - 2]
    if (hundreds & is_digit[ends - 3]).any():
        return None  # four or more digits
    values = digits[ends].astype(np.int16)  # each product in int16 too: NumPy 1.x kept
    values += digits[ends - 1].astype(np.int16) * tens * 10  # uint8 * int16(100) in uint8,
    values += digits[ends - 2].astype(np.int16) * hundreds * 100  # and 300 read as 44
    return values, ends - 3


def _diagnose_pixels(data: bytes, *, origin: str) -> None:
    """Slow path, only after the fast parse failed: find and name the first bad row."""
    frame, lines = _read_csv_frame(data, origin=origin)
    for line, text in zip(lines, frame["pixels"], strict=True):
        _check_pixel_row(text, line=int(line), origin=origin)
    raise DataError(f"{origin}: the pixels column could not be parsed (expected "
                    f"{PIXELS_PER_IMAGE} space-separated integers 0-255 per row)")


def _check_pixel_row(text: str, *, line: int, origin: str) -> None:
    """Raise the DataError naming the first rule ``text`` breaks: the fast parse's rules,
    spelled out (values separated by spaces only, 1-3 digits each, at most 255)."""
    tokens = [token for token in text.split(" ") if token]
    if len(tokens) != PIXELS_PER_IMAGE:
        raise DataError(f"{origin}, line {line}: {len(tokens)} pixel values, expected "
                        f"{PIXELS_PER_IMAGE} (48x48) separated by spaces")
    for position, token in enumerate(tokens):
        if not (token.isascii() and token.isdigit()):
            raise DataError(f"{origin}, line {line}: pixel {position + 1} is {token!r}, "
                            "expected an integer 0-255")
        if len(token) > 3:
            raise DataError(f"{origin}, line {line}: pixel {position + 1} is {token}, "
                            "expected at most 3 digits (0-255)")
        if int(token) > 255:
            raise DataError(f"{origin}, line {line}: pixel {position + 1} is {token}, "
                            "out of range 0-255")
