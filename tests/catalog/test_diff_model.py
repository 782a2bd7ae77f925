"""The SQL diff agrees with a brute-force model of what differs, on generated catalogs."""
import itertools
from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings, strategies as st

from castlib.catalog import DIFFERENCE_KINDS, Catalog

_counter = itertools.count()
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)

paths = st.sampled_from(["a", "a/b", "a/b/c", "a/b-c", "a/bc", "x", "x/%41", "y z", "é/ü"])
entry = st.fixed_dictionaries({
    "kind": st.sampled_from(["f", "f", "f", "d", "l"]),
    "size": st.integers(0, 3),
    "mtime_ns": st.sampled_from([0, 10**9, 2 * 10**9, 2 * 10**9 + 5]),
    "adler32": st.sampled_from([None, "00000001", "00000002"]),
    "link_target": st.sampled_from(["t1", "t2"]),
    "mode": st.sampled_from([None, 0o644, 0o755]),
    "deleted": st.booleans(),
    "corrupted": st.sampled_from([False, False, True]),   # as verify marks it
})
trees = st.dictionaries(paths, entry, max_size=9)


def model(ref: dict, dst: dict, tol, kinds) -> dict[str, str]:
    """Each path is reported once, as the most significant of the kinds asked for that
    apply to it: missing, type, size, checksum, corrupted (either side), mtime, mode (files
    and folders whose sides both know their permission bits)."""
    ref = {p: e for p, e in ref.items() if not e["deleted"]}
    dst = {p: e for p, e in dst.items() if not e["deleted"]}
    out = {}
    for p, r in ref.items():
        d = dst.get(p)
        if d is None:
            applicable = ["missing"]
        elif r["kind"] != d["kind"]:
            applicable = ["type"]
        elif r["kind"] == "l":
            applicable = ["type"] if r["link_target"] != d["link_target"] else []
        elif r["kind"] == "d":
            applicable = []
        else:
            applicable = []
            if r["size"] != d["size"]:
                applicable.append("size")
            if r["adler32"] and d["adler32"] and r["adler32"] != d["adler32"]:
                applicable.append("checksum")
            if r["corrupted"] or d["corrupted"]:
                applicable.append("corrupted")
            if tol is not None and abs(r["mtime_ns"] - d["mtime_ns"]) > tol:
                applicable.append("mtime")
        if (d is not None and r["kind"] == d["kind"] != "l" and None not in (r["mode"], d["mode"])
                and r["mode"] != d["mode"]):
            applicable.append("mode")
        chosen = [k for k in applicable if k in kinds]
        if chosen:
            out[p] = chosen[0]
    if "extra" in kinds:
        out.update({p: "extra" for p in dst if p not in ref})
    return out


def load(catalog: Catalog, tree: dict) -> int:
    loc = catalog.location(f"/model/{next(_counter)}")
    rows = []
    for path, e in tree.items():
        row = dict(e, location_id=loc.id, path=path, name=path.rsplit("/", 1)[-1],
                   md5=None, sha256=None, online=None, first_seen=NOW, last_seen=NOW)
        if row["kind"] != "l":
            row["link_target"] = None
        if row["kind"] != "f":
            row["adler32"] = None
        rows.append(row)
    with catalog.engine.begin() as conn:
        catalog.insert_entries(conn, rows)
        catalog.mark_corrupted(conn, loc.id, [(r["path"], r["size"], r["mtime_ns"])
                                              for r in rows if r["corrupted"]])
    return loc.id


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ref=trees, dst=trees, tol=st.sampled_from([None, 0, 5, 10**9]),
       kinds=st.sets(st.sampled_from(DIFFERENCE_KINDS), min_size=1))
def test_sql_diff_matches_the_model(db_url, ref, dst, tol, kinds):
    catalog = _catalog(db_url)
    ref_id, dst_id = load(catalog, ref), load(catalog, dst)
    got = {d.path: d.kind for d in catalog.diff(ref_id, dst_id, mtime_tolerance_ns=tol,
                                                 kinds=kinds)}
    assert got == model(ref, dst, tol, kinds)


_catalogs: dict[str, Catalog] = {}


def _catalog(url: str) -> Catalog:
    if url not in _catalogs:
        _catalogs[url] = Catalog(url)
    return _catalogs[url]


def test_diff_of_a_subtree_only(db_url):
    catalog = _catalog(db_url)
    e = {"kind": "f", "size": 1, "mtime_ns": 0, "adler32": None, "link_target": None,
         "deleted": False, "corrupted": False, "mode": None}
    ref = load(catalog, {"a/x": e, "b/x": e, "a-b": e})
    dst = load(catalog, {})
    got = {d.path for d in catalog.diff(ref, dst, prefix="a")}
    assert got == {"a/x"}
