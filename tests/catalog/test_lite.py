"""The lean SQLite path (catalog.lite) writes and reads what the general SQLAlchemy path
does: one schema, the same rows (every column), the same differences; and a routine
index or no-op sync on SQLite does not import SQLAlchemy or Alembic at all."""
import errno
import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import castlib
from castlib.catalog import DIFFERENCE_KINDS, Catalog
from castlib.catalog import sqlite_ddl
from tests.helpers import cli_env, make_tree

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
# columns whose values are the moment or the process of a run, not what it found
VOLATILE = {"first_seen", "last_seen", "created_at", "indexed_at", "started_at",
            "finished_at", "pid", "heartbeat_at"}


def test_the_lean_schema_is_the_models_schema():
    """sqlite_ddl.DDL is what the models make (regenerate it after a schema change)."""
    assert sqlite_ddl.DDL == sqlite_ddl._from_models()


def test_a_new_lean_catalog_is_the_general_one(tmp_path):
    lean, general = tmp_path / "lean.sqlite", tmp_path / "general.sqlite"
    Catalog(f"sqlite:///{lean}").close()
    Catalog(f"sqlite:///{general}", lean=False).close()
    dump = lambda p: sqlite3.connect(p).execute(  # noqa: E731
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid").fetchall()
    assert dump(lean) == dump(general)
    assert (sqlite3.connect(lean).execute("SELECT * FROM alembic_version").fetchall()
            == sqlite3.connect(general).execute("SELECT * FROM alembic_version").fetchall())
    assert sqlite3.connect(lean).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def _imports(*args, db, env=None):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "castlib", "--db", db,
                           "-q", *args], capture_output=True, text=True, env=cli_env(env))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:")}


def test_index_and_a_noop_sync_on_sqlite_import_neither_sqlalchemy_nor_alembic(tmp_path):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"1", "sub/b.dat": b"22"})
    dst = tmp_path / "dst"
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    castlib.sync(str(ref), str(dst), db=db)   # the copy: anything may be imported
    for args in (("index", str(ref)),   # a new location, then a known one
                 ("index", str(dst)),
                 ("sync", str(ref), str(dst), "--index", "ref")):
        modules = _imports(*args, db=db)
        assert "castlib.catalog.lite" in modules   # the measurement sees castlib's imports
        heavy = sorted(m for m in modules if m.split(".")[0] in ("sqlalchemy", "alembic"))
        assert heavy == [], args
    fresh = _imports("index", str(ref), db=f"sqlite:///{tmp_path / 'new.sqlite'}")
    assert not any(m.split(".")[0] in ("sqlalchemy", "alembic") for m in fresh)


# what a command on local folders and an SQLite catalog, without a configuration file,
# does not import: each costs it milliseconds to tens of them (issue 12, the fixed cost of a
# command): the ORM, the models of pipelines, stages' parameters, back-end options and the
# configuration file (pydantic), YAML, the entry points' metadata (plugins), platformdirs,
# and what only a copy or a new catalog needs (shutil through argparse's terminal width,
# secrets and OpenSSL's hmac for temporary names, sockets)
NOT_IN_A_LEAN_COMMAND = ("sqlalchemy", "alembic", "pydantic", "pydantic_core", "yaml",
                         "platformdirs", "importlib.metadata", "socket", "ssl", "difflib",
                         "shutil", "secrets", "hmac")


