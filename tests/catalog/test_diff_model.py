"""The SQL diff agrees with a brute-force model of what differs, on generated catalogs."""
import itertools
from datetime import datetime, timezone

import pytest
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


# -- compare: the diff and the mtime drift at once, on every path of the catalog -----------
def drift_model(ref: dict, dst: dict, tol: int, kinds) -> list[str]:
    """What mtime_drift reports: folders and links (of `kinds`) live on both sides, alike
    (a link's target too) but for mtimes more than `tol` apart; in path order."""
    ref = {p: e for p, e in ref.items() if not e["deleted"]}
    dst = {p: e for p, e in dst.items() if not e["deleted"]}
    return sorted(p for p, r in ref.items()
                  if p in dst and r["kind"] in kinds and dst[p]["kind"] == r["kind"]
                  and (r["kind"] != "l" or r["link_target"] == dst[p]["link_target"])
                  and abs(r["mtime_ns"] - dst[p]["mtime_ns"]) > tol)


_references: dict[str, Catalog] = {}


def _reference(tmp_path_factory) -> Catalog:
    """A catalog on the general SQLAlchemy path over SQLite, whose diff and mtime_drift
    (a join, two counts, a second join; one query for the drift) are the reference."""
    if "ref" not in _references:
        folder = tmp_path_factory.mktemp("reference")
        _references["ref"] = Catalog(f"sqlite:///{folder / 'general.sqlite'}", lean=False)
    return _references["ref"]


def _check_compare(catalog, reference, ids, ref_ids, **options):
    got = catalog.compare(*ids, **options)
    drift = dict(kinds=options.pop("drift_kinds", ()),
                 tolerance_ns=options.pop("drift_tolerance_ns", 0))
    want = (list(reference.diff(*ref_ids, **options)),
            list(reference.mtime_drift(*ref_ids, prefix=options.get("prefix", ""), **drift)))
    assert got == want
    return got


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ref=trees, dst=trees, tol=st.sampled_from([None, 0, 5, 10**9]),
       kinds=st.sets(st.sampled_from(DIFFERENCE_KINDS), min_size=1),
       drift=st.sampled_from([(), ("d",), ("l",), ("d", "l")]),
       dtol=st.sampled_from([0, 5, 10**9]), prefix=st.sampled_from(["", "a"]))
def test_compare_is_the_diff_and_the_mtime_drift_at_once(db_url, tmp_path_factory, ref, dst,
                                                         tol, kinds, drift, dtol, prefix):
    """compare() gives, in one pass, what diff() and mtime_drift() give (every side of every
    difference, in their order), on each path: lean SQLite, PostgreSQL."""
    catalog, reference = _catalog(db_url), _reference(tmp_path_factory)
    ids = load(catalog, ref), load(catalog, dst)
    ref_ids = load(reference, ref), load(reference, dst)
    differences, drifted = _check_compare(catalog, reference, ids, ref_ids,
                                          mtime_tolerance_ns=tol, kinds=kinds, prefix=prefix,
                                          drift_kinds=drift, drift_tolerance_ns=dtol)
    if not prefix:
        assert {d.path: d.kind for d in differences} == model(ref, dst, tol, kinds)
        assert [d.path for d in drifted] == drift_model(ref, dst, dtol, drift)


@pytest.mark.parametrize("few", [50_000, 10])
def test_compare_of_large_locations(db_url, tmp_path_factory, monkeypatch, few):
    """Locations large enough for the lean path to read the reference in table order (and
    PostgreSQL to join by hash or merge), with every kind of difference, deleted rows on
    both sides, extras and drift, give what the general diff and mtime_drift give; the
    lean path's extras found by looking up a few paths, or (more than `few`) by a join."""
    import random

    from castlib.catalog import lite

    monkeypatch.setattr(lite, "_FEW", few)

    rnd = random.Random(12)
    ref, dst = {}, {}
    for i in range(12_000):
        path = f"d{i // 500:02d}/f{i % 500:03d}" if i % 500 else f"d{i // 500:02d}"
        e = {"kind": "d" if i % 500 == 0 else ("l" if i % 97 == 0 else "f"), "size": 1,
             "mtime_ns": 10**9, "adler32": "00000001", "link_target": "t1", "mode": 0o644,
             "deleted": False, "corrupted": False}
        ref[path] = e
        dst[path] = dict(e)
    paths = sorted(ref)
    for path in rnd.sample(paths, 300):   # one change each, of every sort
        change = rnd.choice(["size", "adler32", "mtime_ns", "mode", "link_target", "kind",
                             "corrupted", "gone_ref", "gone_dst", "deleted_ref",
                             "deleted_dst"])
        e = dst[path]
        if change == "gone_ref":
            del ref[path]
        elif change == "gone_dst":
            del dst[path]
        elif change in ("deleted_ref", "deleted_dst"):
            (ref if change == "deleted_ref" else dst)[path]["deleted"] = True
        elif change == "kind":
            e["kind"] = "f" if e["kind"] != "f" else "d"
        elif change == "link_target":
            e["link_target"] = "t2"
        elif change == "corrupted":
            e["corrupted"] = True
        else:
            e[change] = {"size": 2, "adler32": "00000002", "mtime_ns": 2 * 10**9 + 5,
                         "mode": 0o755}[change]
    dst["d03"]["mtime_ns"] = dst[paths[97]]["mtime_ns"] = 5 * 10**9   # a folder, a link
    for i in range(40):   # the destination's own
        dst[f"x{i:02d}"] = dict(ref[paths[1]], deleted=i % 3 == 0)
    # rows go in out of path order (as a walk lists them): ids do not follow paths
    ref, dst = (dict(rnd.sample(list(t.items()), len(t))) for t in (ref, dst))
    catalog, reference = _catalog(db_url), _reference(tmp_path_factory)
    ids = load(catalog, ref), load(catalog, dst)
    ref_ids = load(reference, ref), load(reference, dst)
    for kinds in (DIFFERENCE_KINDS, ("extra",), ("missing", "size")):
        for tol in (0, 5, None):
            differences, drifted = _check_compare(
                catalog, reference, ids, ref_ids, mtime_tolerance_ns=tol, kinds=kinds,
                drift_kinds=("d", "l"), drift_tolerance_ns=tol or 0)
            assert {d.path: d.kind for d in differences} == model(ref, dst, tol, kinds)
    assert drifted and {d.kind for d in differences} >= {"missing", "size"}
    everything, _ = _check_compare(catalog, reference, ids, ref_ids)
    assert {d.kind for d in everything} == set(DIFFERENCE_KINDS)
