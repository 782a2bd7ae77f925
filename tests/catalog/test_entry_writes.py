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


def test_the_index_writer_lays_out_rows_fills_checksums_and_ends_a_listing(db_url):
    """Catalog.index_writer owns the layout of a new entry's row: a listed checksum goes
    in with the row, a computed one into the row while it waits for its batch or by path
    once written; finish() marks the vanished, links a folder listed after its content
    and records when the location was listed."""
    from datetime import timedelta

    from sqlalchemy import select

    from castlib.backends.base import DIR, FILE, Stat
    from castlib.catalog.schema import Entry

    catalog = Catalog(db_url)
    try:
        loc = catalog.location("/t")
        first = catalog.index_writer(loc.id, NOW)
        first.add("gone.dat", Stat("gone.dat", FILE, 1, 10, 0o644))
        first.write([], {})
        first.finish([])
        gone = next(e.id for e in catalog.load_entries(loc.id).values())

        later = NOW + timedelta(hours=1)
        w = catalog.index_writer(loc.id, later)
        w.add("d/a.dat", Stat("d/a.dat", FILE, 1, 20, 0o600), "adler32", "0000000a")
        w.add("d/b.dat", Stat("d/b.dat", FILE, 2, 20, 0o644))
        w.write([], {"md5": {"d/b.dat": "b" * 32}})
        w.add("d", Stat("d", DIR, None, 30, 0o755))   # after its content
        w.add("ln", Stat("ln", "l", None, 40, None, link_target="d/a.dat"))
        w.write([], {"adler32": {"d/b.dat": "0000000b"}})   # written in the batch before
        w.finish([gone])

        rows = {e["path"]: e for e in catalog.entries(loc.id, include_deleted=True)}
        assert {p: (e["kind"], e["size"], e["mtime_ns"], e["mode"], e["link_target"],
                    e["adler32"], e["md5"], e["deleted"]) for p, e in rows.items()} == {
            "gone.dat": ("f", 1, 10, 0o644, None, None, None, True),
            "d": ("d", None, 30, 0o755, None, None, None, False),
            "d/a.dat": ("f", 1, 20, 0o600, None, "0000000a", None, False),
            "d/b.dat": ("f", 2, 20, 0o644, None, "0000000b", "b" * 32, False),
            "ln": ("l", None, 40, None, "d/a.dat", None, None, False)}
        with catalog.engine.connect() as conn:
            ids = dict(conn.execute(select(Entry.path, Entry.id)
                                    .where(Entry.location_id == loc.id)).all())
            parents = dict(conn.execute(select(Entry.path, Entry.parent_id)
                                        .where(Entry.location_id == loc.id)).all())
        assert parents["d/a.dat"] == parents["d/b.dat"] == ids["d"]
        assert parents["d"] is None and parents["ln"] is None
        assert catalog.find_location("/t").indexed_at.replace(tzinfo=timezone.utc) == later
    finally:
        catalog.close()


def test_ls_finds_the_location_holding_a_path_and_info_counts(db_url, tmp_path):
    """Catalog.location_holding (castlib ls) and Catalog.info (castlib db info)."""
    from castlib.backends.base import FILE, Stat

    catalog = Catalog(db_url)
    try:
        root = tmp_path / "data"
        loc = catalog.location(str(root), name="data")
        w = catalog.index_writer(loc.id, NOW)
        for path in ("a.dat", "sub/b.dat"):
            w.add(path, Stat(path, FILE, 3, 1, 0o644))
        w.write([], {})
        w.finish([])
        holding = {}
        for text in ("data", str(root), str(root / "sub"), str(tmp_path / "else")):
            found = catalog.location_holding(text)
            holding[text] = (found[0].id, found[1]) if found else None
        assert holding == {"data": (loc.id, ""), str(root): (loc.id, ""),
                           str(root / "sub"): (loc.id, "sub"), str(tmp_path / "else"): None}
        info = catalog.info()
        assert (info["entries"], info["deleted"], info["runs"]) == (2, 0, 0)
        assert [(r["files"], r["bytes"]) for r in info["locations"]] == [(2, 6)]
        assert info["revision"] == catalog.revision and info["size"] > 0
    finally:
        catalog.close()