def test_index_diff_and_a_noop_sync_of_local_folders_import_only_the_lean_set(tmp_path):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"1", "sub/b.dat": b"22"})
    dst = tmp_path / "dst"
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    # no configuration file; a cache of the option tables of its own (the first command
    # derives them from the stages' models: pydantic then, once)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "CASTLIB_CONFIG": ""}
    _imports("sync", str(ref), str(dst), db=db, env=env)   # the copy: anything may be imported
    for args in (("index", str(ref)),
                 ("diff", str(ref), str(dst)),
                 ("sync", str(ref), str(dst)),
                 ("sync", str(ref), str(dst), "--index", "ref")):
        modules = _imports(*args, db=db, env=env)
        assert "castlib.catalog.lite" in modules   # the measurement sees castlib's imports
        heavy = sorted(m for m in modules if m in NOT_IN_A_LEAN_COMMAND
                       or m.split(".")[0] in NOT_IN_A_LEAN_COMMAND)
        assert heavy == [], args
    # with a configuration file that is right: YAML to read it, and nothing more
    config = tmp_path / "config.yaml"
    config.write_text("storage:\n  'sftp://user@archive.example': {known_hosts: null}\n"
                      f"locations:\n  daq: {ref}\nhostname: daq01\n")
    modules = _imports("sync", "daq", str(dst), db=db, env={**env, "CASTLIB_CONFIG": str(config)})
    assert "yaml" in modules and "castlib.config" in modules
    lean = tuple(m for m in NOT_IN_A_LEAN_COMMAND if m != "yaml")
    assert sorted(m for m in modules if m in lean or m.split(".")[0] in lean) == []


def _dump(db_file):
    """Every row of every table, with the volatile columns checked for form and left out."""
    conn = sqlite3.connect(db_file)
    out = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                 "ORDER BY name"):
        if table == "settings":
            # random values (the temporary-name key, each location's write token): the
            # same names either way
            out[table] = sorted(n for (n,) in conn.execute("SELECT name FROM settings"))
            continue
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY 1")
        cols = [c[0] for c in cur.description]
        rows = []
        for row in cur:
            kept = []
            for col, value in zip(cols, row):
                if table == "runs" and col == "progress":
                    # the live counters' last snapshot: its rate and ETA are the moment's
                    kept.append((col, sorted(json.loads(value)) if value else value))
                elif col in VOLATILE:
                    assert value is None or col == "pid" or STAMP.match(value), (table, col)
                    kept.append((col, type(value).__name__))
                else:
                    kept.append((col, value))
            rows.append(kept)
        out[table] = rows
    conn.close()
    return out


def _both(tmp_path):
    lean = Catalog(f"sqlite:///{tmp_path / 'lean.sqlite'}")
    general = Catalog(f"sqlite:///{tmp_path / 'general.sqlite'}", lean=False)
    assert lean._lite is not None and general._lite is None
    return lean, general


def test_index_and_sync_write_the_same_rows_on_both_paths(tmp_path):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"1", "sub/b.dat": b"22", "sub/deep/c": b"3",
                                       "empty/": None, "caf\u00e9/%x": b"4"})
    os.symlink("a.dat", ref / "ln")
    lean, general = _both(tmp_path)
    for step in range(3):
        for cat in (lean, general):
            castlib.index(str(ref), db=cat, checksum="adler32" if step == 1 else None)
            # one transfer: the order copies finish in (their ids) is the threads' else
            castlib.sync(str(ref), str(tmp_path / f"dst-{id(cat)}"), db=cat, delete=True,
                         index="ref", transfers=1)
        assert _dump(tmp_path / "lean.sqlite") != {}
        lean_rows, general_rows = _dump(tmp_path / "lean.sqlite"), _dump(tmp_path / "general.sqlite")
        # the destinations' URLs differ by name only: compare them apart
        for rows in (lean_rows, general_rows):
            for row in rows["locations"]:
                row[2] = ("url", "dst" if "/dst-" in row[2][1] else row[2][1])
                row[3] = ("root_path", "dst" if "/dst-" in row[3][1] else row[3][1])
            for table in ("runs", "stage_results"):
                for row in rows[table]:
                    for i, (col, value) in enumerate(row):
                        if isinstance(value, str):
                            value = re.sub(r"dst-\d+", "dst", value)
                            # a sync's summary says how fast it went: never twice the same
                            row[i] = (col, re.sub(r" in [\d.]+ s \([^)]*\)", "", value))
        assert lean_rows == general_rows, step
        # changes: a file grows, one goes, a folder comes before its content, a mode moves
        (ref / "a.dat").write_bytes(b"longer")
        (ref / "sub/deep/c").unlink(missing_ok=True)
        make_tree(ref, {f"new{step}/x": b"x", f"sub/n{step}": b"n"})
        os.chmod(ref / "sub" / "b.dat", 0o600 + step)
    lean.close()
    general.close()


