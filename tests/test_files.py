"""fer.files: a file written whole replaces the previous one only once it is on disk."""

import os
import time

import pytest

from fer.files import ABANDONED_AFTER_S, remove_abandoned, temporaries_of, written_whole


def test_the_bytes_take_the_name_and_no_temporary_is_left(tmp_path):
    """The block writes a hidden temporary beside the target, with the suffix asked for;
    afterwards the target holds its bytes and the temporary is gone."""
    target = tmp_path / "report.json"
    target.write_text("old")
    with written_whole(target, suffix=".tmp") as partial:
        assert partial.parent == tmp_path and partial.name.startswith(".report.json.")
        assert partial.name.endswith(".tmp") and partial != target
        partial.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the block ends
        assert list(temporaries_of(target, suffix=".tmp")) == [partial]  # found to clean up
    assert target.read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


def test_a_failing_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    """A write that fails partway (a full disk, Ctrl-C) must not put half a file in place."""
    target = tmp_path / "model.keras"
    target.write_text("whole")
    with pytest.raises(KeyboardInterrupt), written_whole(target) as partial:
        partial.write_text("ha")
        raise KeyboardInterrupt
    assert target.read_text() == "whole"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.keras"]


def test_the_bytes_are_on_disk_before_the_rename_and_the_rename_after_it(tmp_path,
                                                                         disk_events):
    """A rename can reach the disk before the bytes it names (Keras and numpy write without
    an fsync): after a power loss the name would point at an empty file. So the file is
    flushed, then renamed, then its folder flushed."""
    with written_whole(tmp_path / "x.npz") as partial:
        partial.write_bytes(b"bytes")
    assert disk_events == [("fsync", str(partial)), ("replace", str(partial)),
                      ("fsync", str(tmp_path))]


def test_a_failing_flush_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """An fsync that fails (EIO, a full network disk) means the bytes may not be there:
    the file is not put in place and the error reaches the caller."""
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def failing_fsync(handle):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"), written_whole(target) as partial:
        partial.write_text("new")
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.json"]


def test_two_writers_of_one_file_each_have_their_own_temporary(tmp_path):
    """Two processes writing one record (a worker and a CLI on one folder) must never
    truncate or rename each other's temporary: the last to finish wins, whole."""
    target = tmp_path / "state.json"
    with written_whole(target) as first, written_whole(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block ends last
    assert sorted(path.name for path in tmp_path.iterdir()) == ["state.json"]


def test_only_temporaries_a_day_old_are_removed(tmp_path):
    """A killed writer's temporary is removed once it is a day old; a younger one may be a
    write in progress (another process's) and stays."""
    abandoned, fresh = tmp_path / ".a.1-aa.tmp", tmp_path / ".a.2-bb.tmp"
    for path in (abandoned, fresh):
        path.write_text("x")
    day_old = time.time() - ABANDONED_AFTER_S - 60
    os.utime(abandoned, (day_old, day_old))
    remove_abandoned([abandoned, fresh, tmp_path / "gone.tmp"])
    assert not abandoned.exists() and fresh.exists()
