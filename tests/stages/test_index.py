"""index: listing into the catalog; new, changed, vanished; checksum reuse; filters; safety."""
import os
import zlib

import pytest

import castlib
from castlib.catalog import Catalog
from castlib.errors import LocationMissing, SafetyRefusal
from tests.helpers import in_unprivileged_child, make_tree


def entries(db_url, location):
    cat = Catalog(db_url)
    loc = cat.find_location(str(location))
    return {e["path"]: e for e in cat.entries(loc.id, include_deleted=True)}


def test_new_changed_vanished(tmp_path, db_url):
    root = make_tree(tmp_path / "t", {"a.dat": b"1", "sub/b.dat": b"22", "empty/": None})
    os.symlink("a.dat", root / "ln")
    r = castlib.index(str(root), db=db_url)
    assert r.counts["new"] == 5 and r.counts["files"] == 2 and r.counts["dirs"] == 2
    e = entries(db_url, root)
    assert e["ln"]["kind"] == "l" and e["ln"]["link_target"] == "a.dat"
    assert e["sub/b.dat"]["size"] == 2 and e["empty"]["kind"] == "d"

    (root / "a.dat").write_bytes(b"111")
    (root / "sub" / "b.dat").unlink()
    (root / "c.dat").write_bytes(b"3")
    r = castlib.index(str(root), db=db_url)
    assert (r.counts["new"], r.counts["changed"], r.counts["deleted"]) == (1, 1, 1)
    e = entries(db_url, root)
    assert e["sub/b.dat"]["deleted"] and not e["a.dat"]["deleted"]
    assert e["a.dat"]["size"] == 3

    (root / "sub" / "b.dat").write_bytes(b"back")
    r = castlib.index(str(root), db=db_url)
    assert r.counts["changed"] == 1
    assert not entries(db_url, root)["sub/b.dat"]["deleted"]


def test_last_seen_of_live_entries_follows_each_index_vanished_ones_keep_theirs(tmp_path,
                                                                                db_url):
    root = make_tree(tmp_path / "t", {"keep.dat": b"k", "gone.dat": b"g"})
    castlib.index(str(root), db=db_url)
    (root / "gone.dat").unlink()
    castlib.index(str(root), db=db_url)
    vanished_at = entries(db_url, root)["gone.dat"]["last_seen"]
    castlib.index(str(root), db=db_url)
    cat = Catalog(db_url)
    try:
        indexed_at = cat.find_location(str(root)).indexed_at
    finally:
        cat.close()
    e = entries(db_url, root)
    assert e["keep.dat"]["last_seen"] == indexed_at > e["keep.dat"]["first_seen"]
    assert e["gone.dat"]["last_seen"] == vanished_at < indexed_at


def test_parent_links_follow_the_materialised_path(tmp_path, db_url):
    root = make_tree(tmp_path / "t", {"x/y/z.dat": b"z"})
    castlib.index(str(root), db=db_url)
    cat = Catalog(db_url)
    loc = cat.find_location(str(root))
    from sqlalchemy import select
    from castlib.catalog.schema import Entry

    with cat.engine.connect() as conn:
        rows = {r.path: r for r in conn.execute(
            select(Entry.id, Entry.path, Entry.parent_id).where(Entry.location_id == loc.id))}
    assert rows["x"].parent_id is None
    assert rows["x/y"].parent_id == rows["x"].id
    assert rows["x/y/z.dat"].parent_id == rows["x/y"].id


def test_parent_links_of_entries_a_sync_records_in_any_order(tmp_path, db_url):
    """After a sync the destination's entries link to their folders too, and a folder
    recorded after its content (as a back-end might list it) is linked all the same."""
    from sqlalchemy import select
    from castlib.catalog.schema import Entry

    root = make_tree(tmp_path / "ref", {"a/b/c.dat": b"c", "a/d.dat": b"d"})
    castlib.sync(str(root), str(tmp_path / "dst"), db=db_url)
    cat = Catalog(db_url)
    try:
        dst = cat.find_location(str(tmp_path / "dst"))
        late = cat.location(str(tmp_path / "late"))
        row = {"size": 1, "mtime_ns": 1, "mode": 0o644, "link_target": None}
        cat.record_entries(late.id, [{"path": "x/y.dat", "name": "y.dat", "kind": "f", **row},
                                     {"path": "x", "name": "x", "kind": "d", **row}])
        for loc in (dst, late):
            with cat.engine.connect() as conn:
                rows = {r.path: r for r in conn.execute(select(
                    Entry.id, Entry.path, Entry.parent_id).where(Entry.location_id == loc.id))}
            for path, r in rows.items():
                parent = path.rpartition("/")[0]
                assert r.parent_id == (rows[parent].id if parent else None), path
        assert len(rows) == 2
    finally:
        cat.close()


def test_symlinks_are_recorded_never_followed(tmp_path, db_url):
    outside = make_tree(tmp_path / "outside", {"secret.dat": b"s"})
    root = make_tree(tmp_path / "t", {"a.dat": b"a"})
    os.symlink(outside, root / "dirlink")
    castlib.index(str(root), db=db_url)
    e = entries(db_url, root)
    assert e["dirlink"]["kind"] == "l"
    assert not any(p.startswith("dirlink/") for p in e)