# -- property: random trees and change sequences, both paths, the same catalog -------------
NAMES = st.sampled_from(["a", "b", "c\u00e9", "d d", "e%", "f-1"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
CHANGE = st.one_of(
    st.tuples(st.just("write"), PATHS, st.binary(max_size=3)),
    st.tuples(st.just("remove"), PATHS, st.none()),
    st.tuples(st.just("mkdir"), PATHS, st.none()),
    st.tuples(st.just("chmod"), PATHS, st.sampled_from([0o600, 0o644, 0o755])),
    st.tuples(st.just("link"), PATHS, NAMES),
    st.tuples(st.just("touch"), PATHS, st.integers(1, 10**9)),
)


def _apply(root, change):
    op, rel, arg = change
    path = root / rel
    try:
        if op == "write":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(arg)
        elif op == "remove":
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                import shutil

                shutil.rmtree(path)
        elif op == "mkdir":
            path.mkdir(parents=True, exist_ok=True)
        elif op == "chmod" and path.exists() and not path.is_symlink():
            os.chmod(path, arg if path.is_file() else arg | 0o700)
        elif op == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(arg, path)
        elif op == "touch" and path.exists() and not path.is_symlink():
            os.utime(path, ns=(arg * 1000, arg * 1000))
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        pass   # a change the tree as it is cannot take: skipped, on both sides alike
    except OSError as exc:   # a path through a link to itself ("f-1" -> "f-1"): the same
        if exc.errno != errno.ELOOP:
            raise


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.lists(CHANGE, max_size=6), st.lists(CHANGE, max_size=6)),
                      min_size=1, max_size=3))
def test_random_trees_and_changes_give_the_same_catalog_and_differences(tmp_path_factory,
                                                                       steps):
    tmp = tmp_path_factory.mktemp("prop")
    ref, dst = tmp / "ref", tmp / "dst"
    ref.mkdir()
    dst.mkdir()
    lean, general = _both(tmp)
    try:
        for ref_changes, dst_changes in steps:
            for c in ref_changes:
                _apply(ref, c)
            for c in dst_changes:
                _apply(dst, c)
            for cat in (lean, general):
                castlib.index(str(ref), db=cat, force=True)
                castlib.index(str(dst), db=cat, force=True)
            assert _dump(tmp / "lean.sqlite") == _dump(tmp / "general.sqlite")
            r, d = (lean.find_location(str(ref)).id, lean.find_location(str(dst)).id)
            for kinds in (DIFFERENCE_KINDS, ("extra",), ("size", "mode")):
                for tol in (0, None):
                    assert (list(lean.diff(r, d, kinds=kinds, mtime_tolerance_ns=tol))
                            == list(general.diff(r, d, kinds=kinds, mtime_tolerance_ns=tol)))
            assert (list(lean.diff(r, d, prefix="a")) == list(general.diff(r, d, prefix="a")))
            assert (list(lean.mtime_drift(r, d, kinds=("d", "l")))
                    == list(general.mtime_drift(r, d, kinds=("d", "l"))))
            for drift in ((), ("d",), ("d", "l")):   # the diff stage's one pass
                assert (lean.compare(r, d, drift_kinds=drift, drift_tolerance_ns=0)
                        == general.compare(r, d, drift_kinds=drift, drift_tolerance_ns=0))
    finally:
        lean.close()
        general.close()


