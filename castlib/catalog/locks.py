"""Destination locks: one sync at a time into a location, released when its process dies.

PostgreSQL: a session advisory lock on a connection held for the run (the server drops it
when the connection goes). SQLite: an fcntl lock on a file beside the database (the kernel
drops it when the process goes). Either way a crashed run never blocks the next forever.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import text

from ..errors import LockBusy

_LOCK_NAMESPACE = 0x0CA5  # keeps castlib's advisory keys apart from other applications'


@contextmanager
def location_lock(catalog, location_id: int, url: str, timeout_s: float = 0) -> Iterator[None]:
    """Hold the lock on a location; wait up to timeout_s, then raise LockBusy."""
    if catalog.dialect == "postgresql":
        with _advisory_lock(catalog, location_id, url, timeout_s):
            yield
    elif catalog.dialect == "sqlite":
        with _file_lock(catalog, location_id, url, timeout_s):
            yield
    else:  # pragma: no cover - only the two supported databases reach here
        yield


@contextmanager
def _advisory_lock(catalog, location_id, url, timeout_s):
    conn = catalog.engine.connect()
    try:
        deadline = time.monotonic() + timeout_s
        while not conn.execute(text("SELECT pg_try_advisory_lock(:ns, :id)"),
                               {"ns": _LOCK_NAMESPACE, "id": location_id}).scalar():
            conn.rollback()
            if time.monotonic() >= deadline:
                raise LockBusy(f"another run is syncing into {url}; try again later")
            time.sleep(0.5)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:ns, :id)"),
                         {"ns": _LOCK_NAMESPACE, "id": location_id})
            conn.commit()
    finally:
        conn.close()


@contextmanager
def _file_lock(catalog, location_id, url, timeout_s):
    import fcntl

    database = catalog.engine.url.database
    if not database or database == ":memory:":
        yield
        return
    path = f"{database}.lock-{location_id}"
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
