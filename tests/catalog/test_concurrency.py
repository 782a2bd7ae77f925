"""Several writers on one catalog at once: parallel indexes, racing location registration,
the per-destination sync lock (including one held by a process that was killed), and
writers of one location's entries taking turns (the index lock)."""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
from sqlalchemy import text

from castlib.catalog import DIFFERENCE_KINDS, Catalog
from castlib.catalog.database import HEAD_REVISION
from castlib.catalog.locks import location_lock
from tests.helpers import REPO_ROOT, cli_env, make_tree, run_cli


def _tree(root, n_dirs=5, n_files=40):
    return make_tree(root, {f"d{d}/f{f}.dat": f"{root.name}-{d}-{f}".encode()
                            for d in range(n_dirs) for f in range(n_files)})


def test_parallel_indexes_of_different_locations_lose_nothing(tmp_path, db_url):
    trees = [_tree(tmp_path / f"src{i}") for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "castlib", "--db", db_url, "index", str(t)],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for t in trees]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    catalog = Catalog(db_url)
    try:
        with catalog.engine.connect() as conn:
            total, distinct = conn.execute(text(
                "SELECT count(*), count(DISTINCT location_id || ':' || path) FROM entries")).one()
            assert total == distinct == 4 * (5 + 5 * 40)   # folders and files, no duplicate
        for t in trees:
            loc = catalog.find_location(str(t))
            files = {e["path"] for e in catalog.entries(loc.id, kind="f")}
            assert files == {f"d{d}/f{f}.dat" for d in range(5) for f in range(40)}
            folders = {e["path"]: e for e in catalog.entries(loc.id, kind="d")}
            assert set(folders) == {f"d{d}" for d in range(5)}
    finally:
        catalog.close()


def _register(db_url: str, url: str) -> int:
    catalog = Catalog(db_url)
    try:
        return catalog.location(url).id
    finally:
        catalog.close()


def _open_and_close(db_url: str) -> str | None:
    catalog = Catalog(db_url)
    try:
        return catalog.revision
    finally:
        catalog.close()


def test_processes_opening_a_new_catalog_at_once_all_get_its_schema(request, tmp_path, db_url):
    """Cron jobs on several hosts may create the central catalog together: none may see
    another's half-made schema (SQLite creates tables outside the transaction)."""
    for attempt in range(3):   # a new, empty database each time: the race is in creating it
        if db_url.startswith("sqlite"):
            url = f"sqlite:///{tmp_path / f'new-{attempt}.sqlite'}"
        else:
            from tests.servers.postgres import fresh_database

            url = fresh_database(request.getfixturevalue("postgres_url"))
        with ProcessPoolExecutor(6) as pool:
            revisions = list(pool.map(_open_and_close, [url] * 6))
        assert revisions == [HEAD_REVISION] * 6


def test_two_processes_registering_the_same_location_get_one_record(tmp_path, db_url):
    Catalog(db_url).close()   # schema first: the race under test is the location's
    urls = [str(tmp_path / f"shared{i}") for i in range(5)]
    with ProcessPoolExecutor(8) as pool:
        ids = list(pool.map(_register, [db_url] * 40, [u for u in urls for _ in range(8)]))
    for i, url in enumerate(urls):
        assert len(set(ids[i * 8:(i + 1) * 8])) == 1, url
    catalog = Catalog(db_url)
    try:
        with catalog.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM locations")).scalar() == 5
            assert conn.execute(text("SELECT count(*) FROM nodes")).scalar() == 1
    finally:
        catalog.close()


