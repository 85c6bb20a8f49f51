"""fer.manifest: the JSON records every run and cache keeps are written whole."""

from __future__ import annotations

import json
import threading

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
