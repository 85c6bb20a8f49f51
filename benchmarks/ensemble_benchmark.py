"""Score the average of saved runs' models, with and without flip averaging.

What `fer train --ensemble N` would save, measured from runs already trained (members
from different seeds on the same split): the validation accuracy and macro-F1 of each
member alone and of their average, each with and without flip averaging; then the test
accuracy, macro-F1 and per-class recall of the one validation chooses, the test split
read once (since session 40; earlier sections of BENCHMARKS.md printed test for each).
Usage:

    python benchmarks/ensemble_benchmark.py --data ../shared/data/fer2013.zip \
        --run runs/<id-1> --run runs/<id-2> [--save ensemble.keras]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from common import BENCH_CACHE, machine_line

from fer.config import DEFAULT_SEED
from fer.data import load_dataset
from fer.evaluate import predict_labels
from fer.labels import CLASS_NAMES
from fer.models import averaging, class_names_of, load_model, with_precision
from fer.precision import PRECISIONS, choose_precision


def single_view(model):
    """The one-view network inside a model saved with flip averaging (itself otherwise)."""
    import keras

    from fer.models import ClassNames

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nested:
        return model
    if len(nested) > 1:
        raise SystemExit(f"{model.name}: already an ensemble; pass its members' runs instead")
    core = nested[0]
    outputs = ClassNames(class_names_of(model), name="class_names")(core.output)
    return keras.Model(core.inputs, outputs, name=core.name)


def shared_split(runs: list[Path]) -> tuple[str, float, int, str]:
    """The data sha256, validation fraction, split seed and validation origin every run was
    trained with.

    Averaging runs trained on different splits would score some members on images they
    trained on (`fer train --split-seed`; before it, `--seed` seeded the split): such runs
    are refused. Members of one ensemble come from `train_benchmark.py --profile P --member K`.
    """
    splits = {}
    for run in runs:
        manifest = json.loads((run / "manifest.json").read_text())
        parameters = manifest["parameters"]
        origin = manifest["data"]["validation"]
        if "folded into train" in origin:  # variant_benchmark.py --refit
            raise SystemExit(f"{run}: trained on its validation images too (--refit), so "
                             "validation cannot choose among candidates that include it")
        found = re.search(r"seed (\d+)", origin)
        seed = int(found.group(1)) if found else None
        splits[run] = (manifest["data"]["sha256"], parameters["val_fraction"], seed, origin)
    if len(set(splits.values())) != 1:
        listing = "; ".join(f"{run}: data {sha[:8]}, validation {origin}"
                            for run, (sha, _, _, origin) in splits.items())
        raise SystemExit(f"the runs were trained on different splits: {listing}")
    return next(iter(splits.values()))


def scores(model, split) -> dict:
    from sklearn.metrics import f1_score, recall_score

    predicted = predict_labels(model, split.images)
    # each class in CLASS_NAMES order (without `labels`, a class missing from a subset
    # shifted the later ones left); a class the split has no images of has no recall
    classes = list(range(len(CLASS_NAMES)))
    recall = recall_score(split.labels, predicted, labels=classes, average=None, zero_division=0)
    support = np.bincount(split.labels, minlength=len(classes))
    return {"accuracy": round(float(np.mean(predicted == split.labels)), 4),
            "macro_f1": round(float(f1_score(split.labels, predicted, average="macro")), 4),
            "recall": [round(float(r), 3) if count else None
                       for r, count in zip(recall, support, strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, action="append", required=True,
                        help="a run folder (repeat for each member)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--save", type=Path, help="also write the average of all runs with flip "
                        "averaging (float32, what `--ensemble N --tta` saves) to this .keras file")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    sha256, fraction, seed, origin = shared_split(args.run)
    dataset = load_dataset(args.data, val_fraction=fraction,
                           seed=DEFAULT_SEED if seed is None else seed,  # a source's own split
                           cache_dir=BENCH_CACHE)
    if dataset.sha256 != sha256:
        raise SystemExit(f"{args.data}: sha256 {dataset.sha256[:8]}..., but the runs were "
                         f"trained on {sha256[:8]}...")
    if dataset.validation_origin != origin:  # a split carved by an older fer
        raise SystemExit(f"the runs' validation was {origin}; this fer's is "
                         f"{dataset.validation_origin}: score them with the fer that trained them")
    precision = choose_precision(args.precision)
    members = [single_view(load_model(run / "model.keras")) for run in args.run]
    candidates = [(f"member {run.name}", [member]) for run, member in zip(args.run, members,
                                                                           strict=True)]
    if len(members) > 1:
        candidates.append((f"average of {len(members)}", members))
    chosen = None  # (validation accuracy, label, model): the first best, on validation only
    for label, models in candidates:
        for flip in (False, True):
            model = averaging(models, flip=flip)
            if precision != "float32":
                model = with_precision(model, policy=precision)
            label_flip = f"{label}{' + flip' if flip else ''}"
            validation = scores(model, dataset.validation)
            print(f"{label_flip}: validation {validation['accuracy']:.4f}  macro-F1 "
                  f"{validation['macro_f1']:.4f}", flush=True)
            if chosen is None or validation["accuracy"] > chosen[0]:
                chosen = (validation["accuracy"], label_flip, model)
    # the test split is read once, for the candidate validation chose
    accuracy, label_flip, model = chosen
    test = scores(model, dataset.test)
    print(f"chosen on validation: {label_flip}: validation {accuracy:.4f}  test "
          f"{test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  test recall "
          f"{json.dumps(test['recall'])}", flush=True)
    if args.save:
        averaging(members, flip=True).save(args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
