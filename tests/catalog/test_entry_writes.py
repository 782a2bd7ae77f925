"""Writes of entries: bulk updates whose rows carry different columns."""
from datetime import datetime, timezone

import pytest

from castlib.catalog import Catalog

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
# as the index writes them: a mode-only change leaves the checksums out (they stay), a
# content change clears them
MODE_ONLY = {"kind": "f", "size": 4, "mtime_ns": 1, "mode": 0o600}
CONTENT = {"kind": "f", "size": 4, "mtime_ns": 2, "mode": 0o644,
           "adler32": None, "md5": None, "sha256": None}


@pytest.mark.parametrize("first", ["mode_only", "content"])
def test_an_update_batch_applies_each_row_with_its_own_columns(db_url, first):
    """An executemany binds every row to the columns of one statement: built from the
    first row's keys, a checksum column was dropped for later rows (left stale) or
    demanded of rows that did not set it (the whole batch failed)."""
    catalog = Catalog(db_url)
    try:
        loc = catalog.location("/t")
        rows = [{"location_id": loc.id, "path": p, "name": p, "kind": "f", "size": 4,
                 "mtime_ns": 1, "mode": 0o644, "adler32": "0000000" + p[-1],
                 "first_seen": NOW, "last_seen": NOW, "deleted": False} for p in ("a1", "b2")]
        with catalog.engine.begin() as conn:
            catalog.insert_entries(conn, rows)
        ids = {e.path: e for e in _rows(catalog, loc.id)}
        a, b = ids["a1"].id, ids["b2"].id
        updates = [{"b_id": a, **MODE_ONLY}, {"b_id": b, **CONTENT}]
        if first == "content":
            updates.reverse()
        with catalog.engine.begin() as conn:
            catalog.update_entries(conn, updates)
        after = {e.path: e for e in _rows(catalog, loc.id)}
        assert (after["a1"].mode, after["a1"].adler32) == (0o600, "00000001")
        assert (after["b2"].mode, after["b2"].mtime_ns, after["b2"].adler32) == (0o644, 2, None)
    finally:
        catalog.close()


def _rows(catalog, loc_id):
    from sqlalchemy import select

    from castlib.catalog.schema import Entry

    with catalog.engine.connect() as conn:
        return conn.execute(select(Entry.id, Entry.path, Entry.mode, Entry.mtime_ns,
                                   Entry.adler32).where(Entry.location_id == loc_id)).all()
