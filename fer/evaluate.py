"""Score a model on a split and write the report files a run folder carries."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from fer.data import Dataset, Split
from fer.errors import FerError, NonFiniteScoresError, writing
from fer.labels import CLASS_INDEX, CLASS_NAMES
from fer.manifest import read_json, write_json
from fer.models import class_names_of, computes_mixed
from fer.pipeline import image_batches
from fer.plots import plot_confusion_matrix

log = logging.getLogger(__name__)

T = TypeVar("T")


def predict_probabilities(model, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for uint8 images (n, 48, 48), in the model's own class order.

    A model that scores any image NaN or infinite is refused here, for every caller: NaN
    would be `angry` to argmax (predict's answer, evaluate's confusion matrix) and invalid
    JSON in a report.
    """
    if 0 < len(images) <= batch_size:  # one batch (`fer predict face.png`): without the
        # per-call setup of `predict` over a tf.data pipeline, 3-4x the model's own time
        # for one image (BENCHMARKS.md, session 48)
        pixels = images.reshape(-1, images.shape[1], images.shape[2], 1).astype("float32")
        probabilities = np.asarray(model.predict_on_batch(pixels))
    else:
        probabilities = np.asarray(model.predict(image_batches(images, batch_size=batch_size),
                                                 verbose=0))
    broken = int(np.sum(~np.isfinite(probabilities).all(axis=1)))
    if broken:
        overflow = (", or overflows in this precision (try --precision float32)"
                    if computes_mixed(model, "mixed_float16") else "")  # bf16: float32's range
        raise NonFiniteScoresError(
            f"the model gives non-finite scores (NaN or infinity) for {broken} of "
            f"{len(images)} images: it was not trained to a usable state (did its training "
            f"diverge? see its history.csv){overflow}")
    return probabilities


def predict_labels(model, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Predicted class indices in CLASS_NAMES order, whatever the model's own order."""
    probabilities = predict_probabilities(model, images, batch_size=batch_size)
    return to_canonical(probabilities, class_names_of(model)).argmax(axis=1)


def check_fer_classes(model_class_names: list[str]) -> None:
    """A model scored on FER2013 must name FER2013's classes (in any order)."""
    unknown = [n for n in model_class_names if n not in CLASS_INDEX]
    if unknown:
        raise FerError(f"the model's classes {unknown} are not FER2013 classes "
                       f"(expected names from {', '.join(CLASS_NAMES)})")


def to_canonical(probabilities: np.ndarray, model_class_names: list[str]) -> np.ndarray:
    """Reorder columns from the model's class order to CLASS_NAMES, by name."""
    check_fer_classes(model_class_names)
    canonical = np.zeros((len(probabilities), len(CLASS_NAMES)), dtype=probabilities.dtype)
    for column, name in enumerate(model_class_names):
        canonical[:, CLASS_INDEX[name]] = probabilities[:, column]
    return canonical


def evaluate_run(run_dir: Path, test: Split, *, precision: str | None = None) -> dict:
    """Score a run folder's model on the test split; merge into its training metrics.

    The model computes in ``precision`` (a resolved Keras policy); None: the precision the
    run trained in, so the report shows what inference on that machine gives. A model that
    overflows there (float16 on a GPU) is scored in float32, with a warning, rather than
    leaving hours of training unscored: `--resume` would overflow the same way.
    """
    from fer.models import load_model

    metrics_path = run_dir / "metrics.json"
    training = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    precision = precision or training.get("precision", "float32")

    def scored_in(policy: str) -> dict:
        return evaluate_split(load_model(run_dir / "model.keras", precision=policy), test,
                              out_dir=run_dir,
                              extra_metrics={**training, "inference_precision": policy})

    return in_float32_where_it_overflows(scored_in, precision, what="the test split")


def in_float32_where_it_overflows(score: Callable[[str], T], precision: str, *, what: str,
                                  reported: bool = True) -> T:
    """``score(precision)``; where the model's scores are not finite in mixed float16
    (whose range ends at 65,504: a GPU's ``auto``), ``score("float32")`` with a warning
    naming ``what`` was scored (and, with ``reported``, that the report's
    inference_precision says so). A model broken in float32 too fails there, with float32's
    message."""
    try:
        return score(precision)
    except NonFiniteScoresError:
        if precision != "mixed_float16":  # float32, or bf16, which has float32's range
            raise
        log.warning("the model's scores overflow in %s on %s; scoring it in float32%s",
                    precision, what,
                    " (the report's inference_precision says so)" if reported else "")
        return score("float32")


def evaluate_split(model, split: Split, *, out_dir: Path, batch_size: int = 256,
                   extra_metrics: dict | None = None) -> dict:
    """Write the classification report (txt/json), confusion matrix and metrics.json."""
    started = time.perf_counter()
    predicted = predict_labels(model, split.images, batch_size=batch_size)
    seconds = time.perf_counter() - started
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)  # after scoring: a refused model leaves none
    with _staged(out_dir) as staging:
        metrics = {**(extra_metrics or {}),
                   **write_reports(split.labels, predicted, out_dir=staging)}
        metrics["test_images_per_second"] = round(len(split) / seconds, 1)
        write_json(staging / "metrics.json", metrics)
    return metrics


