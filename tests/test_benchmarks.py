"""The benchmark scripts behind BENCHMARKS.md still run against fer's current API (nothing
else imports them): one epoch of a variant with --refit, one of a profile against the seed
model timed over a few steps, the average of saved runs, and one round of inference timing,
on a small subset of the real archive."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script as BENCHMARKS.md runs it (from benchmarks/), its data cache under tmp_path."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, name, *map(str, args)], cwd=BENCHMARKS, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def import_benchmark(name: str):
    """A script of benchmarks/ as a module (they import their `common` as a sibling)."""
    import importlib

    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.integration
def test_variant_benchmark_trains_and_refits(tmp_path, fer_subset):
    """--refit keeps the last epoch through a subclass of fer.train.KeepBestWeights, which
    broke once when that class changed under it. A variant that is no registry model
    (`flat`) trains too: fer's model-name check once refused every such variant."""
    done = run_script("variant_benchmark.py", "--data", fer_subset, "--variant", "flat",
                      "--epochs", "2", "--refit", "--out", tmp_path / "runs", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the last epoch whatever validation says (a broken override keeps epoch 1 when it wins)
    assert re.search(r'^flat: \{"best_epoch": 2, "best_val_accuracy": 0\.\d+, '
                     r'"saved_model_val_accuracy": ', done.stdout, re.MULTILINE), done.stdout
    # its validation is in-sample, so it cannot be chosen among on validation: each
    # variant's test figures (without --refit, test_variant_benchmark_chooses_on_validation)
    assert re.findall(r"test", done.stdout) == ["test"], done.stdout
    assert re.search(r"^refit, validation in-sample: flat: test accuracy 0\.\d{4}  "
                     r"macro-F1 0\.\d{4}$", done.stdout, re.MULTILINE), done.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    averaged = run_script("ensemble_benchmark.py", "--data", fer_subset, "--run", run_dir,
                          tmp_path=tmp_path)
    assert averaged.returncode != 0 and "trained on its validation images too" in averaged.stderr


@pytest.mark.integration
def test_variant_benchmark_chooses_on_validation(tmp_path, fer_subset):
    """Variants are compared on their saved models' validation accuracy; the test split's
    figures are printed once, for the one chosen (every variant's were, side by side)."""
    done = run_script("variant_benchmark.py", "--data", fer_subset, "--variant", "flat",
                      "--variant", "default", "--epochs", "1", "--out", tmp_path / "runs",
                      tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    validation = {name: json.loads(figures)["saved_model_val_accuracy"] for name, figures in
                  re.findall(r"^(flat|default): (\{.*\})$", done.stdout, re.MULTILINE)}
    assert list(validation) == ["flat", "default"], done.stdout
    chosen = max(validation, key=validation.get)  # the first of equals, as the script
    assert re.findall(r"test", done.stdout) == ["test"], done.stdout
    assert re.search(rf"^chosen on validation \(saved model\): {chosen}: test accuracy "
                     r"0\.\d{4}  macro-F1 0\.\d{4}$", done.stdout, re.MULTILINE), done.stdout
    # and only the chosen one's run was scored on test (each run had been, reports on disk)
    scored = {json.loads((run / "manifest.json").read_text())["model"]:
              (run / "classification_report.txt").is_file()
              for run in (tmp_path / "runs").iterdir()}
    assert scored == {name: name == chosen for name in validation}


@pytest.mark.integration
def test_inference_benchmark_prints_the_ratio_to_the_peer(tmp_path, fer_subset):
    done = run_script("inference_benchmark.py", "--data", fer_subset, "--rounds", "1",
                      "--batch-size", "64", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^mini-xception\s+float32\s+\d+ images/s", done.stdout, re.MULTILINE)
    ratios = re.search(r"^ratios \(fer at auto = (\w+) vs the peer's best of each\): "
                       r"throughput (\d+\.\d\d)x the peer's highest; latency (\d+\.\d\d)x the "
                       r"peer's lowest$", done.stdout, re.MULTILINE)
    assert ratios, done.stdout
    # the throughput ratio is ours at auto over the peer's highest, over the precisions
    peer_ips = [int(ips) for ips in re.findall(r"^mini-xception\s+\w+\s+(\d+) images/s",
                                                done.stdout, re.MULTILINE)]
    (our_ips,) = re.findall(rf"^fer\s+{ratios[1]}\s+(\d+) images/s", done.stdout, re.MULTILINE)
    assert float(ratios[2]) == pytest.approx(int(our_ips) / max(peer_ips), rel=0.02)
    # the latency ratio is to the peer's lowest latency over the precisions measured
    one_image = r" one image: (\d+\.\d\d) ms model time, \d+\.\d\d ms through fer's scoring call$"
    peer_ms = [float(ms) for ms in re.findall(r"^mini-xception .*" + one_image, done.stdout,
                                               re.MULTILINE)]
    (our_ms,) = re.findall(rf"^fer\s+{ratios[1]}\s.*" + one_image, done.stdout, re.MULTILINE)
    assert float(ratios[3]) == pytest.approx(float(our_ms) / min(peer_ms), rel=0.03)


@pytest.mark.integration
def test_precision_benchmark_times_both_precisions(tmp_path, fer_subset):
    done = run_script("precision_benchmark.py", "--data", fer_subset, "--steps", "1",
                      tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    timed = re.findall(r"^default (float32|mixed_bfloat16)\s+(training|inference)\s+\d+\.\d "
                       r"images/s", done.stdout, re.MULTILINE)
    assert sorted(timed) == sorted((p, kind) for p in ("float32", "mixed_bfloat16")
                                   for kind in ("training", "inference")), done.stdout


@pytest.mark.integration
def test_face_crop_benchmark_scores_each_margin(tmp_path, fer_subset):
    from fer.models import get_spec

    get_spec("default").build().save(tmp_path / "model.keras")
    done = run_script("face_crop_benchmark.py", "--data", fer_subset, "--model",
                      tmp_path / "model.keras", "--margins", "0", "0.1", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"^faces found in (\d+) of (\d+) validation images$", done.stdout,
                      re.MULTILINE)
    assert found and 0 < int(found[1]) <= int(found[2]), done.stdout
    assert re.search(r"^detected box side / FER2013 frame: median \d\.\d{3} ", done.stdout,
                     re.MULTILINE)
    margins = dict(re.findall(r"^detected crop, margin ([+-]\d\.\d\d) of its side each side: "
                              r"validation accuracy (\d\.\d{4})$", done.stdout, re.MULTILINE))
    assert list(margins) == ["+0.00", "+0.10"], done.stdout
    # the margin is chosen on validation; the test split is scored once, at the end
    chosen = max(margins, key=lambda margin: float(margins[margin]))
    assert re.findall(r"test", done.stdout) == ["test"], done.stdout
    assert re.search(rf"^test, read once: faces found in \d+ of \d+ images; the original 48x48 "
                     rf"images of those faces \d\.\d{{4}}; their detected crops at the margin "
                     rf"chosen on validation, {re.escape(chosen)}, \d\.\d{{4}}$", done.stdout,
                     re.MULTILINE), done.stdout


@pytest.mark.integration
def test_train_benchmark_times_the_seed_then_scores_a_profile_and_its_runs_average(
        tmp_path, fer_subset):
    """train_benchmark.py prints the profile's figures as ratios to the seed model's (timed
    here over 3 steps, not an epoch), and ensemble_benchmark.py averages the run it wrote."""
    done = run_script("train_benchmark.py", "--data", fer_subset, "--profile", "fast",
                      "--epochs", "1", "--seed-steps", "3", "--out", tmp_path / "runs",
                      tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^seed: \d+\.\d train images/s over 3 steps of 64", done.stdout, re.MULTILINE)
    # under one epoch's steps (the subset's): said, so that no one takes it for a target figure
    assert re.search(r"^note: the seed was timed over 3 steps, under one epoch's \d+: the "
                     r"ratios below are not target figures$", done.stdout, re.MULTILINE)
    ratios = re.search(r"^ratios: training images/s (\d+\.\d\d)x the seed's \(batch 128 against "
                       r"the seed's 64\) \(ours over every epoch, .*\); wall time (\d+\.\d{3}) of "
                       r"the seed's 20 epochs \(projected (\d+) s", done.stdout, re.MULTILINE)
    assert ratios, done.stdout
    # ours over the seed's, from the figures as printed (whole seconds: a loose tolerance,
    # which still tells a ratio inverted or a projection of one epoch instead of 20)
    seed_ips = float(re.search(r"^seed: (\d+\.\d) train", done.stdout, re.MULTILINE)[1])
    ours = re.search(r"^wall (\d+) s .*, training (\d+\.\d) images/s", done.stdout, re.MULTILINE)
    assert ours, done.stdout
    assert float(ratios[1]) == pytest.approx(float(ours[2]) / seed_ips, rel=0.02)
    assert float(ratios[2]) == pytest.approx(max(int(ours[1]), 0.5) / int(ratios[3]), rel=0.3)
    # the projection itself: 20 epochs of the training split at the seed's speed
    (run_dir,) = (tmp_path / "runs").iterdir()
    counts = json.loads((run_dir / "manifest.json").read_text())["data"]["counts"]["train"]
    assert int(ratios[3]) == pytest.approx(20 * sum(counts.values()) / seed_ips, rel=0.01, abs=1)
    # and the time a user waits, data loading to scored model, beside it
    assert re.search(r"^end to end \(loading the data, \d+\.\d s, then .*\): .+, \d+\.\d{3} of "
                     r"the seed's projection$", done.stdout, re.MULTILINE), done.stdout
    averaged = run_script("ensemble_benchmark.py", "--data", fer_subset, "--run", run_dir,
                          "--run", run_dir, "--save", tmp_path / "average.keras",
                          tmp_path=tmp_path)
    assert averaged.returncode == 0, averaged.stderr[-3000:]
    # every candidate on validation; the test split once, for the one validation chose
    assert re.search(r"^average of 2 \+ flip: validation 0\.\d{4}  macro-F1 0\.\d{4}$",
                     averaged.stdout, re.MULTILINE), averaged.stdout
    assert re.findall(r"test \d|test recall", averaged.stdout) == ["test 0", "test recall"]
    assert re.search(r"^chosen on validation: .+: validation 0\.\d{4}  test 0\.\d{4}  "
                     r"macro-F1 ", averaged.stdout, re.MULTILINE), averaged.stdout
    assert (tmp_path / "average.keras").is_file()


@pytest.mark.parametrize(("script", "option", "value"), [
    ("speed_ratio_benchmark.py", "--model-steps", "0"),
    ("speed_ratio_benchmark.py", "--seed-steps", "0"),
    ("speed_ratio_benchmark.py", "--seconds", "0"),
    ("train_benchmark.py", "--seed-steps", "0"),
])
def test_benchmark_step_counts_below_one_are_refused(tmp_path, script, option, value):
    """`--model-steps 0` once fell back to the seed's count without a word (windows of
    unequal length, the ratio the script exists to avoid); a zero elsewhere ended in a
    traceback or an empty measurement."""
    done = run_script(script, "--data", tmp_path / "none.zip", option, value, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: {option} {value}: expected " in done.stderr


@pytest.mark.integration
def test_speed_ratio_benchmark_times_windows_of_equal_length(tmp_path, fer_subset):
    """The model's windows take as many steps as last a seed window (the fastest of shorter
    windows was favoured: 96 steps against the seed's 24 at 7-8x its speed); `default-pca`
    is prepared from the training images before it is timed, as training prepares it."""
    done = run_script("speed_ratio_benchmark.py", "--data", fer_subset, "--model", "default-pca",
                      "--seconds", "1", "--seed-steps", "2", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    warm = re.search(r"^warm-up window: seed (\d+\.\d), default-pca (\d+\.\d) images/s$",
                     done.stdout, re.MULTILINE)
    seed_rate, model_rate = float(warm[1]), float(warm[2])
    model_steps = int(re.search(r"^steps per window: seed 2, default-pca (\d+)$", done.stdout,
                                re.MULTILINE).group(1))
    # as many steps as the seed's 2 take at the warm-up window's speeds (not the rates
    # themselves: a training in another test process can slow either window)
    assert abs(model_steps - max(1.0, 2 * model_rate / seed_rate)) <= 0.55, done.stdout
    assert re.search(r"^fastest window: seed \d+\.\d, default-pca \d+\.\d images/s, ratio "
                     r"\d+\.\d\dx$", done.stdout, re.MULTILINE), done.stdout


def test_the_seed_is_timed_on_full_batches_only():
    """Training images/s is steps x batch size: the timing stream holds no short batch
    (each epoch's last, 45 images in FER2013's 404 steps of 64, had been counted as 64)."""
    from conftest import square_split

    full_training_batches = import_benchmark("common").full_training_batches
    split = square_split(15, 1)  # 105 images: one batch of 64, then one of 41 an epoch
    batches = full_training_batches(split, batch_size=64).take(4)
    assert len(split) == 105 and [int(batch[0].shape[0]) for batch in batches] == [64] * 4


@pytest.mark.parametrize(("onednn", "said"), [(True, "on"), (False, "off"), (None, "unknown")])
def test_the_machine_line_says_onednn_unknown_where_tensorflow_cannot_tell(monkeypatch, onednn,
                                                                         said):
    """TensorFlow's private switch may be missing (fer.precision.onednn_enabled gives None):
    the line said `off` then, wrong machine reporting beside a set TF_ENABLE_ONEDNN_OPTS=1."""
    common = import_benchmark("common")
    monkeypatch.setattr(common, "machine", lambda: {"cpu": "x", "cores": 2, "bf16_flags": [],
                                                    "onednn": onednn})
    assert f" | oneDNN {said} (" in common.machine_line()


def test_the_time_to_63_percent_is_the_first_epoch_at_or_above_it(tmp_path):
    """The integration run above never reaches 63% in one epoch on the subset, so the time
    BENCHMARKS.md quotes is read here from a history written by hand: the first epoch at or
    above the threshold, over an ensemble's members in order; None where none reaches it."""
    first_crossing = import_benchmark("train_benchmark").first_crossing
    history = tmp_path / "history.csv"
    history.write_text("member,epoch,val_accuracy,elapsed_seconds\n"
                       "1,1,0.55,10.0\n1,2,0.63,20.0\n1,3,0.66,30.0\n2,1,0.64,40.0\n")
    assert first_crossing(history, 0.63) == 20.0
    assert first_crossing(history, 0.65) == 30.0
    assert first_crossing(history, 0.70) is None


def test_the_time_to_63_percent_is_printed_as_a_fraction_of_the_seeds_20_epochs():
    """The figure the `fast` target is read from (the integration run never reaches 63%, so
    it never prints it): the crossing's seconds over the seed's projected 20 epochs, beside
    the wall's; none where validation never got there."""
    ratios = import_benchmark("train_benchmark").ratios
    figures = {"train_images_per_second": 700.0, "wall_seconds": 360.0}
    line = ratios(figures, seed_ips=100.0, seed_20=3600.0, batch_size=128, crossing=180.0)
    assert line.startswith("ratios: training images/s 7.00x the seed's (batch 128 against")
    assert "wall time 0.100 of the seed's 20 epochs (projected 3600 s" in line
    assert line.endswith("; time to 63% = 0.050 of it")
    assert "time to" not in ratios(figures, seed_ips=100.0, seed_20=3600.0, batch_size=64,
                                   crossing=None)


def test_refit_keeps_the_last_epoch_whatever_validation_says(monkeypatch):
    """--refit's keeper takes each epoch as it ends, a worse one too (the integration test
    above ends on a better second epoch as often as not, so it cannot tell)."""
    import fer.train

    monkeypatch.setattr(fer.train, "KeepBestWeights", fer.train.KeepBestWeights)  # undone after
    import_benchmark("variant_benchmark").keep_last_epoch()
    keeper = fer.train.KeepBestWeights()  # the name _fit_member builds its keeper from
    keeper.on_epoch_end(0, {"val_accuracy": 0.9})
    keeper.on_epoch_end(1, {"val_accuracy": 0.1})
    assert (keeper.best_epoch, keeper.best_value) == (2, 0.1)


def test_tail_average_keeps_the_mean_of_the_last_epochs_weights(monkeypatch):
    """--tail-average K keeps the mean of the last K epochs' weights, whatever validation
    says of each, and nothing of the epochs before them."""
    from types import SimpleNamespace

    import numpy as np

    import fer.train

    monkeypatch.setattr(fer.train, "KeepBestWeights", fer.train.KeepBestWeights)  # undone after
    import_benchmark("variant_benchmark").keep_tail_average(2)
    keeper = fer.train.KeepBestWeights()
    keeper.set_params({"epochs": 3})
    for epoch, value in enumerate([100.0, 1.0, 4.0]):  # epoch 1 is not averaged
        keeper.set_model(SimpleNamespace(get_weights=lambda value=value: [
            np.full(2, value, dtype="float32"), np.array([value])]))
        keeper.on_epoch_end(epoch, {"val_accuracy": 0.9 - epoch / 10})
    assert [w.tolist() for w in keeper.weights] == [[2.5, 2.5], [2.5]]
    assert keeper.weights[0].dtype == np.float32
    assert (keeper.best_epoch, keeper.best_value) == (3, 0.7)


def test_ensemble_scores_list_recall_in_class_order_when_a_class_is_absent(monkeypatch):
    """Per-class recall is one entry per class in CLASS_NAMES order, None for a class the
    split has no images of (a subset without `disgust` shifted fear..neutral one place)."""
    import numpy as np

    from fer.data import Split
    from fer.labels import CLASS_NAMES

    ensemble_benchmark = import_benchmark("ensemble_benchmark")
    labels = np.array([0, 0, 2, 3, 4, 5, 6])  # no disgust (1)
    predicted = np.array([0, 1, 2, 3, 4, 5, 0])  # one angry as disgust; neutral missed
    monkeypatch.setattr(ensemble_benchmark, "predict_labels", lambda model, images: predicted)
    split = Split(images=np.zeros((len(labels), 48, 48), dtype=np.uint8), labels=labels)
    recall = ensemble_benchmark.scores(None, split)["recall"]
    assert len(recall) == len(CLASS_NAMES)
    assert recall == [0.5, None, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_the_no_decay_norm_variants_decay_kernels_only(kind):
    """variant_benchmark's `no-decay-norm` optimisers leave batch norm's scale and offset
    and the biases out of the weight decay and decay the kernels (a step of zero gradient
    moves nothing but the decay)."""
    import keras
    import numpy as np

    build_optimizer_sparing_norms = import_benchmark(
        "variant_benchmark").build_optimizer_sparing_norms
    from fer.models import FusedBatchNorm

    inputs = keras.Input((6, 6, 1))
    x = FusedBatchNorm()(keras.layers.Conv2D(4, 3, use_bias=False)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    for variable in model.trainable_variables:  # non-zero, so that decay would show
        variable.assign(np.full(variable.shape, 0.5, dtype="float32"))
    optimizer = build_optimizer_sparing_norms(f"{kind}-no-decay-norm", learning_rate=0.1,
                                              weight_decay=0.5, total_steps=10)
    before = {v.path: np.array(v) for v in model.trainable_variables}
    optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_variables])
    moved = {v.path for v in model.trainable_variables
             if not np.allclose(np.array(v), before[v.path])}
    kernels = {v.path for v in model.trainable_variables if v.path.endswith("/kernel")}
    assert len(kernels) == 2  # the convolution's and the dense layer's: each is decayed
    assert moved == kernels
