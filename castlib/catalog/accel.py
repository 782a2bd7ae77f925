"""The optional C accelerator of the index (castlib/_accel.c): whether it can be used.

`pip install` builds it when a compiler and the SQLite headers are there (setup.py); the
pure-Python path of stages/index.py is the reference, and what runs whenever this module
says no: no build, a build of another source version (a stale in-place .so), a build
linked to another SQLite than Python's own (two copies of SQLite in one process break its
POSIX locks), a file system encoding other than UTF-8 (the C code escapes names as
os.fsdecode does with UTF-8), or CASTLIB_NO_ACCEL=1 in the environment (tests run both
paths with it). Which runs for a given index is stages/index.py's decision: local folder,
lean SQLite catalog, no filters, checksums or hard links. docs/architecture.md says why C.
"""
from __future__ import annotations

import os
import sqlite3
import sys

VERSION = 3   # _accel.c's ACCEL_VERSION: bumped with every change of what it writes


def accelerator():
    """The _accel module when it can be used, else None."""
    return None if why_not() else _module


_module = None


def why_not(honour_env: bool = True) -> str | None:
    """Why the accelerator cannot be used (None: it can); honour_env=False: whatever
    CASTLIB_NO_ACCEL says (whether it is built and usable at all)."""
    global _module
    if honour_env and os.environ.get("CASTLIB_NO_ACCEL", "") not in ("", "0"):
        return "CASTLIB_NO_ACCEL is set"
    try:
        from .. import _accel
    except ImportError as exc:
        return f"castlib._accel is not built ({exc})"
    if getattr(_accel, "VERSION", None) != VERSION:
        return (f"castlib._accel is version {getattr(_accel, 'VERSION', None)}, castlib "
                f"needs {VERSION} (a stale build: pip install again)")
    if _accel.SQLITE_VERSION != sqlite3.sqlite_version:
        return (f"castlib._accel links SQLite {_accel.SQLITE_VERSION}, Python's sqlite3 "
                f"{sqlite3.sqlite_version}: two copies of SQLite in one process break its locks")
    if sys.getfilesystemencoding() != "utf-8" or sys.getfilesystemencodeerrors() != "surrogateescape":
        return f"the file system encoding is {sys.getfilesystemencoding()}, not UTF-8"
    if honour_env:
        _module = _accel
    return None


class AcceleratedIndex:
    """One index of a local folder by the accelerator, for stages/index.py: run() lists and
    writes (returning what the stage decides on: counts, errors, specials, temporaries,
    the live entries not seen, as [(path, id, kind)]), commit() writes the last batch once
    the vanish guard passed, finish() marks the vanished as LiteIndexWriter.finish does.
    close() always: an uncommitted batch is rolled back."""

    def __init__(self, module, path: str, writer, location_id: int, root: str, now,
                 is_temp, progress):
        from .database import driver_errors
        from .lite import stamp
        from .records import BATCH, WRITES_KEY

        self._errors = lambda: driver_errors(path)
        self._writer = writer
        self._first_new_id = None
        with self._errors():
            self._indexer = module.Indexer(path, root, location_id, stamp(now), BATCH,
                                           is_temp, progress, f"{WRITES_KEY}{location_id}")

    def run(self) -> dict:
        with self._errors():
            listing = self._indexer.run()
        self._first_new_id = listing.pop("first_new_id")
        return listing

    def commit(self) -> None:
        with self._errors():
            self._indexer.commit()

    def close(self) -> None:
        self._indexer.close()

    def finish(self, vanished: list[int]) -> None:
        # rows the C code inserted without their parent (none expected: it lists a folder
        # before its content) are linked as the writer links its own
        self._writer.inserted_after(self._first_new_id)
        self._writer.finish(vanished)
