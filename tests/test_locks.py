"""fer.locks: processes take turns through an flock on a lock file."""

from __future__ import annotations

import logging
import threading

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
        waiter.join(0.5)
        assert waiter.is_alive() and order == ["first in"]  # still waiting
        release.set()
        waiter.join(10)
    holder.join(10)
    assert order == ["first in", "first out", "second in"]
    assert "second waits for the first" in caplog.text


def test_the_lock_file_is_created_and_left_for_the_next_holder(tmp_path):
    """The lock file is made when missing and kept (deleting it while another process
    waits on it would let a third take a different lock)."""
    lock = tmp_path / "y.lock"
    with taking_turns(lock, waiting="-", unprotected="-"):
        assert lock.exists()
    assert lock.exists()
