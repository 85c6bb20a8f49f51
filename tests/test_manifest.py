"""fer.manifest: the JSON records every run and cache keeps are written whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

from fer.manifest import read_json, write_json


def test_concurrent_writers_of_one_record_never_fail_or_leave_half_a_file(tmp_path):
    """Two fer processes (a worker and a user's CLI on one data folder) may update the same
    memo at once: each write goes through a file of its own, so neither trips over the
    other's rename, and the record is always one writer's whole payload."""
    path = tmp_path / "sha256-index.json"
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            for round_ in range(40):
                write_json(path, {"writer": number, "round": round_, "pad": "x" * 2000})
        except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(json.loads(path.read_text())) == {"writer", "round", "pad"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_missing_or_damaged_record_reads_as_empty(tmp_path):
    assert read_json(tmp_path / "none.json") == {}
    (tmp_path / "cut.json").write_text('{"sha256": "ab')
    assert read_json(tmp_path / "cut.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") == {}


def test_without_git_the_commit_is_the_one_the_image_was_built_with(monkeypatch, tmp_path):
    """In the container image (no git binary, no .git), run manifests record the
    FER_GIT_COMMIT the image was built with (docker/compose.yaml passes it), not null;
    with git, the checkout's own commit wins."""
    import fer
    from fer.manifest import git_commit

    monkeypatch.setenv("FER_GIT_COMMIT", "0123abc")
    if shutil.which("git"):
        checkout = subprocess.run(["git", "-C", str(Path(fer.__file__).parent), "rev-parse",
                                   "HEAD"], capture_output=True, text=True, check=False)
        if checkout.returncode == 0:  # a checkout (CI's clone is one): its HEAD
            assert git_commit() == checkout.stdout.strip()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to run
    assert git_commit() == "0123abc"
    monkeypatch.delenv("FER_GIT_COMMIT")
    assert git_commit() is None
