"""The kernels' build lock: one left by a killed build must not hang every later start."""

from __future__ import annotations

import os
import threading
import time

from aerie_common.cpu_extension import clear_stale_lock


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    left = time.time() - 700
    os.utime(lock, (left, left))

    started = time.monotonic()
    clear_stale_lock(tmp_path, stale_after_s=600)

    assert not lock.exists()
    assert time.monotonic() - started < 1


def test_a_young_lock_is_waited_for_and_left_to_its_build(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    build = threading.Timer(1.5, lock.unlink)  # the build that holds it ends
    build.start()

    started = time.monotonic()
    clear_stale_lock(tmp_path, stale_after_s=600)

    assert time.monotonic() - started >= 1.4
    build.join()


def test_no_lock_no_wait(tmp_path):
    started = time.monotonic()
    clear_stale_lock(tmp_path)
    assert time.monotonic() - started < 0.1
