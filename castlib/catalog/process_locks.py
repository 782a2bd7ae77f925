"""The lock primitive under the destination locks (locks.py) and the index locks
(index_lock.py): named locks that die with their process, so a crashed run never blocks
the next one.

PostgreSQL: session advisory locks on one connection held for the block (the server drops
them when the connection goes). SQLite: flock on files beside the database (the kernel
drops them when the process goes), each removed when its last holder releases it. An
in-memory SQLite catalog has one process: nothing to lock against.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .database import CatalogError, driver_errors


@dataclass(frozen=True)
class LockKey:
    pg: tuple[int, int]   # the two int4 keys of a PostgreSQL advisory lock
    file: str             # the lock file's suffix beside an SQLite catalog: "{db}.{file}"
    shared: bool = False


@contextmanager
def hold(catalog, keys: list[LockKey], *, timeout_s: float | None,
         on_wait: Callable[[], None] | None = None,
         busy: Callable[[LockKey], Exception] | None = None) -> Iterator[None]:
    """Hold every lock of `keys`, taken in their order (give everyone one order, and no two
    holders wait on each other in a cycle), released in reverse when the block ends.
    A lock someone else holds: on_wait() once, then wait for it, for ever (timeout_s None)
    or until timeout_s have passed, when busy(key) is raised."""
    if catalog.dialect == "postgresql":
        take, release = _advisory(catalog)
    elif catalog.dialect == "sqlite":
        database = catalog.sqlite_file
        if not database:   # in memory: one process, nobody to wait for
            yield
            return
        take, release = _flock(catalog, database)
    else:  # pragma: no cover - only the two supported databases reach here
        yield
        return
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited = False
        for key in keys:
            if take(key, False):
                continue
            if on_wait and not waited:
                on_wait()
                waited = True
            if deadline is None:
                take(key, True)
                continue
            while not take(key, False):
                if time.monotonic() >= deadline:
                    raise busy(key)
                time.sleep(0.2)
        yield
    finally:
        release()


def _advisory(catalog):
    from sqlalchemy import text   # PostgreSQL only: an SQLite run never imports it

    conn = catalog.engine.connect()
    taken: list[LockKey] = []

    def take(key: LockKey, block: bool) -> bool:
        mode = "_shared" if key.shared else ""
        args = {"ns": key.pg[0], "id": key.pg[1]}
        if block:
            conn.execute(text(f"SELECT pg_advisory_lock{mode}(:ns, :id)"), args)
            got = True
        else:
            got = conn.execute(text(f"SELECT pg_try_advisory_lock{mode}(:ns, :id)"),
                               args).scalar()
        # a session lock outlives the transaction; ending it keeps no snapshot open
        conn.commit() if got else conn.rollback()
        if got:
            taken.append(key)
        return bool(got)

    def release() -> None:
        try:
            for key in reversed(taken):
                mode = "_shared" if key.shared else ""
                conn.execute(text(f"SELECT pg_advisory_unlock{mode}(:ns, :id)"),
                             {"ns": key.pg[0], "id": key.pg[1]})
            conn.commit()
        finally:
            conn.close()   # the server drops whatever the session still held

    return take, release


def _flock(catalog, database: str):
    """flock on `{database}.{key.file}`. The file of a lock nobody else holds is removed as
    it is released (many destinations, each with the folders above it, left a file each
    beside the catalog for ever). Without a race: it is removed only by a holder that
    took it exclusively, and a taker checks, once it holds it, that the name still leads
    to the file it locked; one that was removed meanwhile is opened (made) again."""
    import fcntl

    fds: dict[LockKey, int] = {}

    def take(key: LockKey, block: bool) -> bool:
        path = f"{database}.{key.file}"
        mode = fcntl.LOCK_SH if key.shared else fcntl.LOCK_EX
        while True:
            if key not in fds:
                with driver_errors(database):   # a read-only or full catalog folder: one line
                    fds[key] = _open_lock_file(path)
            try:   # flock is per open file: other threads of this process wait too
                fcntl.flock(fds[key], mode if block else mode | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if _names(path, fds[key]):
                return True
            os.close(fds.pop(key))   # removed by its last holder while we waited: again

    def release() -> None:
        for key, fd in reversed(fds.items()):
            _release(f"{database}.{key.file}", fd)

    return take, release


@contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive flock on the file `path` for the block, as _flock takes its locks:
    the file made if missing (never through a link), waited for, removed by its last
    holder. (The SQLite catalog's upgrade lock: catalog.database.)"""
    import fcntl

    while True:
        with driver_errors(path):
            fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)   # released by the kernel if this process dies
        except BaseException:
            os.close(fd)
            raise
        if _names(path, fd):
            break
        os.close(fd)   # removed by its last holder while we waited: again
    try:
        yield
    finally:
        _release(path, fd)


def _release(path: str, fd: int) -> None:
    """Let go of the lock file `path` open as `fd`, and remove it if nobody else holds
    it and the name still leads to it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # nobody else holds it
        if _names(path, fd):
            os.unlink(path)
    except OSError:   # held by another (BlockingIOError), or not ours to remove
        pass
    finally:
        os.close(fd)   # closing the last descriptor of a file releases its flock


def _open_lock_file(path: str) -> int:
    """The lock file at `path`, made if missing. One another user made (0644: theirs while
    their run holds it) is opened to read: flock needs no write access, and this run then
    waits its turn instead of failing on a file it cannot write. Anything but a plain
    file there (a folder; a link, which would make or lock a file elsewhere) is refused."""
    import errno

    try:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except PermissionError as refused:
            try:
                return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:   # none to read: a folder this user cannot write,
                raise refused from None   # the one line driver_errors says
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        what = "a link" if exc.errno == errno.ELOOP else "a folder"
        raise CatalogError(f"{path}: not a plain file ({what}), where castlib keeps a lock "
                           "of this catalog: move it away") from None


def _names(path: str, fd: int) -> bool:
    """Whether `path` is the file open as `fd` (not removed, nor made again since)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
