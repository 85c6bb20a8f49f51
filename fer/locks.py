"""Taking turns between processes with an flock on a lock file: the publishers moving a
folder store's pointers, the fetches unpacking into one FER_DATA_DIR.

The kernel releases a lock when its holder exits, however it exits. Where no lock can be
had (a lock file this user may not open, a filesystem without locks: some NFS, CIFS, FUSE
mounts) the work goes ahead after a warning that says what is left unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def taking_turns(path: Path, *, waiting: str, unprotected: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created when missing) for the block; while
    another process holds it, log ``waiting`` and wait. ``unprotected``: what can go
    wrong when no lock can be had, for the warning. An OSError when the lock file can be
    neither opened nor created (the caller names the folder)."""
    import fcntl

    descriptor = _open_for_locking(path)
    if descriptor is None:
        log.warning("%s: cannot open it to lock; %s", path, unprotected)
        yield
        return
    try:
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s", waiting)
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as exc:  # the wait's too: NFS's lock manager restarted meanwhile
            log.warning("%s: cannot lock it (%s); %s", path, exc.strerror, unprotected)
        yield
    finally:
        os.close(descriptor)


def _open_for_locking(path: Path) -> int | None:
    """A descriptor of ``path`` for flock: open for writing where allowed (NFS emulates
    flock with a byte-range lock, and an exclusive one needs a file open for writing),
    else read-only (a lock file another user created in a shared folder locks as well);
    None when it exists but neither is allowed. An OSError when it can be neither opened
    nor created: the folder is not writable, and the work there would fail anyway."""
    existed = os.path.lexists(path)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno not in _NOT_ALLOWED:
            raise
        refused = exc
    else:
        if not existed:
            _writable_by_the_folders_writers(descriptor, path)
        return descriptor
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise refused from None
    except OSError as exc:
        if exc.errno not in _NOT_ALLOWED:
            raise
    return None


def _writable_by_the_folders_writers(descriptor: int, path: Path) -> None:
    """A new lock file made writable by whoever may write its folder: the umask (0644,
    mostly) had left the other users of a group-shared folder store only a read-only
    descriptor, which NFS refuses an exclusive lock, so their publishes went ahead
    unprotected."""
    with contextlib.suppress(OSError):  # not ours after all, or a filesystem without modes
        os.fchmod(descriptor, stat.S_IMODE(os.stat(path.parent).st_mode) & 0o666)
