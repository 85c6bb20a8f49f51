"""fer.checkpoint: a run stopped mid-training resumes from its last finished epoch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import recorded_schedule_spans
from run_folders import make_run

import fer.checkpoint
import fer.precision
import fer.train
from fer.checkpoint import (
    FOLDER,
    RUN_RECORD,
    _random_states,
    find_started,
    finish_run,
    is_complete,
    read_run,
    training_lock,
)
from fer.config import TrainConfig
from fer.data import Dataset
from fer.errors import CheckpointError, FerError
from fer.models import load_model
from fer.train import RUN_FILES, fit, score, train


class EpochSpy:
    """Patched over the epoch timer's on_epoch_begin: records what each epoch starts from,
    and raises ``stop_with`` (Ctrl-C's KeyboardInterrupt) at the start of epoch ``stop_at``
    of member ``stop_member`` (both 1-based), once."""

    def __init__(self, monkeypatch, *, stop_at: int | None = None, stop_member: int = 1,
                 stop_with: type[BaseException] = KeyboardInterrupt):
        self.begun: list[dict] = []
        self.stop_at, self.stop_member, self._members = stop_at, stop_member, 0
        original = fer.train.EpochTimer.on_epoch_begin

        def on_epoch_begin(timer, epoch, logs=None):
            model = timer.model
            if epoch == 0 or not self.begun or self.begun[-1]["model"] is not model:
                self._members += 1
            if self.stop_at == epoch + 1 and self._members == self.stop_member:
                self.stop_at = None
                raise stop_with
            self.begun.append({"model": model, "epoch": epoch + 1,
                               "iterations": int(model.optimizer.iterations),
                               "random_states": [np.asarray(v).tolist()
                                                 for v in _random_states(model)]})
            original(timer, epoch, logs)

        monkeypatch.setattr(fer.train.EpochTimer, "on_epoch_begin", on_epoch_begin)


def stopped_run(tmp_path, dataset, config, spy):
    """Train until the spy's Ctrl-C; the run folder it left."""
    with pytest.raises(KeyboardInterrupt):
        train(dataset, config, verbose=0)
    (run_dir,) = tmp_path.iterdir()
    return run_dir


def stop_once_in(monkeypatch, name: str) -> list:
    """Patch ``fer.train.<name>`` to raise KeyboardInterrupt (Ctrl-C) on its first call and
    run as itself after; the list gets one entry per call."""
    real, calls = getattr(fer.train, name), []

    def stop_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fer.train, name, stop_once)
    return calls


def state(run_dir, member: int = 1) -> dict:
    return json.loads((run_dir / FOLDER / f"member-{member}" / "state.json").read_text())


def test_a_stopped_run_resumes_after_its_last_finished_epoch(tmp_path, tiny_dataset, monkeypatch,
                                                             caplog):
    """Ctrl-C at the start of epoch 3 of 4 keeps epochs 1-2; --resume trains 3 and 4 from
    their weights, optimizer state (the learning-rate schedule's step) and random streams,
    then writes the complete run folder with all four epochs and removes the checkpoint.
    The resumed schedule is the run's own, four epochs long, not one over the two left."""
    config = TrainConfig(epochs=4, batch_size=16, out_dir=tmp_path, seed=3, precision="float32")
    spy = EpochSpy(monkeypatch, stop_at=3)
    spans = recorded_schedule_spans(monkeypatch)
    with caplog.at_level("INFO", logger="fer"):
        run_dir = stopped_run(tmp_path, tiny_dataset, config, spy)
    assert f"`fer train --resume {run_dir}` continues it" in caplog.text  # told how to go on
    before = state(run_dir)
    assert before["epochs_done"] == 2 and not before["finished"]
    assert sorted(p.name for p in run_dir.iterdir()) == [FOLDER]
    steps = spy.begun[-1]["iterations"] - spy.begun[-2]["iterations"]  # per epoch

    monkeypatch.chdir(run_dir)
    assert read_run(Path(".")).run_dir == run_dir  # `fer train --resume .` from inside it
    result = train(tiny_dataset, read_run(run_dir).config, verbose=0, resume=read_run(run_dir))

    resumed = spy.begun[2]
    assert resumed["epoch"] == 3 and resumed["iterations"] == 2 * steps  # not from step 0
    assert spans == [4 * steps, 4 * steps]  # begun, then resumed
    assert resumed["random_states"] == before["random_states"]  # not epoch 1's draws again
    # (streams there are, augmentation's and dropout's, and they had moved on by epoch 3)
    assert before["random_states"] and before["random_states"] != spy.begun[0]["random_states"]
    assert result.run_dir == run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    history = np.genfromtxt(run_dir / "history.csv", delimiter=",", names=True)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(history["val_accuracy"][:2], before["history"]["val_accuracy"],
                               rtol=1e-5)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_at_epochs"] == {"member 1": [2]}
    assert result.metrics["epochs"] == 4 and 1 <= result.metrics["best_epoch"] <= 4


