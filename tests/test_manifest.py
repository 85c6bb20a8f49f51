"""fer.manifest: the JSON records every run and cache keeps are written whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from fer.manifest import read_json, write_json


def test_concurrent_writers_of_one_record_never_fail_or_leave_half_a_file(tmp_path):
    """Two fer processes (a worker and a user's CLI on one data folder) may update the same
    memo at once: each write goes through a file of its own, so neither trips over the
    other's rename, and the record, read at any moment, is always one writer's whole
    payload."""
    path = tmp_path / "sha256-index.json"
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            for round_ in range(40):
                write_json(path, {"writer": number, "round": round_, "pad": "x" * 2000})
        except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    seen: list[dict] = []
    writing = threading.Event()

    def reader() -> None:  # a third process reading the memo meanwhile sees whole records
        while writing.is_set():
            try:
                seen.append(json.loads(path.read_text()))
            except FileNotFoundError:  # before the first write
                continue
            except BaseException as exc:  # noqa: BLE001 (a torn file: collected)
                errors.append(exc)

    writing.set()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writing.clear()
    watcher.join()
    assert errors == []
    assert seen and all(set(record) == {"writer", "round", "pad"} and len(record["pad"]) == 2000
                        for record in seen)
    assert set(json.loads(path.read_text())) == {"writer", "round", "pad"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_missing_or_damaged_record_reads_as_empty(tmp_path):
    assert read_json(tmp_path / "none.json") == {}
    (tmp_path / "cut.json").write_text('{"sha256": "ab')
    assert read_json(tmp_path / "cut.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") == {}


def checkout_commit() -> str | None:
    """What git says of the fer package's checkout: HEAD, '-dirty' with uncommitted changes
    to tracked files; None outside a checkout or without git."""
    import fer

    if not shutil.which("git"):
        return None
    here = ["git", "-C", str(Path(fer.__file__).parent)]
    head = subprocess.run([*here, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False)
    if head.returncode != 0:
        return None
    status = subprocess.run([*here, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True)
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def test_a_write_that_fails_leaves_the_previous_record_and_no_part_file(tmp_path, monkeypatch):
    """A rename refused (a full disk, a stop) leaves the record as it was and removes the
    temporary file beside it, which would otherwise pile up in a cache folder."""
    import errno
    import os

    import fer.manifest

    path = write_json(tmp_path / "record.json", {"version": 1})

    def refused(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(fer.manifest.os, "replace", refused)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"version": 2})
    monkeypatch.undo()
    assert read_json(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["record.json"]


def test_new_run_ids_are_ones_fer_recognises_as_run_folders():
    """fer.data tells a run folder (left out of a dataset's walk) by RUN_ID_PATTERN: every
    id new_run_id makes, whatever the model's name, must match it."""
    from fer.manifest import RUN_ID_PATTERN, new_run_id
    from fer.options import MODEL_NAMES

    for model in MODEL_NAMES:
        assert RUN_ID_PATTERN.fullmatch(new_run_id(model)), model


@pytest.mark.skipif(not shutil.which("git"), reason="git is not installed")
def test_a_commit_with_uncommitted_changes_is_marked_dirty_and_another_repo_is_not_ours(
        tmp_path, monkeypatch):
    """A run trained on edited code must not claim a clean commit; and an installed fer
    whose venv lies inside another repository records its image's commit, not that
    repository's."""
    from fer.manifest import git_commit

    monkeypatch.delenv("FER_GIT_COMMIT", raising=False)
    repo = tmp_path / "checkout"
    (repo / "fer").mkdir(parents=True)
    (repo / "fer" / "__init__.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "fer"]):
        subprocess.run([*git, *args], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit(repo / "fer") == head
    (repo / "fer" / "__init__.py").write_text("x = 1\n")
    assert git_commit(repo / "fer") == f"{head}-dirty"
    (repo / "fer" / "__init__.py").write_text("")
    (repo / "fer" / "new.py").write_text("")  # untracked: not part of the commit's code
    assert git_commit(repo / "fer") == head
    installed = repo / ".venv" / "lib" / "site-packages" / "fer"
    installed.mkdir(parents=True)
    assert git_commit(installed) is None
    monkeypatch.setenv("FER_GIT_COMMIT", "0123abc")
    assert git_commit(installed) == "0123abc"
    assert git_commit(repo / "fer") == head  # a checkout's own commit wins over the image's


def test_without_git_the_commit_is_the_one_the_image_was_built_with(monkeypatch, tmp_path):
    """In the container image (no git binary, no .git), run manifests record the
    FER_GIT_COMMIT the image was built with (docker/compose.yaml passes it), not null
    (with git, the checkout's own commit wins: the test above)."""
    from fer.manifest import git_commit

    monkeypatch.setenv("FER_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to run
    assert git_commit() == "0123abc"
    monkeypatch.delenv("FER_GIT_COMMIT")
    assert git_commit() is None
