"""fer.evaluate: scores come out in FER2013's class order, whatever order a model stores."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import brightness_model, ramp_faces, sharpened_defaults

from fer.errors import FerError
from fer.evaluate import to_canonical
from fer.labels import CLASS_NAMES


def test_columns_are_reordered_by_class_name():
    """A model that stores neutral first still scores neutral as class 6, and every other
    column moves to its own name's place; a model of six of the classes scores 0 for the
    seventh."""
    own_order = ["neutral", *CLASS_NAMES[:-1]]
    probabilities = np.eye(7, dtype=np.float32)  # row i: all mass on the model's column i
    assert to_canonical(probabilities, own_order).argmax(axis=1).tolist() == [6, 0, 1, 2, 3, 4, 5]
    six = [name for name in CLASS_NAMES if name != "disgust"][::-1]
    canonical = to_canonical(np.eye(6, dtype=np.float32), six)
    assert canonical[:, CLASS_NAMES.index("disgust")].tolist() == [0.0] * 6
    assert [CLASS_NAMES[i] for i in canonical.argmax(axis=1)] == six


def test_an_evaluation_scores_a_model_in_its_own_class_order(tmp_path):
    """evaluate_split of a model that stores its classes in reverse: its column 4 is fear
    and its column 0 neutral, so dark faces are scored fear and bright ones neutral (read in
    CLASS_NAMES' order they would be sad and angry), in the accuracy, the recalls and the
    confusion matrix alike."""
    from fer.data import Split
    from fer.evaluate import evaluate_split

    images = np.concatenate([np.zeros((3, 48, 48), np.uint8), np.full((4, 48, 48), 255, np.uint8)])
    labels = np.array([2, 2, 4, 6, 6, 6, 0])  # one sad face scored fear, one angry neutral
    metrics = evaluate_split(brightness_model(list(reversed(CLASS_NAMES))),
                             Split(images=images, labels=labels), out_dir=tmp_path)
    assert metrics["accuracy"] == round(5 / 7, 4)
    recall = metrics["per_class_recall"]
    assert (recall["fear"], recall["neutral"], recall["sad"], recall["angry"]) == (1.0, 1.0, 0.0, 0.0)
    matrix = metrics["confusion_matrix"]
    assert (matrix["fear"]["fear"], matrix["sad"]["fear"], matrix["neutral"]["neutral"],
            matrix["angry"]["neutral"]) == (2, 1, 3, 1)
    assert sum(n for row in matrix.values() for n in row.values()) == 7


def test_the_confusion_matrix_has_true_classes_in_rows(tmp_path, monkeypatch):
    """One angry face called fear is counted at row angry, column fear, in the metrics and in
    the matrix the plot is drawn from, whose rows it labels `true`; a class the split lacks
    (disgust) is an empty row, drawn without dividing by zero."""
    import warnings

    import fer.evaluate
    from fer.evaluate import write_reports

    drawn = {}
    plot = fer.evaluate.plot_confusion_matrix

    def recorded(matrix, names, path):
        drawn.update(matrix=matrix.tolist(), names=list(names))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a 0/0 for the empty row would warn
            return plot(matrix, names, path)

    monkeypatch.setattr(fer.evaluate, "plot_confusion_matrix", recorded)
    true = np.array([0, 0, 2, 3, 4, 5, 6, 6])
    predicted = np.array([2, 0, 2, 3, 4, 5, 6, 6])
    metrics = write_reports(true, predicted, out_dir=tmp_path)
    angry, fear = CLASS_NAMES.index("angry"), CLASS_NAMES.index("fear")
    assert drawn["names"] == list(CLASS_NAMES)
    assert drawn["matrix"][angry][fear] == 1 and drawn["matrix"][fear][angry] == 0
    assert drawn["matrix"][angry][angry] == 1 and drawn["matrix"][fear][fear] == 1
    assert metrics["confusion_matrix"]["angry"] == {
        name: {"angry": 1, "fear": 1}.get(name, 0) for name in CLASS_NAMES}
    assert metrics["confusion_matrix"]["disgust"] == dict.fromkeys(CLASS_NAMES, 0)
    assert [[metrics["confusion_matrix"][t][p] for p in CLASS_NAMES] for t in CLASS_NAMES] == \
        drawn["matrix"]
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0


def test_a_model_with_foreign_class_names_is_refused_by_name():
    """A model trained on other labels fails with one line naming them, not a traceback."""
    with pytest.raises(FerError, match=r"classes \['contempt'\] are not FER2013 classes"):
        to_canonical(np.ones((1, 7)), [*CLASS_NAMES[:-1], "contempt"])


def test_a_model_that_scores_nan_is_refused_before_any_report_is_written(tmp_path):
    """`fer evaluate` of a diverged model (one trained elsewhere) had counted every NaN row as
    class 0, `angry`, and written that report: now the scoring stops with the reason, and the
    folder keeps no report of it."""
    from fer.data import Split
    from fer.evaluate import evaluate_split
    from fer.models import get_spec

    diverged = get_spec("default").build()
    for layer in diverged.layers:
        layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])
    split = Split(images=np.full((3, 48, 48), 128, np.uint8), labels=np.array([3, 4, 6]))
    with pytest.raises(FerError, match=r"non-finite scores \(NaN or infinity\) for 3 of 3 ") as raised:
        evaluate_split(diverged, split, out_dir=tmp_path)
    assert "--precision float32" not in str(raised.value)  # it computed in float32 already
    assert not list(tmp_path.iterdir())


def test_the_hint_to_compute_in_float32_reaches_an_ensembles_members(tmp_path):
    """An ensemble's members are models inside the saved model: loaded in mixed float16,
    they compute in it, and the error for non-finite scores says to try float32 (it had
    looked at the top-level layers only, which an average keeps in float32). In mixed
    bfloat16, whose range is float32's, overflow is no explanation and the hint is not
    given (it had been, for any mixed precision)."""
    from fer.data import Split
    from fer.errors import NonFiniteScoresError
    from fer.evaluate import predict_probabilities
    from fer.models import averaging, get_spec, load_model

    members = [get_spec("default").build() for _ in range(2)]
    for layer in members[0].layers:
        layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])
    averaging(members).save(tmp_path / "ensemble.keras")
    split = Split(images=np.full((2, 48, 48), 128, np.uint8), labels=np.array([3, 4]))
    with pytest.raises(NonFiniteScoresError, match=r"try --precision float32"):
        predict_probabilities(load_model(tmp_path / "ensemble.keras", precision="mixed_float16"),
                              split.images)
    with pytest.raises(NonFiniteScoresError) as raised:
        predict_probabilities(load_model(tmp_path / "ensemble.keras", precision="mixed_bfloat16"),
                              split.images)
    assert "--precision float32" not in str(raised.value)


def test_a_run_whose_model_overflows_in_its_precision_is_scored_in_float32(tmp_path, caplog):
    """A GPU run trains and scores in mixed float16, whose range ends at 65,504: a model whose
    logits pass it scores NaN there. Its hours of training had ended unscored (and a resume
    overflows the same way); now it is scored in float32, with a warning, and the report's
    inference_precision says so."""
    import json

    from fer.data import Split
    from fer.errors import NonFiniteScoresError
    from fer.evaluate import evaluate_run, predict_probabilities
    from fer.models import get_spec, load_model

    model = get_spec("default").build()
    head = model.layers[-3]  # the logits: Dense, then softmax and the class names
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + np.where(np.arange(len(bias)) == 3, 1e5, 0.0)])
    model.save(tmp_path / "model.keras")
    (tmp_path / "metrics.json").write_text(json.dumps({"precision": "mixed_float16"}))
    split = Split(images=np.full((4, 48, 48), 128, np.uint8), labels=np.array([3, 3, 4, 0]))

    with caplog.at_level("WARNING", logger="fer"):
        metrics = evaluate_run(tmp_path, split)

    assert metrics["inference_precision"] == "float32" and metrics["accuracy"] == 0.5
    assert "overflow in mixed_float16 on the test split; scoring it in float32" in caplog.text
    with pytest.raises(NonFiniteScoresError, match=r"overflows in this precision \(try "
                                                   r"--precision float32\)"):  # in float16 it does
        predict_probabilities(load_model(tmp_path / "model.keras", precision="mixed_float16"),
                              split.images)


def test_a_class_the_split_lacks_is_left_out_of_macro_f1_not_scored_zero(tmp_path, caplog):
    """A test split without disgust images, and a model that never says disgust: macro-F1
    averages the six classes the split has, disgust's recall is null (not 0, which read as a
    failed class and cut macro-F1 by 1/7), and the report has no disgust row."""
    from fer.evaluate import write_reports

    true = np.array([0, 0, 2, 3, 4, 5, 6, 6])
    predicted = np.array([2, 0, 2, 3, 4, 5, 6, 6])  # one angry image called fear
    with caplog.at_level("WARNING", logger="fer.evaluate"):
        metrics = write_reports(true, predicted, out_dir=tmp_path)
    assert metrics["per_class_recall"]["disgust"] is None
    assert metrics["per_class_recall"]["angry"] == 0.5
    assert metrics["per_class_support"]["disgust"] == 0
    angry_f1, fear_f1 = 2 * 1.0 * 0.5 / 1.5, 2 * 0.5 * 1.0 / 1.5
    assert metrics["macro_f1"] == round((angry_f1 + fear_f1 + 4) / 6, 4)
    report = (tmp_path / "classification_report.txt").read_text()
    assert "disgust" not in report and "accuracy" in report
    assert caplog.messages == ["the split has no images of disgust: recall null; left out of "
                               "the report and macro-F1 unless predicted"]


def test_a_class_the_split_lacks_but_the_model_predicts_counts_as_f1_zero(tmp_path):
    """Predicting a class the split has none of is an error scikit-learn's macro average
    counts as that class's F1 of 0; its recall stays null, and the report keeps its
    accuracy row (a report over the split's classes alone would swap it for a micro
    average that leaves those predictions out)."""
    from fer.evaluate import write_reports

    true = np.array([0, 0, 2, 3, 4, 5, 6, 6])
    predicted = np.array([1, 0, 2, 3, 4, 5, 6, 6])  # one angry image called disgust
    metrics = write_reports(true, predicted, out_dir=tmp_path)
    assert metrics["per_class_recall"]["disgust"] is None
    assert metrics["macro_f1"] == round((2 / 3 + 0 + 5) / 7, 4)
    report = (tmp_path / "classification_report.txt").read_text()
    assert "disgust" in report
    assert re.search(r"accuracy\s+0\.8750\s+8", report), report


def test_a_split_with_every_class_keeps_every_row(tmp_path):
    """The usual case: seven rows, a class never predicted counts as F1 0 in macro-F1."""
    from fer.evaluate import write_reports

    true = np.arange(7)
    predicted = np.array([0, 0, 2, 3, 4, 5, 6])  # disgust never predicted
    metrics = write_reports(true, predicted, out_dir=tmp_path)
    assert metrics["per_class_recall"]["disgust"] == 0.0
    assert metrics["macro_f1"] == round((2 / 3 + 0 + 5) / 7, 4)


def test_a_report_that_cannot_be_written_whole_leaves_the_previous_one(tmp_path, monkeypatch):
    """A full disk while the confusion matrix is drawn had left the new text and JSON
    reports beside the previous confusion matrix and metrics.json (which then described
    another model); the previous report stays whole, and no half-written one is left."""
    import errno

    import fer.evaluate
    from fer.data import Split
    from fer.evaluate import evaluate_split
    from fer.models import get_spec

    split = Split(images=np.full((7, 48, 48), 128, np.uint8), labels=np.arange(7))
    evaluate_split(get_spec("default").build(), split, out_dir=tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert sorted(before) == ["classification_report.json", "classification_report.txt",
                              "confusion_matrix.png", "metrics.json"]

    def disk_full(matrix, names, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fer.evaluate, "plot_confusion_matrix", disk_full)
    other = Split(images=split.images, labels=np.full(7, 3))  # a report that reads otherwise
    with pytest.raises(OSError, match="No space left"):
        evaluate_split(get_spec("default").build(), other, out_dir=tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before

    # a killed process's staging folder goes with the next report; a running one's stays
    monkeypatch.undo()
    import socket

    here = socket.gethostname()
    for name in (f".report-999999999-dead-{here}", f".report-{os.getppid()}-live-{here}",
                 ".report-999999999-elsewhere-another-host"):
        (tmp_path / name).mkdir()
    evaluate_split(get_spec("default").build(), other, out_dir=tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([
        f".report-{os.getppid()}-live-{here}", ".report-999999999-elsewhere-another-host",
        *before])


def _noise_tree(root, *, seed: int, per_class: int = 2):
    """train/ and test/ of distinct random images, their pixels by the seed."""
    from conftest import encode_image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in CLASS_NAMES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for n in range(per_class):
                image = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                (folder / f"{n}.png").write_bytes(encode_image(image))
    return root


def _faces(rng, count: int) -> list[np.ndarray]:
    """Smooth random 48x48 images with a little grain: as JPEG treats faces, not noise."""
    import cv2

    images = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, (6, 6)).astype(np.float32)
        smooth = cv2.resize(coarse, (48, 48), interpolation=cv2.INTER_CUBIC)
        images.append(np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8))
    return images


def test_a_run_trained_on_the_csv_and_scored_on_the_image_layout_counts_its_images(tmp_path,
                                                                                  caplog):
    """FER2013's image layout holds the CSV's pixels through JPEG (quality 95): a run
    trained on the CSV and scored on the layout's test/, whose faces are its validation and
    training rows, was reported to have seen none of them (0, without a warning), since no
    decoded JPEG equals its row byte for byte. Near copies count; other faces do not, nor
    one whose near copy the run's own test split holds (FER2013 has some faces twice, and
    the run's own test report scored those without a word)."""
    import json

    from conftest import csv_row, encode_image, write_csv

    from fer.data import load_dataset
    from fer.evaluate import seen_in_training

    rng = np.random.default_rng(3)
    rows, seen = [], []
    for usage in ("Training", "PublicTest", "PrivateTest"):
        for label in range(len(CLASS_NAMES)):
            for image in _faces(rng, 3):
                rows.append(csv_row(label, image, usage))
                if usage != "PrivateTest":
                    seen.append((label, image))
    twice_label, twice = seen[0]  # in its test split too, a grey level lighter
    rows.append(csv_row(twice_label, np.minimum(twice.astype(int) + 1, 255).astype(np.uint8),
                        "PrivateTest"))
    csv = write_csv(tmp_path / "fer2013.csv", rows)
    own = load_dataset(csv, cache_dir=tmp_path / "cache")
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps(
        {"data": {"source": str(csv), "sha256": own.sha256}}))
    layout = tmp_path / "layout"
    for n, (label, image) in enumerate(seen[::4]):  # 11 of its training and validation faces, twice the first
        folder = layout / "test" / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"seen-{n}.jpg").write_bytes(encode_image(image, ".jpg"))
    for n, image in enumerate(_faces(rng, 7)):  # and faces it never saw
        (layout / "test" / CLASS_NAMES[n]).mkdir(parents=True, exist_ok=True)
        (layout / "test" / CLASS_NAMES[n] / f"new-{n}.jpg").write_bytes(encode_image(image, ".jpg"))
    scored = load_dataset(layout, cache_dir=tmp_path / "cache", require_train=False)
    assert not any(image.tobytes() == original.tobytes()  # why byte for byte found none
                   for image in scored.test.images for _, original in seen)
    assert seen_in_training(run_dir, scored, data_dir=tmp_path / "cache") == 10  # not twice
    assert "10 of the 18 test images are images the run trained or chose its epoch on" \
           in caplog.text