def test_a_best_epoch_before_the_stop_is_the_one_its_resume_keeps(tmp_path, tiny_dataset,
                                                                  monkeypatch):
    """Validation accuracy 0.3, 0.9, stop, 0.2, 0.4: the resumed member calls epoch 2 its
    best, and the saved model has epoch 2's trained weights (kept in the checkpoint across
    the stop), not those of epoch 4, the better of the epochs this process trained."""
    scripted, trained = {1: 0.3, 2: 0.9, 3: 0.2, 4: 0.4}, {}
    original = fer.train.EpochTimer.on_epoch_end

    def on_epoch_end(timer, epoch, logs=None):  # the first callback: the others read its logs
        logs["val_accuracy"] = scripted[epoch + 1]
        trained[epoch + 1] = [w.numpy() for w in timer.model.trainable_weights]
        original(timer, epoch, logs)

    monkeypatch.setattr(fer.train.EpochTimer, "on_epoch_end", on_epoch_end)
    config = TrainConfig(epochs=4, batch_size=16, out_dir=tmp_path, seed=3, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=3))
    assert sorted(trained) == [1, 2] and state(run_dir)["best_epoch"] == 2
    result = train(tiny_dataset, read_run(run_dir).config, verbose=0, resume=read_run(run_dir))
    assert sorted(trained) == [1, 2, 3, 4]
    assert result.metrics["best_epoch"] == 2 and result.metrics["best_val_accuracy"] == 0.9
    saved = [w.numpy() for w in load_model(run_dir / "model.keras").trainable_weights]
    assert all(np.array_equal(a, b) for a, b in zip(saved, trained[2], strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(saved, trained[4], strict=True))


def test_a_run_records_its_split_seed_and_an_older_record_reads_as_its_seed(
        tmp_path, tiny_dataset, monkeypatch):
    """A run records its split seed; one begun before --split-seed existed carved its
    validation with --seed, so its resume must carve with that (the default split seed
    would put some of its validation images into training)."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, seed=3, split_seed=11,
                         precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    assert read_run(run_dir).config.split_seed == 11
    record = json.loads((run_dir / FOLDER / RUN_RECORD).read_text())
    del record["config"]["split_seed"]  # as a fer before it recorded the run
    (run_dir / FOLDER / RUN_RECORD).write_text(json.dumps(record))
    assert read_run(run_dir).config.split_seed == 3


def test_a_resume_where_its_precision_is_slow_says_so(tmp_path, tiny_dataset, monkeypatch,
                                                      caplog):
    """A run begun in bf16 (on a CPU with bf16 instructions) resumed on one without keeps
    bf16, about 10x slower there than float32: the log says so instead of leaving a user
    to wonder."""
    # stopped before any bf16 step, here and in the resume (the warning comes first): a CI
    # CPU without bf16 instructions need not train in it
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="mixed_bfloat16")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=1))
    monkeypatch.setattr(fer.precision, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(fer.precision, "has_gpu", lambda: False)
    EpochSpy(monkeypatch, stop_at=1)
    with caplog.at_level("WARNING", logger="fer"), pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    assert (f"resuming {run_dir.name} in mixed_bfloat16, as it began, but this CPU has no bf16 "
            "instructions (amx_bf16, avx512_bf16): it trains several times slower here than "
            "float32 would") in caplog.text


def test_a_new_run_in_a_precision_slow_here_says_so(tmp_path, tiny_dataset, monkeypatch,
                                                     caplog):
    """`--precision mixed_bfloat16` asked for on a CPU without bf16 instructions trains about
    10x slower than auto's float32: the log says so (it said only "as asked"). Stopped at
    the start of epoch 1, before any bf16 step."""
    monkeypatch.setattr(fer.precision, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(fer.precision, "has_gpu", lambda: False)
    EpochSpy(monkeypatch, stop_at=1)
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="mixed_bfloat16")
    with caplog.at_level("WARNING", logger="fer"), pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, config, verbose=0)
    assert ("training in mixed_bfloat16 as asked, but this CPU has no bf16 instructions "
            "(amx_bf16, avx512_bf16): it trains several times slower here than in what "
            "--precision auto picks") in caplog.text


def test_a_resumed_ensemble_trains_only_the_members_left(tmp_path, tiny_dataset, monkeypatch):
    """Member 1 finished before the stop: the resumed run reuses its final weights and
    trains member 2 alone."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, seed=5, ensemble=2,
                         precision="float32")
    spy = EpochSpy(monkeypatch, stop_at=1, stop_member=2)
    run_dir = stopped_run(tmp_path, tiny_dataset, config, spy)
    assert state(run_dir, 1)["finished"]
    assert not (run_dir / FOLDER / "member-2" / "state.json").exists()  # no epoch finished
    with np.load(run_dir / FOLDER / "member-1" / "final.npz") as arrays:
        member_1 = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    trained_before = len(spy.begun)

    result = train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))

    assert len(spy.begun) - trained_before == 2  # member 2's two epochs, nothing of member 1
    saved = load_model(run_dir / "model.keras").get_layer("default_1").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(saved, member_1, strict=True))
    assert [m["seed"] for m in result.metrics["ensemble"]] == [5, 6]
    history = np.genfromtxt(run_dir / "history.csv", delimiter=",", names=True)
    assert list(history["member"]) == [1, 1, 2, 2]


