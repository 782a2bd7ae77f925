"""Destination locks: one sync at a time into a location, released when its process dies.

PostgreSQL: a session advisory lock on a connection held for the run (the server drops it
when the connection goes). SQLite: an fcntl lock on a file beside the database (the kernel
drops it when the process goes). Either way a crashed run never blocks the next forever.

The key is what the destination is, not how it was spelled: two spellings of one folder (a
link, a bind mount, a trailing path through either) are two catalog locations but one
folder, and must be one lock (see Backend.identity).

Nested destinations are one destination too: a sync into D writes D/sub's files, removes
its leftover temporaries and deletes its extras, so a sync into D/sub at the same time
would lose its temporary files (taken for an interrupted run's) and race the other's
copies. A lock is therefore hierarchical: a run takes its destination's key exclusively
and the key of every folder containing it in shared mode (outermost first, one order for
everyone, so two runs never wait on each other in a cycle). Syncs into D and D/sub, or D/sub
and D, exclude each other (exclusive D against shared D); syncs into D/a and D/b, sharing
D, run side by side.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from typing import Iterator

from ..errors import LockBusy

_LOCK_NAMESPACE = 0x0CA5  # keeps castlib's advisory keys apart from other applications'


def lock_key(url) -> str:
    """The identity a location's lock is keyed on: its back-end's Backend.identity (for a
    local folder, its file system and path inside it), else its canonical URL."""
    from ..backends import backend_class
    from ..errors import CastlibError
    from ..location import parse_location

    if isinstance(url, str):
        url = parse_location(url)
    try:
        cls = backend_class(url.scheme)
    except CastlibError:   # not installed here: this run will not reach it anyway
        return str(url)
    return cls.identity(url)


def lock_keys_above(url) -> list[str]:
    """The identities of the folders containing the location (Backend.identities_above),
    outermost first: the keys its lock holds in shared mode."""
    from ..backends import backend_class
    from ..errors import CastlibError
    from ..location import parse_location

    if isinstance(url, str):
        url = parse_location(url)
    try:
        cls = backend_class(url.scheme)
    except CastlibError:   # not installed here: this run will not reach it anyway
        return []
    return cls.identities_above(url)


def lock_covered(url, held: set[str]) -> bool:
    """Whether a run holding the locks `held` (keys taken exclusively) already excludes
    every other sync from `url`: its own key, or that of a folder containing it."""
    return lock_key(url) in held or any(k in held for k in lock_keys_above(url))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@contextmanager
def location_lock(catalog, location_id: int, url: str, timeout_s: float = 0) -> Iterator[None]:
    """Hold the lock on the location at `url`: its key exclusively, the keys of the
    folders containing it shared (see the module's docstring); wait up to timeout_s, then
    raise LockBusy. The lock is keyed on lock_key(url), not on location_id: that is the
    catalog row of one spelling of the location, and another spelling has another row."""
    above = list(dict.fromkeys(lock_keys_above(url)))
    own = lock_key(url)
    wanted = [(_digest(k), True) for k in above if k != own] + [(_digest(own), False)]
    if catalog.dialect == "postgresql":
        with _advisory_lock(catalog, wanted, url, timeout_s):
            yield
    elif catalog.dialect == "sqlite":
        with _file_lock(catalog, wanted, url, timeout_s):
            yield
    else:  # pragma: no cover - only the two supported databases reach here
        yield


def _busy(url: str, shared: bool) -> LockBusy:
    if shared:   # someone holds a containing folder exclusively
        return LockBusy(f"another run is syncing into a folder containing {url}; try again "
                        "later")
    return LockBusy(f"another run is syncing into {url} (or into a folder inside it); try "
                    "again later")


@contextmanager
def _advisory_lock(catalog, wanted, url, timeout_s):
    # two int4 keys: 16 bits of castlib's namespace and 48 bits of the identity's hash (a
    # collision could only make syncs into two destinations wait for each other, never
    # let two syncs into one destination). All on one connection, held for the run.
    from sqlalchemy import text

    conn = catalog.engine.connect()
    taken: list[tuple[dict, bool]] = []
    try:
        deadline = time.monotonic() + timeout_s
        for digest, shared in wanted:
            high = int.from_bytes(_LOCK_NAMESPACE.to_bytes(2, "big") + digest[:2], "big",
                                  signed=True)
            keys = {"ns": high, "id": int.from_bytes(digest[2:6], "big", signed=True)}
            mode = "_shared" if shared else ""
            while not conn.execute(text(f"SELECT pg_try_advisory_lock{mode}(:ns, :id)"),
                                   keys).scalar():
                conn.rollback()
                if time.monotonic() >= deadline:
                    raise _busy(url, shared)
                time.sleep(0.5)
            conn.commit()
            taken.append((keys, shared))
        yield
    finally:
        try:
            for keys, shared in reversed(taken):
                mode = "_shared" if shared else ""
                conn.execute(text(f"SELECT pg_advisory_unlock{mode}(:ns, :id)"), keys)
            conn.commit()
        finally:
            conn.close()   # the server drops whatever the session still held


@contextmanager
def _file_lock(catalog, wanted, url, timeout_s):
    import fcntl

    database = catalog.sqlite_file
    if not database:   # in memory: one process, nobody to wait for
        yield
        return
    fds: list[int] = []
    try:
        deadline = time.monotonic() + timeout_s
        for digest, shared in wanted:
            path = f"{database}.lock-{digest[:8].hex()}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise _busy(url, shared) from None
                    time.sleep(0.2)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)   # closing the last descriptor of a file releases its flock