def test_second_sync_into_a_locked_destination_refuses_with_one_line(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = tmp_path / "dst"
    catalog = Catalog(db_url)
    try:
        loc = catalog.location(str(dst))
        with location_lock(catalog, loc.id, loc.url):
            r = run_cli("sync", str(ref), str(dst), db=db_url, check=2)
        err = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(err) == 1 and "another run is syncing into" in err[0] and str(dst) in err[0]
        assert not dst.exists()
        run_cli("sync", str(ref), str(dst), db=db_url, check=0)   # free again
        assert (dst / "a.dat").read_bytes() == b"a"
    finally:
        catalog.close()


HOLD_LOCK = """
import sys, time
from castlib.catalog import DIFFERENCE_KINDS, Catalog
from castlib.catalog.locks import location_lock
catalog = Catalog(sys.argv[1])
loc = catalog.location(sys.argv[2])
with location_lock(catalog, loc.id, loc.url):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_lock_held_by_a_killed_process_is_released(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = tmp_path / "dst"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, db_url, str(dst)], env=cli_env(),
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        run_cli("sync", str(ref), str(dst), db=db_url, check=2)   # held: refused
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # PostgreSQL notices the dropped connection at once on loopback; allow it a moment
    for _attempt in range(20):
        r = run_cli("sync", str(ref), str(dst), db=db_url)
        if r.returncode != 2:
            break
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr
    assert (dst / "a.dat").read_bytes() == b"a"


def _start(*args, db_url):
    return subprocess.Popen([sys.executable, "-m", "castlib", "--db", db_url, *args],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _start_together(db_url, *commands):
    """Processes that go on together, as cron jobs of one minute do: started while the
    catalog's runs table is held, each waits at its first write (recording its run) and
    all go on the moment it is released. Python's start-up (a second, under load) would
    otherwise keep them apart by more than the race lasts."""
    catalog = Catalog(db_url)
    try:
        if catalog.dialect == "sqlite":
            import sqlite3

            gate = sqlite3.connect(catalog.engine.url.database, isolation_level=None)
            gate.execute("BEGIN IMMEDIATE")   # the write lock: readers go on, writers wait
        else:
            gate = catalog.engine.raw_connection()
            gate.cursor().execute("LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE")
        procs = [_start(*c, db_url=db_url) for c in commands]
        deadline = time.monotonic() + 60
        while not _all_waiting(catalog, procs) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a run ended before the gate opened"
            time.sleep(0.05)
        gate.rollback() if catalog.dialect != "sqlite" else gate.execute("ROLLBACK")
        gate.close()
        return procs
    finally:
        catalog.close()


def _all_waiting(catalog, procs) -> bool:
    if catalog.dialect == "postgresql":
        with catalog.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted "
                                     "AND relation = 'runs'::regclass")).scalar() == len(procs)
    # SQLite shows no waiters: a process that has the catalog open is a moment from its
    # first write
    database = os.path.realpath(catalog.engine.url.database)
    for p in procs:
        try:
            fds = os.listdir(f"/proc/{p.pid}/fd")
        except FileNotFoundError:
            return False
        if not any(_readlink(f"/proc/{p.pid}/fd/{fd}") == database for fd in fds):
            return False
    time.sleep(0.5)
    return True


def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


@pytest.mark.slow
def test_one_reference_synced_into_two_destinations_at_once(tmp_path, db_url):
    """Two cron jobs from one reference start together: both list the reference into the
    catalog. Two writers of one location's entries inserted the same new paths, and one
    died of a UNIQUE constraint. The destinations already hold the files (copies with
    their mtimes): the race is in listing, and copying would only slow the test."""
    import shutil

    Catalog(db_url).close()
    for rnd in range(3):
        ref = _tree(tmp_path / f"ref{rnd}", n_dirs=4, n_files=250)   # new to the catalog
        dsts = [tmp_path / f"dst{rnd}-{i}" for i in range(2)]
        for d in dsts:
            shutil.copytree(ref, d)
        procs = _start_together(db_url, *[("sync", str(ref), str(d)) for d in dsts])
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"round {rnd}: {err}"
        _assert_same_in_catalog(db_url, ref, *dsts)


def _assert_same_in_catalog(db_url, ref, *dsts, extra_ok=False):
    catalog = Catalog(db_url)
    kinds = [k for k in DIFFERENCE_KINDS if not (extra_ok and k == "extra")]
    try:
        ref_id = catalog.find_location(str(ref)).id
        assert catalog.live_count(ref_id) == len([f for f in ref.rglob("*") if f.is_file()])
        for d in dsts:
            dst_id = catalog.find_location(str(d)).id
            assert list(catalog.diff(ref_id, dst_id, kinds=kinds)) == [], d
    finally:
        catalog.close()


@pytest.mark.slow
def test_an_index_of_a_destination_while_a_sync_fills_it(tmp_path, db_url):
    """The sync records what it copied (every 500 files) while the index lists what it
    finds: both wrote the destination's new entries, and one of them died of a UNIQUE
    constraint. The destination's other files make each listing last long enough for
    the sync to record a batch meanwhile. Neither may crash; the catalog ends up right."""
    dst = _tree(tmp_path / "dst", n_dirs=10, n_files=1000)   # files the reference lacks
    run_cli("index", str(dst), db=db_url, check=0)
    for rnd in range(2):
        ref = make_tree(tmp_path / f"ref{rnd}", {f"new{rnd}/d{d}/f{f}.dat": f"{rnd}{d}{f}"
                                                  for d in range(3) for f in range(400)})
        sync = _start("sync", str(ref), str(dst), "--transfers", "1", db_url=db_url)
        indexes = 0
        while sync.poll() is None:
            # rehashing every file: a listing that lasts, as a large destination's would
            r = run_cli("index", str(dst), "--checksum", "adler32", "--rehash", db=db_url)
            assert r.returncode == 0, f"round {rnd}: index: {r.stderr}"
            indexes += 1
        out, err = sync.communicate()
        assert sync.returncode == 0, f"round {rnd}: sync: {err}"
        assert indexes, "the sync ended before an index could run beside it"
        run_cli("index", str(dst), db=db_url, check=0)
        _assert_same_in_catalog(db_url, ref, dst, extra_ok=True)