def test_a_run_resumes_only_on_the_data_it_started_with(tmp_path, tiny_dataset, monkeypatch):
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    other = Dataset(source="other.zip", sha256="f" * 64, train=tiny_dataset.train,
                    validation=tiny_dataset.validation, test=tiny_dataset.test)
    with pytest.raises(FerError, match=r"sha256 000000000000\.\.\., but other\.zip has "
                                        r"ffffffffffff\.\.\. now; it can only resume on the "
                                        r"data it began with"):
        train(other, config, verbose=0, resume=read_run(run_dir))


def test_a_run_resumes_only_with_the_recipe_it_began_with(tmp_path, tiny_dataset, monkeypatch):
    """A run stopped, then fer upgraded with another dropout and weight decay for its model:
    the weights still fit, so only the recorded recipe can tell; the resume is refused with
    what changed (a CheckpointError: a Prefect retry trains the run anew), instead of
    training the rest of the run another way. A record of an older fer, without a recipe,
    has no fingerprint of its pixels either (recorded since later): it is refused as
    older."""
    import dataclasses
    import functools

    import fer.models

    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    began = fer.models.REGISTRY["default"]
    upgraded = dataclasses.replace(began, weight_decay=0.01,
                                   build=functools.partial(began.build, dropout=0.5))
    monkeypatch.setitem(fer.models.REGISTRY, "default", upgraded)
    with pytest.raises(CheckpointError, match=r"model 'default' trains differently in this fer "
                                              r"than when the run began \(dropout: 0\.3 -> 0\.5; "
                                              r"weight_decay: 0\.05 -> 0\.01\); resume it with "
                                              r"the fer that began it"):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))

    record = json.loads((run_dir / FOLDER / RUN_RECORD).read_text())
    assert record.pop("recipe") == began.recipe()
    (run_dir / FOLDER / RUN_RECORD).write_text(json.dumps({**record, "recipe": "default"}))
    with pytest.raises(FerError, match=r"run\.json: not a run record this version can resume "
                                       r"\(recipe 'default', expected an object\)"):
        read_run(run_dir)
    (run_dir / FOLDER / RUN_RECORD).write_text("[]")  # JSON, but not a record
    with pytest.raises(FerError, match=r"run\.json: not a run record this version can resume "
                                       r"\(list, expected an object\)"):
        read_run(run_dir)
    del record["data"]["pixels_sha256"]
    (run_dir / FOLDER / RUN_RECORD).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"began in a fer that did not record the pixels"):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))


def test_a_run_resumes_only_on_the_pixels_it_began_with(tmp_path, tiny_dataset, monkeypatch):
    """The same file decoded another way (a newer fer seeing transparency on white, say)
    keeps its sha256: the record's fingerprint of the decoded pixels refuses the resume (a
    CheckpointError: a Prefect retry trains the run anew) instead of training the rest of
    the run on other images. A record of an older fer, without one, is refused too: every
    fer before the fingerprint carved validation otherwise (copies of training images on
    both sides), so its run would go on with some validation images in training."""
    import dataclasses

    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    images = tiny_dataset.train.images.copy()
    images[0, 0, 0] ^= 1  # one pixel of one training image
    redecoded = dataclasses.replace(tiny_dataset, train=dataclasses.replace(tiny_dataset.train,
                                                                            images=images))
    with pytest.raises(CheckpointError, match=r"generated decodes into other pixels or splits "
                                              r"them otherwise here than where the run began "
                                              r".*validation carving.*; resume it with the fer "
                                              r"that began it"):
        train(redecoded, config, verbose=0, resume=read_run(run_dir))

    record = json.loads((run_dir / FOLDER / RUN_RECORD).read_text())
    assert record["resumes"] == []  # a refused resume is not one
    del record["data"]["pixels_sha256"]
    (run_dir / FOLDER / RUN_RECORD).write_text(json.dumps(record))
    for data in (redecoded, tiny_dataset):
        with pytest.raises(CheckpointError, match=r"began in a fer that did not record the "
                                                  r"pixels it trained on .*copies of training "
                                                  r"images on one side.*; resume it with the "
                                                  r"fer that began it"):
            train(data, config, verbose=0, resume=read_run(run_dir))


def test_a_resumed_runs_manifest_keeps_the_process_that_began_it(tmp_path, tiny_dataset,
                                                                 monkeypatch):
    """A run begun on one machine and resumed twice on others: the manifest's start,
    versions and machine are the first process's, as its commit and precision are, and each
    resume's process is listed with its time; "created" is when the model was saved. A
    resume that fails on the checkpoint (one another Keras wrote) continued nothing: it is
    not listed (it was, with the Keras that could not read it)."""
    import fer.train as train_module

    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path, precision="float32")
    monkeypatch.setattr(train_module, "machine", lambda: {"cpu": "first"})
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    began = json.loads((run_dir / FOLDER / RUN_RECORD).read_text())
    assert began["machine"] == {"cpu": "first"} and began["resumes"] == []

    monkeypatch.setattr(train_module, "machine", lambda: {"cpu": "second"})
    EpochSpy(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "machine", lambda: {"cpu": "another keras"})

        def unreadable(self, model, progress):
            raise CheckpointError("the optimizer's state did not load")

        patched.setattr(train_module.MemberCheckpoint, "restore", unreadable)
        with pytest.raises(CheckpointError, match="the optimizer's state did not load"):
            train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    monkeypatch.setattr(train_module, "machine", lambda: {"cpu": "third"})
    train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["machine"] == {"cpu": "first"}
    assert manifest["versions"] == began["versions"]
    assert manifest["started"] == began["started"] <= manifest["created"]
    assert [r["machine"] for r in manifest["resumes"]] == [{"cpu": "second"}, {"cpu": "third"}]
    assert all({"at", "git_commit", "versions"} <= set(r) for r in manifest["resumes"])
    assert manifest["resumed_at_epochs"] == {"member 1": [1, 2]}


