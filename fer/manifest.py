"""Provenance of a run: parameters, data, versions, machine and code revision."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import re
import secrets
import subprocess
from importlib import metadata
from pathlib import Path

from fer.errors import writing
from fer.files import written_whole
from fer.precision import BF16_FLAGS, cpu_flags, onednn_enabled

TRACKED_PACKAGES = ("fer", "tensorflow", "tensorflow-cpu", "keras", "numpy", "pandas",
                    "scikit-learn", "matplotlib", "opencv-python-headless", "boto3")


# What new_run_id makes (fer.data tells a run folder from the dataset's own by it).
RUN_ID_PATTERN = re.compile(r"\d{8}-\d{6}-[A-Za-z0-9._-]+-[0-9a-f]{4}")


def new_run_id(model: str) -> str:
    """Sortable by time, unique across machines: ``20261125-134501-default-3f9a``."""
    now = dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{model}-{secrets.token_hex(2)}"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(package_dir: Path = PACKAGE_DIR) -> str | None:
    """The commit of the fer checkout that ran, with ``-dirty`` appended when its tracked
    files had changes not committed (as `git describe --dirty` marks it); outside a fer
    checkout (an installed copy, a container image), the FER_GIT_COMMIT it was built with;
    else None.

    A checkout counts only when it holds this very package: an installed fer whose venv
    lies inside some other repository must not record that repository's commit.
    Read here rather than through fer.config.Settings: it describes the installed code,
    like the package versions beside it, and no user sets it for a run.
    """
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    head = _git(package_dir, "rev-parse", "HEAD") if top else None
    if head and (Path(top) / "fer").resolve() == package_dir.resolve():
        changes = _git(package_dir, "--no-optional-locks", "status", "--porcelain",
                       "--untracked-files=no")  # takes no index.lock from a user's git
        return head + ("-dirty" if changes else "")
    return os.environ.get("FER_GIT_COMMIT") or None


def _git(directory: Path, *args: str) -> str | None:
    """git's answer in ``directory``, stripped; None where git is missing or fails."""
    try:
        result = subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                                text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu_model = platform.processor()
    return {"cpu": cpu_model, "cores": os.cpu_count(), "platform": platform.platform(),
            "bf16_flags": sorted(cpu_flags() & BF16_FLAGS), "onednn": onednn_enabled()}


def jsonable(value):
    """Dataclasses and paths as plain JSON values."""
    if dataclasses.is_dataclass(value):
        return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, payload: dict) -> Path:
    """Written whole (fer.files): a stop or a power loss mid-write leaves the previous file
    (or none), never half of one, and two processes updating one record (a worker and a
    CLI on one data folder) never rename each other's."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as partial:
            partial.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    return path


def read_json(path: Path) -> dict:
    """A small JSON record (a memo, a pointer); ``{}`` when it is missing or unreadable,
    which its readers treat as never written."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
