#!/usr/bin/env python3
"""Catalog at scale: two locations of N entries each, then the time of Catalog.diff between them.

    python benchmarks/catalog_scale.py                      # 1,000,000 entries a side, both DBs
    python benchmarks/catalog_scale.py --entries 100000 --db sqlite
    python benchmarks/catalog_scale.py --explain            # also print the diff's query plans

Entries go straight into the entries table through Catalog.insert_entries (no storage is
touched): nested paths run/NNNN/sub/NN/file_NNNNNN.dat, and about 1% of the destination
differs (missing, extra, size, checksum, mtime). PostgreSQL is a throwaway server started
the way the test fixture starts it (tests/servers/postgres.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from castlib.catalog import Catalog  # noqa: E402

FILES_PER_DIR = 100
DIRS_PER_RUN = 10


def tree(n_files: int):
    """(path, name, kind) of a realistic nested tree holding about n_files files."""
    runs = max(1, n_files // (FILES_PER_DIR * DIRS_PER_RUN))
    for r in range(runs):
        run = f"run{r:05d}"
        yield run, run, "d"
        for s in range(DIRS_PER_RUN):
            sub = f"{run}/raw/{s:02d}"
            if s == 0:
                yield f"{run}/raw", "raw", "d"
            yield sub, f"{s:02d}", "d"
            for f in range(FILES_PER_DIR):
                name = f"cdr{r:05d}{s:02d}{f:03d}.dat"
                yield f"{sub}/{name}", name, "f"


def fill(catalog: Catalog, url: str, n_files: int, differ: float, seed: int) -> int:
    """One location of about n_files entries; `differ` of its files changed (reproducibly)."""
    rng = random.Random(seed)
    loc = catalog.location(url)
    now = datetime.now(timezone.utc)
    batch: list[dict] = []
    count = 0
    with catalog.engine.begin() as conn:
        for path, name, kind in tree(n_files):
            size, mtime, adler = 1_000_000 + len(path), 1_700_000_000 * 10**9, f"{hash(path) & 0xffffffff:08x}"
            if differ and kind == "f" and rng.random() < differ:
                change = rng.choice(("missing", "extra", "size", "checksum", "mtime"))
                if change == "missing":
                    continue
                if change == "extra":
                    path, name = path + ".extra", name + ".extra"
                elif change == "size":
                    size += 1
                elif change == "checksum":
                    adler = f"{(int(adler, 16) + 1) & 0xffffffff:08x}"
                else:
                    mtime += 10**9
            batch.append({"location_id": loc.id, "path": path, "name": name, "kind": kind,
                          "size": size if kind == "f" else None,
                          "mtime_ns": mtime, "mode": 0o644, "link_target": None,
                          "adler32": adler if kind == "f" else None, "md5": None, "sha256": None,
                          "online": None, "first_seen": now, "last_seen": now, "deleted": False})
            count += 1
            if len(batch) >= 20_000:
                catalog.insert_entries(conn, batch)
                batch.clear()
        catalog.insert_entries(conn, batch)
    return loc.id, count


def explain(catalog: Catalog, ref: int, dst: int) -> None:
    """The query plans of the diff's two statements, captured as the engine runs them."""
    from sqlalchemy import event

    statements = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if "FROM entries AS r" in statement or "FROM entries AS d" in statement:
            statements.append((statement, parameters))

    event.listen(catalog.engine, "before_cursor_execute", grab)
    list(catalog.diff(ref, dst))
    event.remove(catalog.engine, "before_cursor_execute", grab)
    prefix = "EXPLAIN QUERY PLAN " if catalog.dialect == "sqlite" else "EXPLAIN "
    with catalog.engine.connect() as conn:
        for statement, parameters in statements:
            print("  plan:")
            for row in conn.exec_driver_sql(prefix + statement, parameters):
                print("    " + " | ".join(str(c) for c in row))


def measure(name: str, url: str, n: int, differ: float, show_plans: bool) -> dict:
    catalog = Catalog(url)
    try:
        t = time.perf_counter()
        ref, n_ref = fill(catalog, "file:///bench/daq", n, 0.0, 1)
        dst, n_dst = fill(catalog, "file:///bench/archive", n, differ, 2)
        filled = time.perf_counter() - t
        if catalog.dialect == "postgresql":
            with catalog.engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE entries")
        timings = []
        for _ in range(3):
            t = time.perf_counter()
            found = list(catalog.diff(ref, dst))
            timings.append(time.perf_counter() - t)
        kinds: dict[str, int] = {}
        for d in found:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        print(f"{name}: {n_ref:,} + {n_dst:,} entries inserted in {filled:.1f} s "
              f"({(n_ref + n_dst) / filled:,.0f}/s); diff: {len(found):,} differences {kinds}; "
              f"{' / '.join(f'{x:.2f}' for x in timings)} s (first / warm)", flush=True)
        if show_plans:
            explain(catalog, ref, dst)
        return {"db": name, "insert_s": filled, "diff_s": min(timings), "differences": len(found)}
    finally:
        catalog.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="files a location (about)")
    parser.add_argument("--differ", type=float, default=0.01, help="fraction of files that differ")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--explain", action="store_true", help="print the diff's query plans")
    args = parser.parse_args()

    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="castlib-scale-"))
        if args.db in ("sqlite", "both"):
            measure("SQLite", f"sqlite:///{folder}/catalog.sqlite", args.entries, args.differ,
                    args.explain)
        if args.db in ("postgresql", "both"):
            from tests.servers.postgres import fresh_database, postgres_server

            server = stack.enter_context(postgres_server())
            import psycopg

            with psycopg.connect(f"{server}/postgres") as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
            print(f"PostgreSQL {version} (fsync off, as in the tests)")
            measure("PostgreSQL", fresh_database(server), args.entries, args.differ, args.explain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