def test_a_resume_under_another_keras_says_so(tmp_path, tiny_dataset, monkeypatch, caplog):
    """A run stopped, then Keras upgraded: the rest of the run trains with the new
    version's optimiser defaults (Muon's are Keras's) and kernels, which only a changed
    git commit had been warned of."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=1))
    record_path = run_dir / FOLDER / RUN_RECORD
    record = json.loads(record_path.read_text())
    keras_now = record["versions"]["keras"]
    record["versions"]["keras"] = "3.0.0"
    record_path.write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="fer"):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    assert f"with keras 3.0.0 -> {keras_now}: the rest of the run trains with their " \
        "optimiser defaults" in caplog.text


def test_tensorflow_under_either_package_name_is_one_version():
    """x86_64 installs tensorflow-cpu, arm64 tensorflow (pyproject's markers): a run moved
    between them on one TensorFlow version trains as it did, and is not warned of."""
    from fer.train import _trainers, _version_changes

    x86 = {"keras": "3.15.0", "tensorflow-cpu": "2.21.0"}
    arm = {"keras": "3.15.0", "tensorflow": "2.21.0"}
    assert _version_changes(_trainers(x86), _trainers(arm), ("keras", "tensorflow")) == []
    assert _version_changes(_trainers(x86), _trainers({**arm, "tensorflow": "2.22.0"}),
                            ("keras", "tensorflow")) == ["tensorflow 2.21.0 -> 2.22.0"]


def test_a_resume_that_fails_on_a_later_member_or_its_best_weights_is_not_listed(
        tmp_path, tiny_dataset, monkeypatch):
    """An ensemble stopped in member 2, member 1 finished: a resume whose member-2
    checkpoint cannot be read (another Keras), or whose best weights cannot, continued
    nothing; it was listed, by member 1's restore or before the best weights were read."""
    import fer.train as train_module

    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32",
                         ensemble=2)
    run_dir = stopped_run(tmp_path, tiny_dataset, config,
                          EpochSpy(monkeypatch, stop_at=2, stop_member=2))
    for broken in ("restore", "best_weights"):
        with monkeypatch.context() as patched:
            def unreadable(*args, **kwargs):
                raise CheckpointError("the optimizer's state did not load")

            patched.setattr(train_module.MemberCheckpoint, broken, unreadable)
            with pytest.raises(CheckpointError, match="the optimizer's state did not load"):
                train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
        assert json.loads((run_dir / FOLDER / RUN_RECORD).read_text())["resumes"] == [], broken
    train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    assert len(json.loads((run_dir / "manifest.json").read_text())["resumes"]) == 1


def test_only_a_stopped_run_can_be_resumed(tmp_path, tiny_dataset):
    """A finished run (its checkpoint removed), one an older fer stopped while scoring (it
    removed the checkpoint before), and a folder fer did not train say why."""
    finished = train(tiny_dataset, TrainConfig(epochs=1, batch_size=16, out_dir=tmp_path / "runs",
                                          precision="float32"), verbose=0).run_dir
    with pytest.raises(FerError, match=r"nothing to resume: its training finished \(the manifest"):
        read_run(finished)
    (finished / "classification_report.txt").unlink()
    with pytest.raises(FerError, match=r"its test split was never scored, and it kept no "
                                       r"checkpoint to finish from"):
        read_run(finished)
    with pytest.raises(FerError, match=r"nothing to resume: no checkpoint/run\.json"):
        read_run(tmp_path)


def test_a_run_this_user_cannot_read_or_lock_is_one_line(tmp_path, monkeypatch):
    """Another user's run (permissions refused: here a folder where the lock file goes, and
    a read refused, since tests run as root): one line, not a PermissionError traceback."""
    run_dir = make_run(tmp_path, "theirs", accuracy=0.5)
    (run_dir / FOLDER).mkdir()
    (run_dir / FOLDER / fer.checkpoint.LOCK).mkdir()  # any other OSError: no advice on users
    with pytest.raises(FerError, match=r"lock: cannot open it to resume the run \(Is a "
                                       r"directory\)$"):
        with training_lock(run_dir):
            pass

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fer.checkpoint, "open", refused, raising=False)
    with pytest.raises(FerError, match=r"lock: cannot open it to resume the run \(Permission "
                                       r"denied\); resume it as the user who began it"):
        with training_lock(run_dir):
            pass
    (run_dir / FOLDER / RUN_RECORD).write_text("{}")

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(FerError, match=r"run\.json: cannot read it \(Permission denied\)"):
        read_run(run_dir)


def test_a_resume_after_another_process_finished_the_run_says_so(tmp_path):
    """Two `fer train --resume` of one run: the second, taking the lock after the first
    finished and removed the checkpoint, is told so (it had been a FileNotFoundError
    traceback)."""
    from fer.checkpoint import training_lock

    with pytest.raises(FerError, match=r"nothing to resume: its checkpoint is gone"):
        with training_lock(tmp_path / "finished-run"):
            pass