def test_a_copy_is_found_behind_a_face_closer_on_the_coarse_grid():
    """A face whose block means equal the image's (a fine checkerboard added: its blocks
    average it out) is nearest on the coarse grid but no copy; the copy a grey level away
    behind it is still found (only the nearest was checked pixel by pixel)."""
    from fer.evaluate import have_copies_in

    face = 50 + _faces(np.random.default_rng(5), 1)[0].astype(int) * 150 // 255  # no clipping
    checkerboard = np.where(np.indices((48, 48)).sum(axis=0) % 2, 40, -40)
    decoy = np.clip(face + checkerboard, 0, 255)
    copy = np.clip(face + 1, 0, 255)
    pool = np.stack([decoy, copy]).astype(np.uint8)
    assert have_copies_in(face[None].astype(np.uint8), pool).tolist() == [True]
    assert have_copies_in(face[None].astype(np.uint8), pool[:1]).tolist() == [False]


def test_the_runs_own_test_split_from_another_copy_of_its_data_is_unseen(tmp_path, caplog):
    """A run trained on a fetched archive's unpacked folder, scored on the archive itself on
    another machine (its model from `fer reports get`): the archive's sha256 is not the
    folder's, and the folder is not there to compare with, so it read null with a warning;
    the test split's own fingerprint, in the manifest, says it is the run's test split: 0."""
    import json
    import shutil

    from conftest import zip_folder

    from fer.data import load_dataset, split_sha256
    from fer.evaluate import seen_in_training

    folder = _noise_tree(tmp_path / "unpacked", seed=1)
    own = load_dataset(folder, cache_dir=tmp_path / "cache")
    archive = zip_folder(folder, tmp_path / "fer.zip")
    shutil.rmtree(folder)  # another machine: only the archive
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    scored = load_dataset(archive, cache_dir=tmp_path / "cache", require_train=False)
    assert scored.sha256 != own.sha256
    record = {"source": str(folder), "sha256": own.sha256}
    (run_dir / "manifest.json").write_text(json.dumps({"data": record}))
    assert seen_in_training(run_dir, scored, data_dir=tmp_path / "cache") is None  # an old run's
    record["test_split_sha256"] = split_sha256(own.test)
    (run_dir / "manifest.json").write_text(json.dumps({"data": record}))
    caplog.clear()
    assert seen_in_training(run_dir, scored, data_dir=tmp_path / "cache") == 0
    assert "other data" not in caplog.text


