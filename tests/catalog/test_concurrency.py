"""Several writers on one catalog at once: parallel indexes, racing location registration,
and the per-destination sync lock, including one held by a process that was killed."""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from sqlalchemy import text

from castlib.catalog import Catalog
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
from castlib.catalog import Catalog
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