def test_a_resume_that_locks_a_run_finished_meanwhile_says_so(tmp_path, monkeypatch):
    """The first resume finishes the run (removing its checkpoint) between the second's
    opening the lock file and locking it: the second is told, instead of holding a lock on
    a removed file and training the finished run anew over its files."""
    import fcntl

    from fer.checkpoint import RUN_RECORD, finish_run, training_lock

    run_dir = tmp_path / "r1"
    (run_dir / FOLDER).mkdir(parents=True)
    (run_dir / FOLDER / RUN_RECORD).write_text("{}")
    flock = fcntl.flock

    def finished_first(handle, operation):
        finish_run(run_dir)  # the other process, done just before this lock
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", finished_first)
    with pytest.raises(FerError, match=r"nothing to resume: its checkpoint is gone"):
        with training_lock(run_dir):
            pass


def test_a_run_on_a_filesystem_without_locks_trains_with_its_own_errors_unchained(
        tmp_path, monkeypatch, caplog):
    """Where flock fails (some NFS, CIFS, FUSE mounts) the run trains unlocked, with a
    warning; an error of the training itself is not chained to flock's, which had prefixed
    every later traceback with "During handling of the above exception"."""
    import errno
    import fcntl

    from fer.checkpoint import RUN_RECORD, training_lock

    run_dir = tmp_path / "r1"
    (run_dir / FOLDER).mkdir(parents=True)
    (run_dir / FOLDER / RUN_RECORD).write_text("{}")

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ValueError, match="the training's own") as raised:
        with training_lock(run_dir):
            raise ValueError("the training's own")
    assert raised.value.__context__ is None
    assert "cannot lock the run (No locks available)" in caplog.text


def test_the_resume_command_a_stop_names_can_be_pasted(tmp_path):
    """A run folder with a space (`--out "My Runs"`) is quoted in the hint, as the publish
    options are."""
    from fer.train import resume_command

    assert resume_command(Path("My Runs/r1"), "--publish") == (
        "`fer train --resume 'My Runs/r1' --publish`")


def test_the_resume_command_publishes_where_the_stopped_command_would_have(tmp_path,
                                                                          monkeypatch):
    """The store as the command resolved it, FER_STORAGE and AWS_ENDPOINT_URL included, and
    a folder store as an absolute path: a resume pasted into a shell without them, or run
    from another folder, had published to ./artifacts and exited 0."""
    from fer.train import publish_flags

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert publish_flags("my store", create_bucket=True) == (
        f"--publish --storage '{tmp_path / 'my store'}' --create-bucket")
    for given in ("~/store", "file://~/store", "FILE://home/store"):
        assert publish_flags(given) == f"--publish --storage {tmp_path / 'home' / 'store'}"
    # a link before `..` is followed, as the store's folder is: not cancelled as text
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "er")
    assert publish_flags("link/../store") == f"--publish --storage {tmp_path / 'link/../store'}"
    assert (tmp_path / "link/../store").resolve() == tmp_path / "deep" / "store"
    assert publish_flags("s3://team/prod", endpoint_url="http://minio:9000") == (
        "--publish --storage s3://team/prod --endpoint-url http://minio:9000")
    # the command is logged (a flow's, to its server): a password in the endpoint left out
    assert publish_flags("s3://team/prod", endpoint_url="http://key:s3/cret@minio:9000") == (
        "--publish --storage s3://team/prod --endpoint-url http://minio:9000")
    # an AWS_ENDPOINT_URL from the environment beside a folder store: the resume would refuse it
    assert publish_flags("store", endpoint_url="http://minio:9000") == (
        f"--publish --storage {tmp_path / 'store'}")


def test_a_run_stopped_while_scoring_is_finished_by_a_resume(tmp_path, tiny_dataset,
                                                             monkeypatch, caplog):
    """A stop while scoring the test split (the `best` model's six passes per image) keeps
    the checkpoint: the log names the resume, and the resume trains nothing, scores the
    run and completes its folder."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    calls = stop_once_in(monkeypatch, "evaluate_run")
    spy = EpochSpy(monkeypatch)
    with caplog.at_level("INFO", logger="fer"):
        run_dir = stopped_run(tmp_path, tiny_dataset, config, spy)
    assert f"scoring stopped; `fer train --resume {run_dir}` finishes the run" in caplog.text
    assert (run_dir / "manifest.json").is_file() and (run_dir / FOLDER).is_dir()

    result = train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))

    assert len(spy.begun) == 2 and len(calls) == 2  # no epoch trained again
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    # the report is the saved model's, scored on the test split, as metrics.json records it
    from fer.evaluate import predict_labels

    test = tiny_dataset.test
    predicted = predict_labels(load_model(run_dir / "model.keras"), test.images)
    assert result.metrics["accuracy"] == round(float(np.mean(predicted == test.labels)), 4)
    assert result.metrics == json.loads((run_dir / "metrics.json").read_text())


def test_a_run_stopped_after_its_last_epoch_trains_no_more(tmp_path, tiny_dataset, monkeypatch):
    """Stopped during the batch-norm recalibration that follows the last epoch: the resumed
    run trains nothing, recalibrates, and writes the run folder."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    calls = stop_once_in(monkeypatch, "recalibrate_if_better")
    spy = EpochSpy(monkeypatch)
    run_dir = stopped_run(tmp_path, tiny_dataset, config, spy)
    assert state(run_dir)["epochs_done"] == 2 and len(spy.begun) == 2

    result = train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))

    assert len(spy.begun) == 2 and len(calls) == 2
    assert result.metrics["batch_norm_recalibration"] is not None
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)