def test_scoring_on_other_data_counts_the_images_the_run_saw(tmp_path, caplog):
    """A run trained on one copy and scored on another whose test/ holds some of its
    training images (FER2013's CSV and image layout split one set of images differently):
    counted and warned of, except one that is in the run's own test split too (FER2013
    holds some images twice); 0 for its own data; None (cannot be told, not 0) where its
    data has changed or is gone, or no run manifest is beside the model, and said."""
    import json
    import shutil

    from fer.data import load_dataset
    from fer.evaluate import seen_in_training

    trained_on = _noise_tree(tmp_path / "a", seed=1)
    other = _noise_tree(tmp_path / "b", seed=2)
    for n, happy in enumerate(sorted((trained_on / "train" / "happy").iterdir())):
        shutil.copy(happy, other / "test" / "happy" / f"from-a-{n}.png")
    twice = next((trained_on / "train" / "sad").iterdir())  # in its train and test alike
    shutil.copy(twice, trained_on / "test" / "sad" / "twice.png")
    shutil.copy(twice, other / "test" / "sad" / "twice.png")
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    own = load_dataset(trained_on, cache_dir=tmp_path / "cache")
    (run_dir / "manifest.json").write_text(json.dumps(
        {"data": {"source": str(trained_on), "sha256": own.sha256}}))

    scored = load_dataset(other, cache_dir=tmp_path / "cache", require_train=False)
    assert seen_in_training(run_dir, scored, data_dir=tmp_path / "cache") == 2
    assert "2 of the 17 test images are images the run trained or chose its epoch on" \
           in caplog.text
    assert seen_in_training(run_dir, own, data_dir=tmp_path / "cache") == 0
    assert seen_in_training(tmp_path, scored, data_dir=tmp_path / "cache") is None  # no run
    extra = trained_on / "train" / "sad" / "later.png"
    shutil.copy(next((trained_on / "train" / "sad").iterdir()), extra)
    assert seen_in_training(run_dir, scored, data_dir=tmp_path / "cache") is None
    assert "changed since the run trained on it" in caplog.text
    shutil.rmtree(trained_on)
    caplog.clear()  # the step before said "cannot be read as it was" too
    assert seen_in_training(run_dir, scored, data_dir=tmp_path / "cache") is None
    assert "which cannot be read as it was" in caplog.text
    assert f"{trained_on}: data source not found" in caplog.text


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_one_batch_scores_as_several_batches_do(tmp_path, precision):
    """Inputs that fit one batch skip predict's tf.data setup (`fer predict face.png` paid
    3-4x the model's own time for it): the scores are those of the batched path, and a NaN
    is refused on both."""

    from fer.errors import NonFiniteScoresError
    from fer.evaluate import predict_probabilities
    from fer.models import with_precision

    model = with_precision(sharpened_defaults(1)[0], policy=precision)
    images = ramp_faces(5, seed=3)[..., 0].astype(np.uint8)
    one_batch = predict_probabilities(model, images, batch_size=8)
    batched = predict_probabilities(model, images, batch_size=2)
    assert one_batch.shape == (5, 7) and one_batch.dtype == batched.dtype
    tolerance = 1e-5 if precision == "float32" else 1e-2  # sharpened: a batch size's own
    # rounding in the logits, scaled up, may reach a few 1e-6 on another CPU's kernels
    assert np.allclose(one_batch, batched, atol=tolerance)
    assert np.allclose(predict_probabilities(model, images[:1]), batched[:1], atol=tolerance)
    assert not np.allclose(batched[1:], batched[:-1], atol=1e-2)  # each image's own scores
    for layer in model.layers:
        layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])
    for batch_size in (8, 2):  # one batch, and several
        with pytest.raises(NonFiniteScoresError):
            predict_probabilities(model, images, batch_size=batch_size)
