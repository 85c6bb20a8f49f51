"""Run folders as `fer train` writes them, and stores that fail mid-publish: shared by the
tests of fer.runs (publishing, reading) and fer.storage (the backends under them)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from s3server import BUCKET

from fer.errors import StorageError
from fer.runs import resolve_run
from fer.storage import open_store

BIG = 9 * 1024 * 1024  # over the 8 MiB multipart threshold
T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    """An empty store of each backend: a folder, and a fresh prefix on the SeaweedFS server
    (the test module provides the ``s3_env`` fixture)."""
    if request.param == "local":
        return open_store(str(tmp_path / "artifacts"))
    server = request.getfixturevalue("s3_env")
    return open_store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=server.endpoint_url)


def make_run(root: Path, run_id: str, *, accuracy: float, minute: int = 0,
             big: bool = False, val_accuracy: float | None = None,
             data_sha256: str = "0" * 64,
             validation: str = "carved from train (0.1, seed 1337)") -> Path:
    """A run folder as `fer train` writes it, with dummy artifact bytes.

    The validation accuracy (what the champion is chosen on) is the test accuracy unless given.
    """
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(os.urandom(BIG if big else 2048))
    (folder / "history.csv").write_text("epoch,loss,accuracy\n0,1.9,0.2\n1,1.5,0.4\n")
    (folder / "curves.png").write_bytes(os.urandom(512))
    (folder / "confusion_matrix.png").write_bytes(os.urandom(512))
    (folder / "classification_report.txt").write_text(f"report of {run_id}\naccuracy {accuracy}\n")
    (folder / "classification_report.json").write_text(json.dumps({"accuracy": accuracy}))
    metrics = {"accuracy": accuracy, "macro_f1": accuracy - 0.1, "epochs": 2,
               "per_class_recall": {"happy": accuracy}, "wall_seconds": 3.5,
               "train_images_per_second": 1000.0,
               "best_val_accuracy": accuracy if val_accuracy is None else val_accuracy}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    manifest = {"run_id": run_id, "created": (T0 + timedelta(minutes=minute)).isoformat(),
                "model": "default", "parameters": {"epochs": 2, "batch_size": 64},
                "data": {"source": "fer2013.csv", "sha256": data_sha256,
                         "validation": validation},
                "versions": {"python": "3.11"}, "seed": 1337, "precision": "float32",
                "git_commit": "abc123"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}


def pointers(store) -> tuple[str, str]:
    """The run ids the latest and champion pointers name."""
    return resolve_run(store, "latest").run_id, resolve_run(store, "champion").run_id


class CrashAfterUploads:
    """A store that fails (or runs ``on_crash``) after N artifact uploads, like a dying publish."""

    def __init__(self, inner, *, uploads: int, on_crash=None) -> None:
        self.inner, self.left, self.on_crash = inner, uploads, on_crash

    def put_file(self, key, path):
        if self.left == 0 and self.on_crash is None:
            raise StorageError("simulated crash")
        self.inner.put_file(key, path)
        self.left -= 1
        if self.left == 0 and self.on_crash is not None:
            self.on_crash()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def epochs_done(out_dir: Path) -> int:
    """How many epochs the checkpoint of a training in progress in ``out_dir`` records (its
    first member's); 0 before any."""
    for path in Path(out_dir).glob("*/checkpoint/member-1/state.json"):
        with contextlib.suppress(OSError, ValueError):  # being replaced this instant
            return json.loads(path.read_text())["epochs_done"]
    return 0