def test_a_stop_while_saving_the_trained_model_names_the_resume(tmp_path, tiny_dataset,
                                                                monkeypatch, caplog):
    """A stop after the last member's training, while the model is saved and measured on
    validation (an ensemble's six passes per image take a while), names the resume as any
    other stop does; the resume trains nothing and writes the run folder."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    calls = stop_once_in(monkeypatch, "predict_labels")
    spy = EpochSpy(monkeypatch)
    with caplog.at_level("INFO", logger="fer"):
        run_dir = stopped_run(tmp_path, tiny_dataset, config, spy)
    assert f"training stopped; `fer train --resume {run_dir}` continues it" in caplog.text

    train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))

    assert len(spy.begun) == 2 and len(calls) == 2
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["precision_reason"] == "as asked"  # recorded at the start, kept on resume


def test_a_stop_while_removing_the_checkpoint_leaves_a_complete_run(tmp_path, monkeypatch):
    """The checkpoint is renamed away before it is deleted: a stop part-way leaves either
    the whole checkpoint (resumable) or none (publishable), never a record-less half."""
    run_dir = make_run(tmp_path, "20250101-000000-default-0001", accuracy=0.5)
    (run_dir / FOLDER / "member-1").mkdir(parents=True)
    (run_dir / FOLDER / RUN_RECORD).write_text("{}")
    real_rmtree = shutil.rmtree

    def stopped_rmtree(path, *args, **kwargs):
        if Path(path).exists():
            raise KeyboardInterrupt  # the stop, before anything is deleted
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fer.checkpoint.shutil, "rmtree", stopped_rmtree)
    with pytest.raises(KeyboardInterrupt):
        finish_run(run_dir)
    assert is_complete(run_dir)
    monkeypatch.undo()
    finish_run(run_dir)  # a later one clears what the stop left
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)


def test_a_finished_member_that_no_longer_fits_its_model_is_a_one_line_error(
        tmp_path, tiny_dataset, monkeypatch):
    """Member 1 finished before the stop, then its model changed (an upgrade of fer): its
    saved weights do not fit, and the resume names the file instead of a Keras traceback."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, seed=5, ensemble=2,
                         precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config,
                          EpochSpy(monkeypatch, stop_at=1, stop_member=2))
    final = run_dir / FOLDER / "member-1" / "final.npz"
    with np.load(final) as arrays:
        weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    np.savez(final, *weights[:-1])  # one weight fewer than the model has
    with pytest.raises(FerError, match=r"final\.npz: unreadable checkpoint .*; delete "
                                       r".*member-1 to train this member again"):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))


def test_a_run_another_process_trains_is_not_resumed_beside_it(tmp_path, tiny_dataset,
                                                                monkeypatch):
    """A second `fer train --resume` (or a Prefect retry) of a run that is still training
    would overwrite its epochs' files and delete the other's: it is refused, naming the
    process that holds the run, and the checkpoint is left as it was."""
    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    before = state(run_dir)
    with training_lock(run_dir):  # as the first process holds it while it trains
        with pytest.raises(FerError, match=rf"{run_dir} is being trained by process "
                                           rf"{os.getpid()} on .*; wait for it to end"):
            train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    assert state(run_dir) == before
    train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))  # once it has let go
    assert is_complete(run_dir)


def test_publishing_a_run_another_process_trains_says_it_is_training(tmp_path, tiny_dataset,
                                                                      monkeypatch):
    """`fer publish` on a run still training named it stopped, with a resume command that
    the training lock then refuses; it names the process training it now, and once that
    has let go, says again that the run stopped."""
    from fer.runs import publish_run
    from fer.storage import LocalStore

    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path / "runs", precision="float32")
    run_dir = stopped_run(tmp_path / "runs", tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    store = LocalStore(tmp_path / "artifacts")
    with training_lock(run_dir):  # as the process resuming it holds it while it trains
        with pytest.raises(FerError, match=rf"is not complete: it is being trained by process "
                                           rf"{os.getpid()} on .*; publish it once that ends"):
            publish_run(run_dir, store)
    with pytest.raises(FerError, match=r"is not complete: its training stopped before the end"):
        publish_run(run_dir, store)


def test_a_glance_at_who_trains_a_run_does_not_refuse_its_resume(tmp_path, tiny_dataset,
                                                                   monkeypatch):
    """`fer publish` asks who trains a run by taking a shared lock for a moment; a resume
    starting in that moment was refused as "being trained by" the last holder named in
    the lock file (perhaps long gone). It waits out such a glance."""
    import fcntl
    import threading

    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=1))
    glance = open(run_dir / FOLDER / "training.lock")  # noqa: SIM115 - closed by the timer
    fcntl.flock(glance, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.02, glance.close).start()
    with training_lock(run_dir):
        pass