STAGING_PREFIX = ".report-"


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A folder inside ``out_dir`` to write a report's files in, moved into ``out_dir`` when
    all are written (metrics.json last): a write that fails (a full disk) or a stop while
    writing leaves the previous report whole, not its metrics beside half of the new files
    (only a stop between the four renames that follow can still mix them). One left by a
    killed process is removed by the next report written there."""
    host = socket.gethostname()
    _remove_abandoned_staging(out_dir, host=host)
    staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{host}"
    try:
        with writing(staging):
            staging.mkdir()
        yield staging
        names = sorted(path.name for path in staging.iterdir())
        for name in sorted(names, key=lambda name: name == "metrics.json"):
            with writing(out_dir / name):
                os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned_staging(out_dir: Path, *, host: str) -> None:
    """Remove the staging folders of ``host``'s (this machine's) processes that no longer
    run (killed mid-report); another process's report in progress keeps its own, and so
    does every other machine's (a shared disk, a container: its process ids are not this
    one's)."""
    for folder in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid, _, rest = folder.name[len(STAGING_PREFIX):].partition("-")
        if not pid.isdigit() or int(pid) == os.getpid() or rest.partition("-")[2] != host:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # another user's process: running
            pass


def seen_in_training(run_dir: Path, scored: Dataset, *, data_dir: Path) -> int | None:
    """For a run's model: how many of ``scored``'s test images are copies (pixel for pixel,
    or through JPEG: :func:`have_copies_in`) of ones the run trained or chose its epoch on
    (its data's train and validation splits), with a warning when any; 0 for the run's
    own data. None: it cannot be told (no run manifest beside the model, or the run's data
    no longer on this machine as it was: a warning says so), which a report must not show
    as 0.

    FER2013's copies split one set of images differently (the CSV's PublicTest rows are a
    run's validation split there, and test images in the image layout): a model trained on
    one copy and scored on another's test split is partly scored on images it was chosen
    on, and its "test" figure is not one. Images the run's own test split holds as well
    are not counted: FER2013 has some images twice, in train and test, and the run's own
    test report scored those without a word.
    """
    from fer.data import load_dataset, split_sha256

    recorded = read_json(run_dir / "manifest.json").get("data")
    if not isinstance(recorded, dict) or recorded.get("sha256") is None:
        return None
    if recorded["sha256"] == scored.sha256:  # its own test split: the split keeps them apart
        return 0
    if ("test_split_sha256" in recorded  # runs since the manifest records it
            and recorded["test_split_sha256"] == split_sha256(scored.test)):  # its own test
        return 0  # split from another copy of its data (the archive its folder came from)
    source = str(recorded.get("source"))
    try:
        trained_on = load_dataset(Path(source), cache_dir=data_dir)
        if trained_on.sha256 != recorded["sha256"]:
            raise FerError(f"{source}: changed since the run trained on it")
    except (FerError, OSError) as exc:
        log.warning("scoring on other data than the run trained on, which cannot be read as "
                    "it was (%s): the test images may include ones the run trained or chose "
                    "its epoch on", exc)
        return None
    seen = np.concatenate([trained_on.train.images, trained_on.validation.images])
    seen = seen[~have_copies_in(seen, trained_on.test.images)]
    overlap = int(have_copies_in(scored.test.images, seen).sum())
    if overlap:
        log.warning("%d of the %d test images are images the run trained or chose its epoch "
                    "on (its data: %s): these figures are not test figures for it",
                    overlap, len(scored.test), source)
    return overlap


