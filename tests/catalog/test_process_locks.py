"""The lock primitive under destination and index locks (catalog/process_locks.py), on both
catalogs: exclusive against all, shared against exclusive only, a timeout that says who
holds it, and a wait for ever that says once that it waits."""
from __future__ import annotations

import os
import shutil
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


def _lock_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".test-lock-" in p.name)


def test_an_sqlite_lock_file_goes_when_its_last_holder_releases_it(tmp_path):
    """Beside an SQLite catalog a lock is a file; it is removed as its last holder lets it
    go (one file a destination and a folder above it was left for ever), and kept while
    another holds it."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    shared = LockKey(KEY.pg, KEY.file, shared=True)
    other = LockKey((0x0CA7, 2), "test-lock-2")
    with hold(catalog, [shared, other], timeout_s=0, busy=busy):
        assert _lock_files(tmp_path) == ["catalog.sqlite.test-lock-1", "catalog.sqlite.test-lock-2"]
        with hold(catalog, [shared], timeout_s=0, busy=busy):
            pass
        assert _lock_files(tmp_path) == ["catalog.sqlite.test-lock-1", "catalog.sqlite.test-lock-2"]
        with pytest.raises(Busy):   # a refused taker removes nothing either
            with hold(catalog, [KEY], timeout_s=0, busy=busy):
                pass
        assert len(_lock_files(tmp_path)) == 2
    assert _lock_files(tmp_path) == []
    catalog.close()


def test_the_upgrade_lock_goes_with_its_last_holder_and_never_follows_a_link(tmp_path):
    """The SQLite catalog's upgrade lock (openers in line while its schema is made) was
    left beside the catalog for ever, was opened to write (another user's 0644 file
    failed the run), and followed a link planted in its place to make a file wherever it
    pointed. It is taken as the other lock files are."""
    from castlib.catalog.database import CatalogError

    Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}").close()
    assert sorted(os.listdir(tmp_path)) == ["catalog.sqlite"]
    path, target = tmp_path / "other.sqlite.upgrade-lock", tmp_path / "elsewhere"
    path.symlink_to(target)
    with pytest.raises(CatalogError, match=f"{path}: not a plain file"):
        Catalog(f"sqlite:///{tmp_path / 'other.sqlite'}").close()
    assert not target.exists() and os.path.islink(path)


def _count_under_lock(database: str, counter: str, rounds: int) -> None:
    catalog = Catalog(f"sqlite:///{database}")
    for _ in range(rounds):
        with hold(catalog, [KEY], timeout_s=None):
            with open(counter) as f:   # read, pause, write: lost updates without the lock
                value = int(f.read())
            time.sleep(0.0005)
            with open(counter, "w") as f:
                f.write(str(value + 1))
    catalog.close()


def test_removing_lock_files_keeps_the_lock_exclusive_between_processes(tmp_path):
    """Four processes take one lock 150 times each while its file is removed and made again
    by each release: a taker that waited on a file removed meanwhile takes the new one, so
    no two ever hold it at once (no update of the shared counter is lost)."""
    import multiprocessing

    database = str(tmp_path / "catalog.sqlite")
    Catalog(f"sqlite:///{database}").close()
    counter = tmp_path / "counter"
    counter.write_text("0")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_count_under_lock, args=(database, str(counter), 150))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert counter.read_text() == "600"
    assert _lock_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to act as another user")
def test_a_lock_file_of_another_user_is_waited_for_not_refused(tmp_path):
    """A catalog folder two users share: while one user's run holds a lock, its file is
    that user's (0644: the other may read it, not write it). The other user's run waits
    for it, as for its own; flock needs no write access to the file."""
    import pwd
    import stat
    import tempfile
    from types import SimpleNamespace

    folder = tempfile.mkdtemp(prefix="castlib-shared-")   # /tmp: not under root's 0700
    os.chmod(folder, stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
    lite = SimpleNamespace(dialect="sqlite", sqlite_file=os.path.join(folder, "c.db"))
    other = pwd.getpwnam("nobody")
    try:
        with hold(lite, [KEY], timeout_s=0, busy=busy):
            pid = os.fork()
            if pid == 0:   # the other user, its run
                code = 1
                try:
                    os.setgid(other.pw_gid)
                    os.setuid(other.pw_uid)
                    with hold(lite, [KEY], timeout_s=0.3, busy=busy):
                        code = 2
                except Busy:
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0   # it waited its turn, then gave up
        with hold(lite, [KEY], timeout_s=0, busy=busy):   # and the lock still works here
            pass
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("planted", ["folder", "dangling link", "link to a file"])
def test_a_lock_path_that_is_not_a_plain_file_is_refused_in_one_line(tmp_path, planted):
    """Something else where a lock file goes (a folder; a link, which castlib would follow
    to make or lock a file elsewhere) is refused with one line naming it, and nothing is
    made or removed through a link."""
    from castlib.catalog.database import CatalogError

    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    path = tmp_path / f"catalog.sqlite.{KEY.file}"
    target = tmp_path / "elsewhere"
    if planted == "folder":
        path.mkdir()
    else:
        if planted == "link to a file":
            target.write_text("theirs")
        path.symlink_to(target)
    with pytest.raises(CatalogError, match=f"{path}: not a plain file"):
        with hold(catalog, [KEY], timeout_s=0, busy=busy):
            pass
    assert os.path.lexists(path)
    assert (target.read_text() == "theirs") if planted == "link to a file" else not target.exists()
    catalog.close()