def test_a_run_another_process_trains_is_not_scored_beside_it(tmp_path, tiny_dataset):
    """Scoring rewrites the run's reports and removes its checkpoint: it waits for no one,
    but refuses while another process holds the run (fitting it after a resume)."""
    config = TrainConfig(epochs=1, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = fit(tiny_dataset, config, verbose=0).run_dir
    with training_lock(run_dir):
        with pytest.raises(FerError, match=r"is being trained by process"):
            score(run_dir, tiny_dataset.test)
    assert not is_complete(run_dir)
    score(run_dir, tiny_dataset.test)
    assert is_complete(run_dir)


def test_scoring_a_run_another_process_finished_meanwhile_returns_its_reports(tmp_path,
                                                                              tiny_dataset):
    """A flow's train task lets go of the run before its evaluate task scores it: a `fer
    train --resume` of it in between finishes it. The flow's scoring then failed ("nothing
    to resume: its checkpoint is gone") and the flow run with it; the reports stand now."""
    config = TrainConfig(epochs=1, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = fit(tiny_dataset, config, verbose=0).run_dir
    finished = train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))  # the other
    assert is_complete(run_dir)
    metrics = score(run_dir, tiny_dataset.test)
    assert metrics == finished.metrics == json.loads((run_dir / "metrics.json").read_text())


def test_a_run_is_held_from_its_first_epoch_to_its_scored_reports(tmp_path, tiny_dataset,
                                                                    monkeypatch):
    """`fer train` fitted the run, let go of it, and took it again to score it: a
    `fer train --resume` of it in between could finish the run, and this process's scoring
    then failed on a checkpoint gone. One hold spans both now."""
    import contextlib

    events, real_lock, real_evaluate = [], fer.train.training_lock, fer.train.evaluate_run

    @contextlib.contextmanager
    def recorded_lock(run_dir):
        with real_lock(run_dir):
            events.append("held")
            yield
            events.append("let go")

    def recorded_evaluate(*args, **kwargs):
        events.append("scored")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(fer.train, "training_lock", recorded_lock)
    monkeypatch.setattr(fer.train, "evaluate_run", recorded_evaluate)
    run_dir = train(tiny_dataset, TrainConfig(epochs=1, batch_size=16, out_dir=tmp_path,
                                              precision="float32"), verbose=0).run_dir
    assert events == ["held", "scored", "let go"]
    assert is_complete(run_dir)


def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, tiny_dataset, monkeypatch):
    """A weights file cut short (a crash of the machine mid-write) names the file and what
    to delete, instead of an h5py traceback."""
    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    weights = run_dir / FOLDER / "member-1" / state(run_dir)["weights_file"]
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FerError, match=r"epoch-1\.weights\.h5: unreadable checkpoint .*; delete "
                                       r".*member-1 to train this member again"):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))


def test_an_optimizer_state_that_does_not_load_is_refused(tmp_path, tiny_dataset, monkeypatch):
    """Keras only warns, and leaves the optimizer at step 0, where its variables do not
    match the file (a Keras upgrade between the stop and the resume, a rebuilt image): the
    rest of the run trained from the start of its schedule with zeroed moments, silently."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    monkeypatch.setattr(BaseOptimizer, "load_own_variables", lambda optimizer, store: None)
    with pytest.raises(CheckpointError, match=r"epoch-1\.weights\.h5: the optimizer's state "
                                              r"did not load \(step 0, expected [1-9]") as raised:
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    assert raised.value.member_folder == run_dir / FOLDER / "member-1"


@pytest.mark.parametrize("length", [100, 0])
def test_a_damaged_finished_member_is_a_one_line_error(tmp_path, tiny_dataset, monkeypatch,
                                                       length):
    """A finished member's final.npz cut short (100 bytes: a zip without its directory) or
    empty had been a BadZipFile / EOFError traceback, which a Prefect retry could not tell
    from a bug: one line naming the file and the member folder to delete."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32",
                         ensemble=2)
    run_dir = stopped_run(tmp_path, tiny_dataset, config,
                          EpochSpy(monkeypatch, stop_at=2, stop_member=2))
    final = run_dir / FOLDER / "member-1" / "final.npz"
    final.write_bytes(final.read_bytes()[:length])
    with pytest.raises(CheckpointError, match=r"final\.npz: unreadable checkpoint .*; delete "
                                              r".*member-1 to train this member again") as raised:
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    assert raised.value.member_folder == run_dir / FOLDER / "member-1"


def test_a_state_file_of_bytes_that_are_not_text_is_a_damaged_checkpoint(tmp_path, tiny_dataset,
                                                                         monkeypatch):
    """state.json overwritten with bytes that are not UTF-8 (a disk's garbage after a crash)
    names the member folder to delete, as an unparsable one does, not a traceback."""
    config = TrainConfig(epochs=3, batch_size=16, out_dir=tmp_path, precision="float32")
    run_dir = stopped_run(tmp_path, tiny_dataset, config, EpochSpy(monkeypatch, stop_at=2))
    (run_dir / FOLDER / "member-1" / "state.json").write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(CheckpointError, match=r"state\.json: unreadable checkpoint .*; delete "
                                              r".*member-1 to train this member again"):
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))


