"""A model's training speed against the seed model's, in matched phases of a throttled VM.

The 2-core VMs this project is measured on are CPU-throttled by their host with a period of
about 5.1 s: a throttled stretch of training does the same work per image and then waits for
the next period (BENCHMARKS.md, "The throttled phase"). A ratio of two figures measured one
after the other (train_benchmark.py) then depends on which phase each model drew. This
script alternates `fit` windows of the seed and the model on the same real training
batches, many times, and compares each model's fastest window (its unthrottled speed, as
near as the windows get to it). Throttled windows end on period boundaries, so their
images/s are rounded figures; the median over all windows is printed for reference only.
Usage:

    python benchmarks/speed_ratio_benchmark.py --data ../shared/data/fer2013.zip --seconds 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import (
    BENCH_CACHE,
    compiled_model,
    fit_images_per_second,
    full_training_batches,
    machine_line,
    refuse_below_one,
)

from fer.precision import PRECISIONS, choose_precision, prefer_onednn


def main() -> None:
    prefer_onednn()  # as `fer train` does, before TensorFlow loads
    from fer.models import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="default",
                        choices=sorted(name for name in REGISTRY if name != "seed"),
                        help="the model timed against the seed")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed-steps", type=int, default=24, help="steps per seed window")
    parser.add_argument("--model-steps", type=int,
                        help="steps per model window (default: as many as take the time of a "
                             "seed window, from the warm-up windows: the fastest window of a "
                             "shorter one would be favoured)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = parser.parse_args()
    refuse_below_one(parser, args, ("batch_size", "seed_steps", "model_steps"))
    if not args.seconds > 0:
        parser.error(f"--seconds {args.seconds:g}: expected more than 0")

    from fer.data import load_dataset

    precision = choose_precision(args.precision)
    print(machine_line(), precision)
    dataset = load_dataset(args.data, cache_dir=BENCH_CACHE)
    batches = full_training_batches(dataset.train, batch_size=args.batch_size)
    models = {name: compiled_model(name, precision, dataset.train.images)
              for name in ("seed", args.model)}
    steps = {"seed": args.seed_steps, args.model: args.model_steps or args.seed_steps}
    rates: dict[str, list[float]] = {name: [] for name in models}

    def window(name: str) -> float:
        return fit_images_per_second(models[name], batches, steps=steps[name],
                                     batch_size=args.batch_size)

    for name in models:  # compile and warm up
        window(name)
    warm = {name: window(name) for name in models}  # traced: each model's speed
    if args.model_steps is None:  # windows of about equal length
        steps[args.model] = max(1, round(args.seed_steps * warm[args.model] / warm["seed"]))
    print(f"warm-up window: seed {warm['seed']:.1f}, {args.model} {warm[args.model]:.1f} images/s")
    print(f"steps per window: seed {steps['seed']}, {args.model} {steps[args.model]}")
    began = time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        line = []
        for name in models:
            rates[name].append(window(name))
            line.append(f"{name} {rates[name][-1]:7.1f}")
        print(f"{time.perf_counter() - began:6.1f} s  " + " | ".join(line) + "  images/s",
              flush=True)

    seed, model = rates["seed"], rates[args.model]
    print(f"windows: {len(seed)} each")
    print(f"fastest window: seed {max(seed):.1f}, {args.model} {max(model):.1f} images/s, "
          f"ratio {max(model) / max(seed):.2f}x")
    print(f"median of all windows: seed {statistics.median(seed):.1f}, {args.model} "
          f"{statistics.median(model):.1f} images/s, ratio "
          f"{statistics.median(model) / statistics.median(seed):.2f}x")


if __name__ == "__main__":
    main()