def test_checksum_is_reused_while_size_and_mtime_agree(tmp_path, db_url):
    root = make_tree(tmp_path / "t", {"a.dat": b"original"})
    r = castlib.index(str(root), db=db_url, checksum="adler32")
    assert r.counts["hashed"] == 1
    assert entries(db_url, root)["a.dat"]["adler32"] == f"{zlib.adler32(b'original'):08x}"
    # same size, same mtime, other bytes: a re-index must not re-read the file
    st = os.stat(root / "a.dat")
    (root / "a.dat").write_bytes(b"ORIGINAL")
    os.utime(root / "a.dat", ns=(st.st_atime_ns, st.st_mtime_ns))
    r = castlib.index(str(root), db=db_url, checksum="adler32")
    assert r.counts["hashed"] == 0
    assert entries(db_url, root)["a.dat"]["adler32"] == f"{zlib.adler32(b'original'):08x}"
    r = castlib.index(str(root), db=db_url, checksum="adler32", rehash=True)
    assert r.counts["hashed"] == 1
    assert entries(db_url, root)["a.dat"]["adler32"] == f"{zlib.adler32(b'ORIGINAL'):08x}"


def test_a_changed_file_loses_its_stale_checksum(tmp_path, db_url):
    root = make_tree(tmp_path / "t", {"a.dat": b"one"})
    castlib.index(str(root), db=db_url, checksum="md5")
    (root / "a.dat").write_bytes(b"three")
    castlib.index(str(root), db=db_url)
    assert entries(db_url, root)["a.dat"]["md5"] is None


def test_only_and_ignore_filters(tmp_path, db_url):
    root = make_tree(tmp_path / "t", {"run1/a.dat": b"a", "run1/a.tmp": b"t", "junk/x.dat": b"x",
                                      "top.dat": b"t", "notes.txt": b"n"})
    castlib.index(str(root), db=db_url, only=["*.dat"], ignore=["junk", "*.tmp"])
    live = {p for p, e in entries(db_url, root).items() if not e["deleted"]}
    assert live == {"run1", "run1/a.dat", "top.dat"}
    # a filtered re-index leaves what its filter did not look at alone
    castlib.index(str(root), db=db_url)
    castlib.index(str(root), db=db_url, only=["top.dat"])
    e = entries(db_url, root)
    assert not e["notes.txt"]["deleted"] and not e["run1/a.dat"]["deleted"]


def test_glob_with_slash_matches_the_whole_path(tmp_path, db_url):
    root = make_tree(tmp_path / "t", {"2017/a.dat": b"a", "2018/a.dat": b"b"})
    castlib.index(str(root), db=db_url, ignore=["2017/*"])
    live = {p for p, e in entries(db_url, root).items() if not e["deleted"]}
    assert live == {"2017", "2018", "2018/a.dat"}


def test_missing_root_is_an_error_and_changes_nothing(tmp_path, db_url):
    with pytest.raises(LocationMissing, match="does not exist"):
        castlib.index(str(tmp_path / "nope"), db=db_url)


def test_empty_listing_of_a_known_location_is_refused(tmp_path, db_url):
    root = make_tree(tmp_path / "t", {"a.dat": b"a", "b.dat": b"b"})
    castlib.index(str(root), db=db_url)
    for p in root.iterdir():
        p.unlink()
    with pytest.raises(SafetyRefusal,
                       match="2 of the 2 files the catalog knew there vanished .*lists empty"):
        castlib.index(str(root), db=db_url)
    assert not any(e["deleted"] for e in entries(db_url, root).values())
    r = castlib.index(str(root), db=db_url, force=True)
    assert r.counts["deleted"] == 2


def test_unreadable_folder_is_reported_and_the_rest_indexed():
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="castlib-perm-")
    try:
        root = make_tree(os.path.join(base, "t"), {"ok/a.dat": b"a", "locked/b.dat": b"b",
                                                    "c.dat": b"c"})
        db = f"sqlite:///{base}/cat.sqlite"
        castlib.index(str(root), db=db)          # baseline, readable by root
        (root / "d.dat").write_bytes(b"d")
        for dirpath, dirnames, filenames in os.walk(base):
            os.chmod(dirpath, 0o777)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o666)
        os.chmod(root / "locked", 0o000)

        def index_as_plain_user():
            report = castlib.index(str(root), db=db)
            return {"counts": report.counts, "errors": report.errors}

        result = in_unprivileged_child(index_as_plain_user)
        os.chmod(root / "locked", 0o755)
        assert result["counts"]["unreadable"] == 1
        assert any(e.startswith("locked: cannot list: Permission denied")
                   for e in result["errors"])
        assert result["counts"]["new"] == 1          # d.dat: the rest went on
        e = entries(db, root)
        assert not e["locked/b.dat"]["deleted"], "unlisted is not vanished"
        assert not e["d.dat"]["deleted"]
    finally:
        os.chmod(os.path.join(base, "t", "locked"), 0o755)
        shutil.rmtree(base)
