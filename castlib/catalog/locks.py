"""Destination locks: one sync at a time into a location, released when its process dies.

PostgreSQL: a session advisory lock on a connection held for the run (the server drops it
when the connection goes). SQLite: an fcntl lock on a file beside the database (the kernel
drops it when the process goes). Either way a crashed run never blocks the next forever.

The key is what the destination is, not how it was spelled: two spellings of one folder (a
link, a bind mount, a trailing path through either) are two catalog locations but one
folder, and must be one lock (see Backend.identity).
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import text

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


@contextmanager
def location_lock(catalog, location_id: int, url: str, timeout_s: float = 0) -> Iterator[None]:
    """Hold the lock on the location at `url`; wait up to timeout_s, then raise LockBusy.
    The lock is keyed on lock_key(url), not on location_id: that is the catalog row of
    one spelling of the location, and another spelling has another row."""
    digest = hashlib.sha256(lock_key(url).encode("utf-8", "surrogateescape")).digest()
    if catalog.dialect == "postgresql":
        with _advisory_lock(catalog, digest, url, timeout_s):
            yield
    elif catalog.dialect == "sqlite":
        with _file_lock(catalog, digest, url, timeout_s):
            yield
    else:  # pragma: no cover - only the two supported databases reach here
        yield


@contextmanager
def _advisory_lock(catalog, digest, url, timeout_s):
    # two int4 keys: 16 bits of castlib's namespace and 48 bits of the identity's hash (a
    # collision could only make syncs into two destinations wait for each other, never
    # let two syncs into one destination)
    high = int.from_bytes(_LOCK_NAMESPACE.to_bytes(2, "big") + digest[:2], "big", signed=True)
    low = int.from_bytes(digest[2:6], "big", signed=True)
    keys = {"ns": high, "id": low}
    conn = catalog.engine.connect()
    try:
        deadline = time.monotonic() + timeout_s
        while not conn.execute(text("SELECT pg_try_advisory_lock(:ns, :id)"), keys).scalar():
            conn.rollback()
            if time.monotonic() >= deadline:
                raise LockBusy(f"another run is syncing into {url}; try again later")
            time.sleep(0.5)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:ns, :id)"), keys)
            conn.commit()
    finally:
        conn.close()


@contextmanager
def _file_lock(catalog, digest, url, timeout_s):
    import fcntl

    database = catalog.engine.url.database
    if not database or database == ":memory:":
        yield
        return
    path = f"{database}.lock-{digest[:8].hex()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(f"another run is syncing into {url}; try again later") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
