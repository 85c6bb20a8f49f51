"""Training and inference speed of a model in float32 and in mixed_bfloat16, side by side.

`--precision auto` picks bf16 from the CPU's flags; this script checks what each precision
is worth in this process's setting, for instance with TensorFlow's oneDNN kernels off
(run it once with TF_ENABLE_ONEDNN_OPTS=0 and once with 1). Training: images/s of
``--steps`` steps of batch 64 on real training images, after 3 warm-up steps. Inference:
images/s of one pass over the test split through fer's scoring call (an untrained model:
the same compute), after a warm-up pass. Usage:

    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/precision_benchmark.py --data ../shared/data/fer2013.zip
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (
    BENCH_CACHE,
    batch_throughput,
    machine_line,
    measure_training_throughput,
    refuse_below_one,
)

from fer.data import load_dataset

PRECISIONS = ("float32", "mixed_bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps")
    args = parser.parse_args()
    refuse_below_one(parser, args, ("steps",))

    from fer.models import get_spec, with_precision

    print(machine_line(), flush=True)  # it names oneDNN on or off
    dataset = load_dataset(args.data, cache_dir=BENCH_CACHE)
    for precision in PRECISIONS:
        images_per_second = measure_training_throughput(
            args.model, dataset.train, batch_size=64, steps=args.steps, precision=precision)
        print(f"{args.model} {precision:15s} training {images_per_second:7.1f} images/s "
              f"({args.steps} steps of 64)", flush=True)
    model = get_spec(args.model).build()
    for precision in PRECISIONS:
        variant = model if precision == "float32" else with_precision(model, policy=precision)
        batch_throughput(variant, dataset.test.images, batch_size=256)  # warm-up: traces it
        images_per_second = batch_throughput(variant, dataset.test.images, batch_size=256)
        print(f"{args.model} {precision:15s} inference {images_per_second:7.1f} images/s "
              f"({len(dataset.test)} test images)", flush=True)


if __name__ == "__main__":
    main()
