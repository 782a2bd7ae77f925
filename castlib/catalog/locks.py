"""Destination locks: one sync at a time into a location, released when its process dies.

PostgreSQL: a session advisory lock on a connection held for the run (the server drops it
when the connection goes). SQLite: an fcntl lock on a file beside the database (the kernel
drops it when the process goes). Either way a crashed run never blocks the next forever (catalog/process_locks.py).

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

from contextlib import contextmanager
from typing import Iterator

from ..errors import LockBusy
from .process_locks import LockKey, hold

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
    import hashlib   # not at import: a command that takes no such lock needs no OpenSSL

    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@contextmanager
def location_lock(catalog, location_id: int, url: str, timeout_s: float = 0) -> Iterator[None]:
    """Hold the lock on the location at `url`: its key exclusively, the keys of the
    folders containing it shared (see the module's docstring); wait up to timeout_s, then
    raise LockBusy. The lock is keyed on lock_key(url), not on location_id: that is the
    catalog row of one spelling of the location, and another spelling has another row."""
    above = list(dict.fromkeys(lock_keys_above(url)))
    own = lock_key(url)
    wanted = [_lock_key(k, shared=True) for k in above if k != own] + [_lock_key(own, False)]
    with hold(catalog, wanted, timeout_s=timeout_s, busy=lambda key: _busy(url, key.shared)):
        yield


def _lock_key(identity: str, shared: bool) -> LockKey:
    # PostgreSQL: two int4 keys, 16 bits of castlib's namespace and 48 bits of the
    # identity's hash (a collision could only make syncs into two destinations wait for
    # each other, never let two syncs into one destination). SQLite: a file named by the hash.
    digest = _digest(identity)
    high = int.from_bytes(_LOCK_NAMESPACE.to_bytes(2, "big") + digest[:2], "big", signed=True)
    return LockKey(pg=(high, int.from_bytes(digest[2:6], "big", signed=True)),
                   file=f"lock-{digest[:8].hex()}", shared=shared)


def _busy(url: str, shared: bool) -> LockBusy:
    if shared:   # someone holds a containing folder exclusively
        return LockBusy(f"another run is syncing into a folder containing {url}; try again "
                        "later")
    return LockBusy(f"another run is syncing into {url} (or into a folder inside it); try "
                    "again later")