# JPEG at quality 95 (how FER2013's image layout holds the CSV's pixels) moved 600 of its
# test faces, noised by up to 8 grey levels first, by at most 1.6 levels per pixel on average
# and their 6x6-block means by at most 0.5 (RMS); different faces differ by tens.
COPY_BLOCK_RMS = 2.0
COPY_MEAN_DIFFERENCE = 3.0


def have_copies_in(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Which of ``images`` (n x 48 x 48) have a copy in ``pool``: the same pixels, or as a
    JPEG re-encoding leaves them (the image layout's faces are the CSV's rows through JPEG,
    so a byte-for-byte comparison found none of them; its test/ holds such near copies of
    287 of its train/ faces too). Faces close on an 8x8 grid of block means are candidates,
    checked pixel by pixel; the images are compared in chunks of at most 4M pairs (32 MB a
    matrix, whatever the pool's size)."""
    copies = np.zeros(len(images), dtype=bool)
    if not len(images) or not len(pool):
        return copies

    def block_means(batch: np.ndarray) -> np.ndarray:
        n, height, width = batch.shape
        return batch.reshape(n, 8, height // 8, 8, width // 8).mean(
            axis=(2, 4), dtype=np.float64).reshape(n, 64)

    grid, pool_grid = block_means(images), block_means(pool)
    pool_norms = (pool_grid ** 2).sum(axis=1)
    chunk = max(1, min(512, (1 << 22) // len(pool)))
    for start in range(0, len(grid), chunk):
        part = grid[start:start + chunk]
        squared = (part ** 2).sum(axis=1)[:, None] + pool_norms[None, :] - 2 * part @ pool_grid.T
        for row, candidate in zip(*np.nonzero(squared <= 64 * COPY_BLOCK_RMS ** 2), strict=True):
            if not copies[start + row]:
                difference = np.abs(images[start + row].astype(np.int16)
                                    - pool[candidate].astype(np.int16))
                copies[start + row] = difference.mean() <= COPY_MEAN_DIFFERENCE
    return copies


def write_reports(true: np.ndarray, predicted: np.ndarray, *, out_dir: Path) -> dict:
    """sklearn's report with the canonical class names, the confusion matrix, and key metrics.

    The confusion matrix is in the metrics as counts too (``{true: {predicted: n}}``), for
    a reader of a published report who wants the numbers the plot only draws.

    A class the split has no images of has no recall: it is null, not a 0 that would read
    as a model failing a class it was never tested on, and the class is left out of the
    report and macro-F1 unless the model predicted it (then, as in scikit-learn's own macro
    average, its F1 is 0); all seven always counted, which pulled macro-F1 down by a seventh
    for a subset without `disgust`, the rarest class.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    support = np.bincount(true, minlength=len(CLASS_NAMES))
    absent = [name for name, count in zip(CLASS_NAMES, support, strict=True) if count == 0]
    scored = sorted(set(np.flatnonzero(support).tolist()) | set(np.unique(predicted).tolist()))
    if absent:
        log.warning("the split has no images of %s: recall null; left out of the report and "
                    "macro-F1 unless predicted", ", ".join(absent))
    options = dict(labels=scored, target_names=[CLASS_NAMES[i] for i in scored],
                   zero_division=0, digits=4)
    text = classification_report(true, predicted, **options)
    report = classification_report(true, predicted, output_dict=True, **options)
    with writing(out_dir / "classification_report.txt"):
        (out_dir / "classification_report.txt").write_text(text)
    with writing(out_dir / "classification_report.json"):
        (out_dir / "classification_report.json").write_text(json.dumps(report, indent=2) + "\n")
    matrix = confusion_matrix(true, predicted, labels=list(range(len(CLASS_NAMES))))
    plot_confusion_matrix(matrix, CLASS_NAMES, out_dir / "confusion_matrix.png")
    return {
        "accuracy": round(float(np.mean(true == predicted)), 4),
        "macro_f1": round(float(report["macro avg"]["f1-score"]), 4),
        "per_class_recall": {n: None if n in absent else round(float(report[n]["recall"]), 4)
                             for n in CLASS_NAMES},
        "per_class_support": {n: int(count) for n, count in zip(CLASS_NAMES, support, strict=True)},
        "confusion_matrix": {n: dict(zip(CLASS_NAMES, map(int, row), strict=True))
                             for n, row in zip(CLASS_NAMES, matrix, strict=True)},
        "test_samples": int(len(true)),
    }
