"""Write a ``fer2013.csv`` (emotion,pixels,Usage) from an image-layout source.

The full original CSV has 35,887 rows; the image archive holds Training and PublicTest
only, so ``--private-from-test`` repeats the test rows as PrivateTest to reach the
original's size for parsing benchmarks. Usage: python benchmarks/make_csv.py SRC OUT.csv
"""

import argparse
from pathlib import Path

import numpy as np

from fer.data import read_splits


def write_csv(splits, out: Path, *, private_from_test: bool) -> int:
    usages = [("train", "Training"), ("test", "PublicTest")]
    if private_from_test:
        usages.append(("test", "PrivateTest"))
    rows = 0
    with open(out, "w") as handle:
        handle.write("emotion,pixels,Usage\n")
        for split_name, usage in usages:
            split = splits[split_name]
            for label, image in zip(split.labels, split.images, strict=True):
                handle.write(f"{label},{' '.join(map(str, image.ravel().tolist()))},{usage}\n")
                rows += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--private-from-test", action="store_true")
    args = parser.parse_args()
    rows = write_csv(read_splits(args.source), args.out, private_from_test=args.private_from_test)
    print(f"wrote {rows} rows to {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    np.set_printoptions(threshold=10)
    main()
