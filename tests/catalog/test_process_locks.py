"""The lock primitive under destination and index locks (catalog/process_locks.py), on both
catalogs: exclusive against all, shared against exclusive only, a timeout that says who
holds it, and a wait for ever that says once that it waits."""
from __future__ import annotations

import threading
import time

import pytest

from castlib.catalog import Catalog
from castlib.catalog.process_locks import LockKey, hold

KEY = LockKey(pg=(0x0CA7, 1), file="test-lock-1")


class Busy(Exception):
    pass


def busy(key):
    return Busy(key.file)


@pytest.fixture
def catalog(db_url):
    c = Catalog(db_url)
    yield c
    c.close()


def test_exclusive_excludes_everyone_and_shared_only_the_exclusive(catalog):
    shared = LockKey(KEY.pg, KEY.file, shared=True)
    with hold(catalog, [KEY], timeout_s=0, busy=busy):
        for other in (KEY, shared):
            with pytest.raises(Busy, match="test-lock-1"):
                with hold(catalog, [other], timeout_s=0.3, busy=busy):
                    pass
    with hold(catalog, [shared], timeout_s=0, busy=busy):
        with hold(catalog, [shared], timeout_s=0, busy=busy):   # readers side by side
            with pytest.raises(Busy):
                with hold(catalog, [KEY], timeout_s=0, busy=busy):
                    pass
    with hold(catalog, [KEY], timeout_s=0, busy=busy):   # all released
        pass


def test_a_lock_without_timeout_waits_its_turn_and_says_so_once(catalog):
    waits, order = [], []
    holding, release = threading.Event(), threading.Event()

    def first():
        with hold(catalog, [KEY], timeout_s=None):
            holding.set()
            release.wait(30)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(30)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    with hold(catalog, [KEY], timeout_s=None, on_wait=lambda: waits.append(1)):
        order.append("second in")
    thread.join(30)
    assert waits == [1] and order == ["first done", "second in"]
    assert time.monotonic() - started >= 0.4
