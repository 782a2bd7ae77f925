"""On PostgreSQL an index writes its new rows by COPY: the same rows, every column (ids and
parent_id included), as the INSERT path writes, on random trees with odd names and on
writers fed in any order (a folder listed after its content, batches of any size)."""
import os
import random
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import castlib
from castlib.catalog import Catalog
from castlib.catalog.catalog import IndexWriter
from tests.catalog.test_lite import CHANGE, _apply
from tests.servers.postgres import fresh_database

# names a shell, a URL or a CSV would trip on; COPY's text format escapes \t \n \\ itself
ODD = ["a", "tab\there", "new\nline", "back\\slash", "quote'\"", "caf\u00e9", "%41", "-",
       "sp ace", "\u65e5\u672c", "comma,semi;", "\\N", "emoji\U0001f600"]


def _dump(url: str) -> list[tuple]:
    """Every entry, every column; timestamps by their rank among the database's moments
    (two databases indexed at other moments compare equal when written alike)."""
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        rows = conn.execute("SELECT * FROM entries ORDER BY id").fetchall()
        cols = [c.name for c in conn.execute("SELECT * FROM entries LIMIT 0").description]
    stamps = sorted({r[i] for r in rows for i, c in enumerate(cols) if c.endswith("_seen")})
    rank = {t: n for n, t in enumerate(stamps)}
    return [tuple((c, rank[v] if c.endswith("_seen") else v) for c, v in zip(cols, r))
            for r in rows]


@pytest.fixture
def two_databases(postgres_url):
    """A catalog whose index writes by COPY, and one whose index writes by INSERT."""
    urls = fresh_database(postgres_url), fresh_database(postgres_url)
    catalogs = Catalog(urls[0]), Catalog(urls[1])
    yield urls, catalogs
    for c in catalogs:
        c.close()


def _index(catalog, root, copy: bool, monkeypatch) -> None:
    monkeypatch.setattr(IndexWriter, "copy", copy)
    castlib.index(str(root), db=catalog, force=True)


def test_copy_is_what_an_index_of_postgresql_uses(two_databases, tmp_path, monkeypatch):
    """The COPY path is taken (not the INSERT one) and writes what the INSERT writes."""
    (urls, (by_copy, by_insert)) = two_databases
    root = tmp_path / "tree"
    for i, name in enumerate(ODD):
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / f"f{i}").write_bytes(b"x" * i)
        (root / f"{name}.dat").write_bytes(b"y")
    os.symlink(ODD[1], root / "ln")
    used = []
    real = IndexWriter._copy_rows
    monkeypatch.setattr(IndexWriter, "_copy_rows",
                        lambda self, conn, rows: (used.append(len(rows)), real(self, conn, rows)))
    _index(by_copy, root, True, monkeypatch)
    assert sum(used) == 4 * len(ODD) + 1
    _index(by_insert, root, False, monkeypatch)
    assert sum(used) == 4 * len(ODD) + 1
    assert _dump(urls[0]) == _dump(urls[1])


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.lists(CHANGE, max_size=8), min_size=1, max_size=3))
def test_random_trees_and_changes_index_alike_by_copy_and_by_insert(postgres_url,
                                                                   tmp_path_factory, steps):
    tmp = tmp_path_factory.mktemp("copy")
    root = tmp / "tree"
    root.mkdir()
    urls = fresh_database(postgres_url), fresh_database(postgres_url)
    by_copy, by_insert = Catalog(urls[0]), Catalog(urls[1])
    try:
        with pytest.MonkeyPatch.context() as mp:
            for changes in steps:
                for c in changes:
                    _apply(root, c)
                _index(by_copy, root, True, mp)
                _index(by_insert, root, False, mp)
                assert _dump(urls[0]) == _dump(urls[1])
    finally:
        by_copy.close()
        by_insert.close()


_PATHS = st.lists(st.sampled_from(ODD[:6]), min_size=1, max_size=3).map("/".join)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(_PATHS, min_size=1, max_size=25, unique=True), seed=st.integers(0, 99),
       batch=st.integers(1, 7), runs=st.integers(1, 2))
def test_a_writer_fed_in_any_order_writes_alike_by_copy_and_by_insert(postgres_url, paths,
                                                                      seed, batch, runs):
    """The writer itself, fed folders after their content, in batches of any size, over
    two runs (parents of the second found in the catalog): ids and parent_id alike."""
    urls = fresh_database(postgres_url), fresh_database(postgres_url)
    catalogs = Catalog(urls[0]), Catalog(urls[1])
    try:
        _feed(urls, catalogs, paths, seed, batch, runs)
    finally:
        for c in catalogs:
            c.close()


def _feed(urls, catalogs, paths, seed, batch, runs):
    rnd = random.Random(seed)
    entries = set(paths)
    for p in paths:   # every folder on the way, as a listing has them
        parts = p.split("/")
        entries.update("/".join(parts[:i]) for i in range(1, len(parts)))
    files = {p for p in paths if not any(q.startswith(p + "/") for q in entries)}
    order = sorted(entries)
    rnd.shuffle(order)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for run in range(runs):
        part = order[run::runs]
        writers = []
        for copy, catalog in zip((True, False), catalogs):
            IndexWriter.copy = copy
            try:
                loc = catalog.location("/fed")
                writers.append(catalog.index_writer(loc.id, now + timedelta(seconds=run)))
            finally:
                IndexWriter.copy = True
        for i, path in enumerate(part):
            f = path in files
            st = SimpleNamespace(kind="f" if f else "d", size=len(path) if f else None,
                                 mtime_ns=i * 10**9 + 7, mode=0o644 if f else 0o755,
                                 link_target=None, online=None if i % 3 else bool(i % 2))
            for writer in writers:
                writer.add(path, st, *(("adler32", "0000abcd") if i % 4 == 0 and f else ()))
            if (i + 1) % batch == 0 or i == len(part) - 1:
                for writer in writers:
                    writer.write([], {})
                # batch by batch, not only once finish() linked what was left unlinked:
                # COPY gives each row the parent the INSERT's subquery finds
                assert _dump(urls[0]) == _dump(urls[1])
        for writer in writers:
            writer.finish([])
        assert _dump(urls[0]) == _dump(urls[1])
