"""fer.locks: processes take turns through an flock on a lock file."""

from __future__ import annotations

import logging
import threading
import time

from fer.locks import taking_turns


def test_a_second_holder_waits_until_the_first_lets_go(tmp_path, caplog):
    """While one holder has the lock, another (a separate open of the same file, as a second
    process would make) waits, saying why, and goes on once the first lets go."""
    lock = tmp_path / "x.lock"
    order, first_holds, release = [], threading.Event(), threading.Event()

    def first():
        with taking_turns(lock, waiting="first waits", unprotected="-"):
            order.append("first in")
            first_holds.set()
            release.wait(10)
            order.append("first out")

    holder = threading.Thread(target=first)
    holder.start()
    first_holds.wait(10)

    def second():
        with taking_turns(lock, waiting="second waits for the first", unprotected="-"):
            order.append("second in")

    with caplog.at_level(logging.INFO, logger="fer.locks"):
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 10  # its thread may start late on a loaded machine
        while "second waits for the first" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        waiter.join(0.2)
        assert waiter.is_alive() and order == ["first in"]  # still waiting
        release.set()
        waiter.join(10)
    holder.join(10)
    assert order == ["first in", "first out", "second in"]
    assert "second waits for the first" in caplog.text


def test_a_wait_for_the_lock_that_fails_goes_ahead_with_a_warning(tmp_path, monkeypatch,
                                                                 caplog):
    """The lock taken, the wait for it failing (NFS: ENOLCK, its lock manager restarted
    meanwhile): the work goes ahead after the warning, as where no lock can be had at all;
    the error had reached the fetch or publish as a traceback."""
    import errno
    import fcntl

    def flock(descriptor, operation):
        if operation & fcntl.LOCK_NB:
            raise BlockingIOError(errno.EWOULDBLOCK, "taken")
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)
    ran = []
    with caplog.at_level("INFO", logger="fer.locks"), taking_turns(
            tmp_path / "x.lock", waiting="waiting for the other", unprotected="may collide"):
        ran.append(True)
    assert ran == [True]
    assert "waiting for the other" in caplog.text
    assert "x.lock: cannot lock it (No locks available); may collide" in caplog.text


def test_the_lock_file_is_created_and_left_for_the_next_holder(tmp_path):
    """The lock file is made when missing and kept (deleting it while another process
    waits on it would let a third take a different lock)."""
    lock = tmp_path / "y.lock"
    with taking_turns(lock, waiting="-", unprotected="-"):
        assert lock.exists()
    assert lock.exists()


def test_a_new_lock_file_is_writable_by_whoever_may_write_its_folder(tmp_path):
    """A folder store shared by a group (its folder 2775): the umask had made the lock file
    0644, so other members could open it read-only only, which NFS refuses an exclusive
    lock, and their publishes went ahead unprotected. A private folder's stays private."""
    import os
    import stat

    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir(mode=0o2775)
    private.mkdir(mode=0o700)
    os.chmod(shared, 0o2775)  # past the umask
    old_umask = os.umask(0o022)
    try:
        for folder in (shared, private):
            with taking_turns(folder / "x.lock", waiting="-", unprotected="-"):
                pass
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((shared / "x.lock").stat().st_mode) == 0o664
    assert stat.S_IMODE((private / "x.lock").stat().st_mode) == 0o600
