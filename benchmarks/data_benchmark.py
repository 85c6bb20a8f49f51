"""Dataset load times: the full-size fer2013.csv parsed cold, then loaded from the npz cache.

The CSV is generated from the image archive (Training + PublicTest, PublicTest repeated as
PrivateTest to reach the original's 35,887 rows). Usage:

    python benchmarks/data_benchmark.py --data ../shared/data/fer2013.zip
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine_line
from make_csv import write_csv

from fer.data import load_dataset, read_splits


def timed(label: str, action) -> object:
    started = time.perf_counter()
    result = action()
    print(f"{label:38s} {time.perf_counter() - started:6.2f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "fer2013.csv"
        rows = write_csv(read_splits(args.data), csv_path, private_from_test=True)
        print(f"generated {csv_path.name}: {rows} rows, {csv_path.stat().st_size / 1e6:.0f} MB")
        cache = Path(tmp) / "cache"
        timed("parse CSV (no cache)", lambda: read_splits(csv_path))
        timed("load_dataset, cold (hash+parse+cache)", lambda: load_dataset(csv_path, cache_dir=cache))
        timed("load_dataset, cached", lambda: load_dataset(csv_path, cache_dir=cache))
        timed("decode image zip (no cache)", lambda: read_splits(args.data))


if __name__ == "__main__":
    main()