@pytest.mark.parametrize("first", ["mode_only", "content"])
def test_the_lean_writer_applies_each_update_with_its_own_columns(tmp_path, first):
    """The grouping fix of Catalog.update_entries holds on the lean path: a mode-only
    change keeps the checksum, a content change clears it, whichever row comes first."""
    from datetime import datetime, timezone

    from castlib.backends.base import FILE, Stat

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    try:
        loc = catalog.location("/t")
        w = catalog.index_writer(loc.id, now)
        w.add("a1", Stat("a1", FILE, 4, 1, 0o644), "adler32", "00000001")
        w.add("b2", Stat("b2", FILE, 4, 1, 0o644), "adler32", "00000002")
        w.write([], {})
        w.finish([])
        ids = catalog.load_entries(loc.id)
        updates = [{"b_id": ids["a1"].id, "kind": "f", "size": 4, "mtime_ns": 1, "mode": 0o600},
                   {"b_id": ids["b2"].id, "kind": "f", "size": 4, "mtime_ns": 2, "mode": 0o644,
                    "adler32": None, "md5": None, "sha256": None, "last_seen": now}]
        if first == "content":
            updates.reverse()
        w = catalog.index_writer(loc.id, now)
        w.write(updates, {})
        w.finish([])
        after = catalog.load_entries(loc.id)
        assert (after["a1"].mode, after["a1"].adler32) == (0o600, "00000001")
        assert (after["b2"].mtime_ns, after["b2"].adler32) == (2, None)
    finally:
        catalog.close()


def test_rows_written_have_their_parent_before_the_listing_ends(tmp_path):
    """A batch is linked to its parents as it goes in (folders of earlier runs too), not
    only at finish(): an index killed between the two leaves no entry without its parent
    (a later index links only the rows it inserted itself)."""
    from datetime import datetime, timezone

    from castlib.backends.base import DIR, FILE, Stat

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    db = tmp_path / "c.sqlite"
    catalog = Catalog(f"sqlite:///{db}")
    try:
        loc = catalog.location("/t")
        w = catalog.index_writer(loc.id, now)
        w.add("d", Stat("d", DIR, 0, 1, 0o755))
        w.write([], {})
        w.finish([])
        w = catalog.index_writer(loc.id, now)   # the next index: d is an earlier run's
        w.add("d/new", Stat("d/new", FILE, 1, 1, 0o644))
        w.add("d/sub", Stat("d/sub", DIR, 0, 1, 0o755))
        w.add("d/sub/x", Stat("d/sub/x", FILE, 1, 1, 0o644))
        w.write([], {})   # and no finish(): killed here
        rows = dict(sqlite3.connect(db).execute(
            "SELECT e.path, p.path FROM entries e LEFT JOIN entries p ON p.id = e.parent_id"))
        assert rows == {"d": None, "d/new": "d", "d/sub": "d", "d/sub/x": "d/sub"}
    finally:
        catalog.close()


def test_a_sync_that_copies_replaces_and_deletes_imports_no_sqlalchemy(tmp_path):
    """What a copy records (new and replaced entries, checksums, deletions, a mode set in
    place) goes through the lean path too: SQLAlchemy's import was ~0.4 s of every sync
    that copied something (the SFTP and XRootD uploads, copy-1k)."""
    ref = make_tree(tmp_path / "ref", {"a.dat": b"1", "sub/b.dat": b"22", "gone": b"3"})
    dst = tmp_path / "dst"
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    _imports("index", str(ref), db=db)   # the catalog exists: a new one may take any path
    steps = [lambda: None,
             lambda: (ref / "a.dat").write_bytes(b"longer"),
             lambda: ((ref / "gone").unlink(), os.chmod(ref / "sub" / "b.dat", 0o600))]
    for step in steps:
        step()
        modules = _imports("sync", str(ref), str(dst), "--delete", db=db)
        assert "castlib.catalog.lite" in modules
        assert not any(m.split(".")[0] in ("sqlalchemy", "alembic") for m in modules)
    assert sorted(p.name for p in dst.rglob("*")) == ["a.dat", "b.dat", "sub"]
    assert (dst / "a.dat").read_bytes() == b"longer"
    assert (dst / "sub" / "b.dat").stat().st_mode & 0o777 == 0o600