def test_a_finished_runs_files_are_on_disk_before_its_checkpoint_goes(tmp_path, disk_events):
    """The checkpoint's removal could reach the disk before the run's files' bytes (Keras
    writes model.keras without an fsync): a power loss then left an empty model.keras,
    which `fer publish` uploads, and no checkpoint to rebuild it from."""
    run_dir = make_run(tmp_path, "20250101-000000-default-0001", accuracy=0.5)
    (run_dir / FOLDER / "member-1").mkdir(parents=True)
    (run_dir / FOLDER / RUN_RECORD).write_text("{}")
    files = {str(path) for path in run_dir.rglob("*")
             if path.is_file() and FOLDER not in path.relative_to(run_dir).parts}
    assert "model.keras" in {Path(path).name for path in files}
    finish_run(run_dir)
    removal = disk_events.index(("replace", str(run_dir / FOLDER)))
    assert {("fsync", path) for path in files | {str(run_dir)}} <= set(disk_events[:removal])


def test_a_divergence_record_of_garbage_still_says_the_run_diverged(tmp_path):
    """diverged.txt overwritten with bytes that are not UTF-8: the run is still one that
    diverged (a traceback from read_run and publish otherwise)."""
    from fer.checkpoint import DIVERGED, diverged_reason

    (tmp_path / FOLDER).mkdir()
    assert diverged_reason(tmp_path) is None
    (tmp_path / FOLDER / DIVERGED).write_bytes(b"\xff\xfe")
    assert diverged_reason(tmp_path).startswith("training diverged (its recorded reason is "
                                               "unreadable); train again with a lower")
    (tmp_path / FOLDER / DIVERGED).write_bytes(b"")  # a stop or a power loss as it was written
    assert diverged_reason(tmp_path).startswith("training diverged (its recorded reason is "
                                               "unreadable)")


def test_a_checkpoint_the_system_cannot_read_is_not_called_damaged(tmp_path, tiny_dataset,
                                                                     monkeypatch):
    """An I/O error (a failing disk, a stale NFS handle) reading a finished member's
    final.npz is no sign of damage (a stop never leaves a half-written file recorded): it is
    one line naming the file and the cause, not a CheckpointError, whose member folder a
    Prefect retry deletes, and the member's files stay."""
    import errno

    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32",
                         ensemble=2)
    run_dir = stopped_run(tmp_path, tiny_dataset, config,
                          EpochSpy(monkeypatch, stop_at=2, stop_member=2))
    final = run_dir / FOLDER / "member-1" / "final.npz"
    before = final.read_bytes()

    def failing_disk(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(fer.checkpoint.np, "load", failing_disk)
    with pytest.raises(FerError, match=r"final\.npz: cannot read it \(Input/output error\); "
                                       r"fix the cause, then resume the run$") as raised:
        train(tiny_dataset, config, verbose=0, resume=read_run(run_dir))
    assert not isinstance(raised.value, CheckpointError)
    assert final.read_bytes() == before


def test_a_retried_flow_run_finds_the_run_it_began_and_no_other(tmp_path, tiny_dataset,
                                                               monkeypatch, caplog):
    """find_started: the run that flow run A started, not B's nor a `fer train` run's,
    stopped (its checkpoint's record says so) or complete (its manifest does); the log
    names the retry."""
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    EpochSpy(monkeypatch, stop_at=2)
    with caplog.at_level("INFO", logger="fer"), pytest.raises(KeyboardInterrupt):
        fit(tiny_dataset, config, verbose=0, started_by="prefect flow run A")
    (began_by_a,) = tmp_path.iterdir()
    assert "or a retry of prefect flow run A continues it" in caplog.text
    for name, starter in [("20990101-000000-default-beef", "prefect flow run B"),
                          ("20990101-000001-default-cafe", None)]:
        record = shutil.copytree(began_by_a, tmp_path / name) / FOLDER / RUN_RECORD
        record.write_text(json.dumps({**json.loads(record.read_text()), "started_by": starter}))

    assert find_started(tmp_path, started_by="prefect flow run A") == began_by_a
    assert find_started(tmp_path, started_by="prefect flow run B").name.endswith("beef")
    assert find_started(tmp_path, started_by="prefect flow run C") is None
    assert not is_complete(began_by_a)

    train(tiny_dataset, config, verbose=0, resume=read_run(began_by_a))
    manifest = json.loads((began_by_a / "manifest.json").read_text())
    assert manifest["started_by"] == "prefect flow run A"
    assert manifest["resumed_at_epochs"] == {"member 1": [1]}
    assert find_started(tmp_path, started_by="prefect flow run A") == began_by_a
    assert is_complete(began_by_a)


class TerminationSignal(BaseException):
    """What Prefect raises for SIGTERM in a flow run: a BaseException, not KeyboardInterrupt."""


def test_a_stop_of_any_kind_logs_the_resume_command(tmp_path, tiny_dataset, monkeypatch, caplog):
    config = TrainConfig(epochs=2, batch_size=16, out_dir=tmp_path, precision="float32")
    EpochSpy(monkeypatch, stop_at=2, stop_with=TerminationSignal)
    with caplog.at_level("INFO", logger="fer"), pytest.raises(TerminationSignal):
        train(tiny_dataset, config, verbose=0)
    (run_dir,) = tmp_path.iterdir()
    assert f"`fer train --resume {run_dir}` continues it" in caplog.text
