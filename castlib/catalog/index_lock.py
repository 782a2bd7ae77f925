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
a file beside an SQLite catalog (catalog/process_locks.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from .process_locks import LockKey, hold

_INDEX_NAMESPACE = 0x0CA6   # locks.py uses 0x0CA5 for destinations


@contextmanager
def index_lock(catalog, location_id: int,
               on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the index lock of a location, waiting as long as another writer holds it;
    on_wait() is called once if this has to wait."""
    key = LockKey(pg=(_INDEX_NAMESPACE, location_id), file=f"index-lock-{location_id}")
    with hold(catalog, [key], timeout_s=None, on_wait=on_wait):
        yield
