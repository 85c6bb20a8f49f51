"""Files written whole: filled under a temporary name beside the target, flushed to disk,
then renamed onto it. A reader never sees half a file, and a stop, a failure or a power
loss mid-write leaves the previous file (or none), never half of one or an empty one
(Keras, numpy and boto3 write without an fsync, so a rename could reach the disk before
the bytes it names).

Dataset downloads (fer.fetch) keep one fixed partial name under the data folder's lock
instead, so that a killed download's bytes are overwritten by the next try, not left
beside it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def written_whole(path: Path, *, suffix: str = ".part") -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; when the block ends, the
    file is flushed to disk and renamed onto ``path``, and the rename flushed too. Where
    the block or the flush fails, the temporary is removed and ``path`` left as it was.

    Each write has a temporary of its own (the process id and a random part; containers
    sharing a volume often share a pid, 1), so two writers of one file never rename or
    truncate each other's. ``suffix`` ends its name: numpy appends ``.npz`` to a name
    without it, and ``remove_abandoned`` finds a killed writer's by it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        yield partial
        fsync_path(partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def temporaries_of(path: Path, *, suffix: str = ".part") -> Iterator[Path]:
    """The temporaries written_whole makes for ``path`` with ``suffix``, any writer's: for
    remove_abandoned, so that their naming lives here alone."""
    return path.parent.glob(f".{glob.escape(path.name)}.*{suffix}")


def fsync_path(path: Path) -> None:
    """``path`` (a file, or a folder after a rename in it) flushed to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(path: Path) -> None:
    """A folder flushed to disk after a rename in it, where the filesystem allows: some
    network filesystems refuse to fsync a folder, which must not fail the write."""
    with contextlib.suppress(OSError):
        fsync_path(path)


ABANDONED_AFTER_S = 24 * 3600


def remove_abandoned(temporaries: Iterable[Path]) -> None:
    """Temporary files (a decode cache's, a folder store's) a day old: their writer was
    killed mid-write (an out-of-memory kill, Ctrl-C twice), since a write takes seconds and
    touches its file as it goes; removed so they do not pile up."""
    for tmp in temporaries:
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                tmp.unlink()
