"""A catalog that cannot be written (full disk, read-only file or mount) or that was truncated:
one line that says so, exit 2, and nothing replaced or lost."""
from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from castlib.catalog import Catalog
from tests.helpers import in_unprivileged_child, make_tree, run_cli

NOT_PERMITTED = ("permission denied", "must be superuser", "not permitted", "only root")


@contextmanager
def tmpfs(path: Path, size: str, **options):
    """A small tmpfs mounted at path for the test; skipped only where mounting is not
    permitted (an unprivileged container), never for another failure."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}"] + [f"{k}={v}" for k, v in options.items()])
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                           capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine: cannot make a small file system")
    if r.returncode != 0:
        if any(s in r.stderr.lower() for s in NOT_PERMITTED) or os.geteuid() != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
        raise AssertionError(f"mount failed: {r.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True,
                   capture_output=True)


def one_error_line(stderr: str, *wanted: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert "internal error" not in lines[0] and "Traceback" not in stderr
    for w in wanted:
        assert w in lines[0], lines[0]
    return lines[0]


def _many_files(root: Path, n: int) -> Path:
    name = "a-rather-long-file-name-so-that-each-entry-takes-room-in-the-catalog"
    return make_tree(root, {f"d{i % 10}/{name}-{i:06d}.dat": b"x" for i in range(n)})


def _entry_count(db_url: str, location) -> int:
    catalog = Catalog(db_url)
    try:
        return catalog.live_count(catalog.find_location(str(location)).id)
    finally:
        catalog.close()


# -- a truncated catalog ----------------------------------------------------------------------

def test_an_empty_catalog_file_is_refused_not_replaced(tmp_path):
    """A catalog truncated to 0 bytes was taken for a new one and silently replaced by an
    empty catalog: every location's history gone, the next sync re-copying everything."""
    tree = make_tree(tmp_path / "t", {"a.dat": b"a"})
    db = tmp_path / "catalog.sqlite"
    run_cli("index", str(tree), db=f"sqlite:///{db}", check=0)
    os.truncate(db, 0)
    for command in (("index", str(tree)), ("locations",), ("db", "info")):
        r = run_cli(*command, db=f"sqlite:///{db}", check=2)
        one_error_line(r.stderr, str(db), "empty file (0 bytes)")
        assert db.stat().st_size == 0, "the truncated catalog was replaced"


def test_a_missing_catalog_is_created_whole(tmp_path):
    """A new catalog is made under a temporary name and renamed into place: no process
    can find it half-made (or empty, which is now refused)."""
    tree = make_tree(tmp_path / "t", {"a.dat": b"a"})
    db = tmp_path / "new.sqlite"
    run_cli("index", str(tree), db=f"sqlite:///{db}", check=0)
    assert db.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if ".new-" in p.name]
    assert _entry_count(f"sqlite:///{db}", tree) == 1


# -- a full disk ------------------------------------------------------------------------------

def test_a_full_disk_under_an_sqlite_catalog(tmp_path):
    tree = _many_files(tmp_path / "t", 3000)
    with tmpfs(tmp_path / "small", "300k") as small:
        db = f"sqlite:///{small / 'catalog.sqlite'}"
        r = run_cli("index", str(tree), db=db, check=2)
        one_error_line(r.stderr, "catalog: disk full", str(small / "catalog.sqlite"))
        remount(small, "size=20m")   # room again: the catalog is intact and goes on
        run_cli("index", str(tree), db=db, check=0)
        assert _entry_count(db, tree) == 3000


