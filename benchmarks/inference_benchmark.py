"""Inference throughput (batch) and single-image latency: fer's model vs the mini-Xception peer.

Both are measured in the same run on the same test images, in float32 and in the precision
`fer predict` picks on this machine (``auto``: bf16 on CPUs with bf16 instructions); fer's
figures at ``auto`` are printed as ratios to the peer's faster ones. Usage:

    python benchmarks/inference_benchmark.py --data ../shared/data/fer2013.zip [--model runs/<id>/model.keras]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from common import BENCH_CACHE, machine_line

from fer.data import load_dataset


def batch_throughput(model, pixels: np.ndarray, *, batch_size: int) -> float:
    """Images/s of one ``model.predict`` pass over the whole array (float32 pixels)."""
    started = time.perf_counter()
    model.predict(pixels, batch_size=batch_size, verbose=0)
    return len(pixels) / (time.perf_counter() - started)


def single_image_latency_ms(model, image: np.ndarray, *, calls: int = 200) -> float:
    """Median model time for one image through a compiled forward pass."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    pixels = tf.constant(image[None, ..., None].astype("float32"))
    for _ in range(10):
        forward(pixels)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        forward(pixels).numpy()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a trained fer model; default: an untrained "
                                                   "default model (same compute)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="alternating throughput rounds")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch-size: expected at least 1")

    from fer.models import get_spec, load_model, with_precision
    from fer.precision import choose_precision

    print(machine_line(), flush=True)
    test = load_dataset(args.data, cache_dir=BENCH_CACHE,
                        require_train=False).test
    ours = load_model(args.model) if args.model else get_spec("default").build()
    peer = get_spec("mini-xception").build()
    auto = choose_precision("auto")  # what `fer predict`/`fer evaluate` use on this machine
    precisions = ["float32"] + ([auto] if auto != "float32" else [])
    variants = {(name, precision): model if precision == "float32"
                else with_precision(model, policy=precision)
                for name, model in (("mini-xception", peer), ("fer", ours))
                for precision in precisions}
    pixels = test.images[..., None].astype("float32")
    throughputs = {key: 0.0 for key in variants}
    for variant in variants.values():  # warm-up: compile each predict function
        variant.predict(pixels[:args.batch_size], batch_size=args.batch_size, verbose=0)
    # The VM's speed swings by 1.5x within minutes: rounds alternate the models, so each
    # one's best pass comes from the same phases, and the best of the rounds is kept.
    for _ in range(args.rounds):
        for key, variant in variants.items():
            throughputs[key] = max(throughputs[key], batch_throughput(
                variant, pixels, batch_size=args.batch_size))
    results = {}
    for (name, precision), variant in variants.items():
        latency = single_image_latency_ms(variant, test.images[0])
        results[name, precision] = (throughputs[name, precision], latency)
        print(f"{name:14s} {precision:15s} {throughputs[name, precision]:8.0f} images/s (batch "
              f"{args.batch_size}, {len(test)} images, best of {args.rounds} alternating "
              f"rounds)   one image: {latency:.2f} ms", flush=True)
    # fer at the precision `fer predict` picks here ("auto"); the peer at its best in each
    # figure apart (its higher throughput and its lower latency may come from different
    # precisions: a ratio to the other one would flatter fer).
    peer_throughput = max(results["mini-xception", p][0] for p in precisions)
    peer_latency = min(results["mini-xception", p][1] for p in precisions)
    mine = results["fer", auto]
    print(f"ratios (fer at auto = {auto} vs the peer's best of each): throughput "
          f"{mine[0] / peer_throughput:.2f}x the peer's highest; latency "
          f"{mine[1] / peer_latency:.2f}x the peer's lowest")


if __name__ == "__main__":
    main()
