"""Index locks: one writer of a location's entries at a time, the others wait their turn.

An index reads a location's entries as its baseline, lists the location, then writes
what changed: new paths inserted, others updated, the unlisted marked vanished. A second
writer in between (a cron job indexing the same reference, a sync recording the files it
copied into a destination being indexed) inserted the same new paths, and one of the two
died of a UNIQUE violation. So an index holds its location's index lock for its whole
run, and a sync holds it while it records a batch: writers of one location's entries
serialise. Unlike a second sync into a destination (refused, see locks.py), a writer
waits here: the other index finishes, and listing again after it costs little.

The lock is never held while another index lock is taken, nor inside a transaction, so
no two writers can wait on each other. Like the destination locks it dies with its
process: a PostgreSQL session advisory lock (other keys than locks.py's), or an flock on
a file beside an SQLite catalog.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

from .database import driver_errors

_INDEX_NAMESPACE = 0x0CA6   # locks.py uses 0x0CA5 for destinations


@contextmanager
def index_lock(catalog, location_id: int,
               on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the index lock of a location, waiting as long as another writer holds it;
    on_wait() is called once if this has to wait."""
    if catalog.dialect == "postgresql":
        with _advisory(catalog, location_id, on_wait):
            yield
    elif catalog.dialect == "sqlite":
        with _flock(catalog, location_id, on_wait):
            yield
    else:  # pragma: no cover - only the two supported databases reach here
        yield


@contextmanager
def _advisory(catalog, location_id: int, on_wait) -> Iterator[None]:
    from sqlalchemy import text

    key = {"ns": _INDEX_NAMESPACE, "id": location_id}
    conn = catalog.engine.connect()
    try:
        if not conn.execute(text("SELECT pg_try_advisory_lock(:ns, :id)"), key).scalar():
            if on_wait:
                on_wait()
            conn.execute(text("SELECT pg_advisory_lock(:ns, :id)"), key)
        conn.commit()   # a session lock: it outlives this transaction, held by the session
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:ns, :id)"), key)
            conn.commit()
    finally:
        conn.close()


@contextmanager
def _flock(catalog, location_id: int, on_wait) -> Iterator[None]:
    import fcntl

    database = catalog.sqlite_file
    if not database:   # in memory: one process, nobody to wait for
        yield
        return
    with driver_errors(database):   # a read-only or full catalog folder: one line
        fd = os.open(f"{database}.index-lock-{location_id}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)   # per open file: other threads wait too
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