def test_a_full_disk_under_a_postgresql_catalog(tmp_path, postgres_url):
    """The database's tablespace on a small file system: the server says 'could not
    extend file' (SQLSTATE 53100)."""
    import psycopg

    from tests.servers.postgres import admin_execute
    from tests.servers.common import unprivileged_user

    import tempfile

    user = unprivileged_user()
    tree = _many_files(tmp_path / "t", 6000)
    name = f"full{os.getpid()}"
    outer = Path(tempfile.mkdtemp(prefix="castlib-pgfull-"))   # the server's user reaches it
    os.chmod(outer, 0o755)
    with tmpfs(outer / "space", "64m", uid=user.pw_uid, gid=user.pw_gid, mode="0700") as space:
        os.mkdir(space / "pg")
        os.chown(space / "pg", user.pw_uid, user.pw_gid)
        admin_execute(postgres_url, f"CREATE TABLESPACE {name} LOCATION '{space / 'pg'}'",
                      f'CREATE DATABASE "{name}" TEMPLATE template0 TABLESPACE {name}')
        try:
            db = f"{postgres_url}/{name}"
            Catalog(db).close()   # the schema first, then only a little room left
            used = shutil.disk_usage(space).used
            remount(space, f"size={used + 1_500_000}")
            r = run_cli("index", str(tree), db=db, check=2)
            one_error_line(r.stderr, "catalog: disk full")
            assert postgres_url.split("@")[-1] in r.stderr   # which catalog
            remount(space, "size=64m")
            run_cli("index", str(tree), db=db, check=0)
            assert _entry_count(db, tree) == 6000
        finally:
            with psycopg.connect(f"{postgres_url}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f"DROP TABLESPACE IF EXISTS {name}")
    shutil.rmtree(outer, ignore_errors=True)


# -- a read-only catalog ----------------------------------------------------------------------

def test_an_sqlite_catalog_on_a_read_only_mount(tmp_path):
    tree = make_tree(tmp_path / "t", {"a.dat": b"a"})
    with tmpfs(tmp_path / "mnt", "5m") as mnt:
        db = f"sqlite:///{mnt / 'catalog.sqlite'}"
        run_cli("index", str(tree), db=db, check=0)
        remount(mnt, "ro")
        for command in (("index", str(tree)), ("sync", str(tree), str(tmp_path / "dst"))):
            r = run_cli(*command, db=db, check=2)
            one_error_line(r.stderr, "catalog is read-only", str(mnt / "catalog.sqlite"))
        r = run_cli("index", str(tree), db=f"sqlite:///{mnt / 'other.sqlite'}", check=2)
        one_error_line(r.stderr, "catalog is read-only")
        remount(mnt, "rw")
        run_cli("index", str(tree), db=db, check=0)


def test_a_read_only_sqlite_catalog_file(tmp_path):
    """Root writes any file: a plain user meets the read-only file."""
    import io
    import sqlite3  # noqa: F401 - the unprivileged child cannot import it from root's files
    import sys
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="castlib-ro-"))
    try:
        tree = make_tree(base / "t", {"a.dat": b"a"})
        db = base / "catalog.sqlite"
        run_cli("index", str(tree), db=f"sqlite:///{db}", check=0)
        for p in [base, *base.rglob("*")]:
            os.chmod(p, 0o777 if p.is_dir() else 0o666)
        os.chmod(db, 0o444)

        def index_as_plain_user():
            from castlib.cli import main

            err, sys.stderr = sys.stderr, io.StringIO()
            try:
                code = main(["--db", f"sqlite:///{db}", "index", str(tree)])
                return [code, sys.stderr.getvalue()]
            finally:
                sys.stderr = err

        code, stderr = in_unprivileged_child(index_as_plain_user)
        assert code == 2, stderr
        one_error_line(stderr, "catalog is read-only", str(db))
    finally:
        shutil.rmtree(base)


def test_a_read_only_postgresql_catalog(tmp_path, postgres_url):
    """A read-only database (a hot standby, default_transaction_read_only): SQLSTATE 25006."""
    from tests.servers.postgres import admin_execute, fresh_database

    tree = make_tree(tmp_path / "t", {"a.dat": b"a"})
    db = fresh_database(postgres_url)
    run_cli("index", str(tree), db=db, check=0)
    name = db.rsplit("/", 1)[1]
    admin_execute(postgres_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    r = run_cli("index", str(tree), db=db, check=2)
    one_error_line(r.stderr, "catalog is read-only")
