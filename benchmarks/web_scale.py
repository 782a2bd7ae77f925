#!/usr/bin/env python3
"""The web API over a 1,000,000-entry location (SQLite): the time of one entries page at
the start, the middle and the end (key pagination), of a folder page in the browser, and
the NDJSON stream of every entry with its peak memory.

    python benchmarks/web_scale.py                 # 1,000,000 files
    python benchmarks/web_scale.py --entries 100000

Entries go straight into the catalog (benchmarks/catalog_scale.fill); the app is driven
in-process through FastAPI's TestClient (no network in the figures).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from catalog_scale import fill  # noqa: E402

from castlib.catalog import Catalog  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--no-stream", action="store_true", help="pages only, not the NDJSON stream")
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    from castlib.web import create_app

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/catalog.sqlite"
        catalog = Catalog(url)
        t, loc = timed(lambda: fill(catalog, "file:///bench/ref", args.entries, 0, 1))
        print(f"filled {args.entries} files in {t:.1f} s")
        catalog.close()
        client = TestClient(create_app(url))
        # the first overview counts the location (nothing kept yet); the next ones read
        # the counts it kept, until the location is written again
        t, r = timed(lambda: client.get("/api/v1/locations"))
        print(f"locations, first (counts every entry once, keeps the counts): "
              f"{t * 1000:.0f} ms")
        loc_id = r.json()["locations"][0]["id"]
        total = client.get("/api/v1/locations").json()["locations"][0]
        print(f"location: {total['files']} files, {total['dirs']} folders")
        base = f"/api/v1/locations/{loc_id}/entries"
        mid = f"run{args.entries // 2000:05d}/"   # catalog_scale: 1000 files a run
        first = client.get(base, params={"limit": 1000}).json()
        for label, params in [("first page (1000)", {"limit": 1000}),
                              (f"a page in the middle, after {mid} (1000)",
                               {"limit": 1000, "after": mid}),
                              ("last page", {"limit": 1000, "after": "run99999"}),
                              (f"prefix search {mid}raw/05/", {"prefix": f"{mid}raw/05/"}),
                              ]:
            t, r = timed(lambda: client.get(base, params=params))
            assert r.status_code == 200, r.text
            print(f"{label}: {t * 1000:.0f} ms, {len(r.json()['entries'])} entries")
        for label, path in [("folder page: root", f"/locations/{loc_id}"),
                            (f"folder page: {mid}raw/05", f"/locations/{loc_id}?path={mid}raw/05")]:
            t, r = timed(lambda: client.get(path))
            assert r.status_code == 200
            print(f"{label}: {t * 1000:.0f} ms")
        t, r = timed(lambda: client.get("/api/v1/locations"))
        print(f"locations, again (the kept counts): {t * 1000:.0f} ms")
        assert first["next_after"]
        if args.no_stream:
            return
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = 0
        t0 = time.perf_counter()
        with client.stream("GET", base, headers={"Accept": "application/x-ndjson"}) as r:
            for line in r.iter_lines():
                n += bool(line)
        t = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"NDJSON stream: {n} entries in {t:.1f} s ({n / t:,.0f}/s); peak RSS "
              f"{before / 1024:.0f} MB before, {after / 1024:.0f} MB after")


if __name__ == "__main__":
    main()
