"""sync: copies, replacements, mtimes, deletions, safety refusals, dry runs, leftovers."""
import os
import zlib

import pytest

import castlib
from castlib.catalog import Catalog
from castlib.errors import CastlibError, LocationMissing, SafetyRefusal
from tests.helpers import in_unprivileged_child, make_tree, tree_digest, local_url


def sync(ref, dst, db, **kw):
    return castlib.sync(str(ref), str(dst), db=db, **kw)


def test_first_sync_copies_everything_including_empty_folders_and_links(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a" * 1000, "run1/b.dat": b"b",
                                       "run1/empty/": None, "zero.dat": b""})
    os.symlink("a.dat", ref / "ln")
    r = sync(ref, tmp_path / "dst", db_url)
    assert r.counts["copied"] == 3 and r.counts["failed"] == 0
    assert r.counts["bytes"] == 1001 and r.counts["links_created"] == 1
    assert tree_digest(tmp_path / "dst") == tree_digest(ref)
    assert os.stat(tmp_path / "dst" / "a.dat").st_mtime_ns == os.stat(ref / "a.dat").st_mtime_ns
    again = sync(ref, tmp_path / "dst", db_url)
    assert again.counts["copied"] == again.counts["replaced"] == 0


def test_catalog_holds_the_destination_and_learned_reference_checksums(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"payload"})
    sync(ref, tmp_path / "dst", db_url)
    cat = Catalog(db_url)
    want = f"{zlib.adler32(b'payload'):08x}"
    for root in (ref, tmp_path / "dst"):
        loc = cat.find_location(str(root))
        (e,) = [e for e in cat.entries(loc.id) if e["path"] == "a.dat"]
        assert e["adler32"] == want
    # --index ref trusts that record of the destination: nothing to do, nothing re-listed
    r = sync(ref, tmp_path / "dst", db_url, index="ref")
    assert r.counts["copied"] == 0


def test_differing_files_are_replaced_unless_no_replace(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"size.dat": b"long content", "same.dat": b"x"})
    dst = make_tree(tmp_path / "dst", {"size.dat": b"short", "same.dat": b"x"})
    r = sync(ref, dst, db_url, replace=False)
    assert r.counts["replaced"] == 0 and r.counts["kept"] == 1
    assert (dst / "size.dat").read_bytes() == b"short"
    r = sync(ref, dst, db_url)
    assert r.counts["replaced"] == 1
    assert (dst / "size.dat").read_bytes() == b"long content"


def test_same_size_other_mtime_checksums_decide(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"same.dat": b"identical", "other.dat": b"AAAA"})
    dst = make_tree(tmp_path / "dst", {"same.dat": b"identical", "other.dat": b"BBBB"})
    for name in ("same.dat", "other.dat"):
        os.utime(ref / name, ns=(10**18, 10**18))
        os.utime(dst / name, ns=(2 * 10**18, 2 * 10**18))
    r = sync(ref, dst, db_url)
    assert r.counts["mtime_fixed"] == 1      # same bytes: only the mtime is set
    assert r.counts["replaced"] == 1         # other bytes, same size: replaced
    assert (dst / "other.dat").read_bytes() == b"AAAA"
    assert os.stat(dst / "same.dat").st_mtime_ns == 10**18
    assert os.stat(dst / "other.dat").st_mtime_ns == 10**18
    assert sync(ref, dst, db_url).counts == {**r.counts, **dict.fromkeys(r.counts, 0)}


def test_extras_are_deleted_only_when_asked_and_within_max_delete(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"keep.dat": b"k"})
    dst = make_tree(tmp_path / "dst", {"keep.dat": b"k", "old/x.dat": b"x", "old/y.dat": b"y"})
    r = sync(ref, dst, db_url)
    assert r.counts["deleted"] == 0 and r.counts["extras_kept"] == 3
    assert (dst / "old" / "x.dat").exists()
    with pytest.raises(SafetyRefusal, match="would delete 3 entries, more than --max-delete 2"):
        sync(ref, dst, db_url, delete=True, max_delete=2)
    assert (dst / "old" / "x.dat").exists()
    r = sync(ref, dst, db_url, delete=True, max_delete=3)
    assert r.counts["deleted"] == 3
    assert tree_digest(dst) == tree_digest(ref)


def test_type_conflicts_need_delete(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"thing/inside.dat": b"i", "flat": b"f"})
    dst = make_tree(tmp_path / "dst", {"thing": b"a file", "flat/sub.dat": b"s"})
    r = sync(ref, dst, db_url)
    assert r.counts["failed"] == r.counts["conflicts"] == 2 and r.exit_code == 1
    assert any("type conflict" in e and "--delete" in e for e in r.errors)
    # the kinds by their one human name (backends.base.KIND_NAMES): "folder", never "dir"
    errors = "\n".join(r.errors)
    assert "thing: type conflict: reference has a folder, destination a file" in errors
    assert "flat: type conflict: reference has a file, destination a folder" in errors
    assert (dst / "thing").read_bytes() == b"a file"
    r = sync(ref, dst, db_url, delete=True)
    assert r.counts["failed"] == 0
    assert tree_digest(dst) == tree_digest(ref)


def test_vanished_reference_is_refused_before_touching_the_destination(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a", "b.dat": b"b"})
    dst = tmp_path / "dst"
    sync(ref, dst, db_url)
    # the disk is "unmounted": the mount point is there, empty
    for p in ref.iterdir():
        p.unlink()
    before = tree_digest(dst)
    with pytest.raises(SafetyRefusal, match="lists empty"):
        sync(ref, dst, db_url, delete=True)
    assert tree_digest(dst) == before
    # the mount point itself is gone
    ref.rmdir()
    with pytest.raises(LocationMissing, match="does not exist"):
        sync(ref, dst, db_url, delete=True)
    assert tree_digest(dst) == before
    # --force accepts it
    ref.mkdir()
    r = sync(ref, dst, db_url, delete=True, force=True)
    assert r.counts["deleted"] == 2


@pytest.fixture
def open_base(db_url):
    """A folder every user may enter (root reads any folder, so an unreadable one needs the
    sync to run as a plain user), and a catalog that user can write."""
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="castlib-perm-")
    os.chmod(base, 0o777)
    db = f"sqlite:///{base}/cat.sqlite" if db_url.startswith("sqlite") else db_url
    Catalog(db).close()   # its database driver loaded before the plain user needs it
    yield base, db
    for dirpath, _dirs, _files in os.walk(base):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(base)


def _open_to_all(base):
    for dirpath, _dirs, files in os.walk(base):
        os.chmod(dirpath, 0o777)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666)


def test_an_unreadable_reference_folder_deletes_nothing_below_it(open_base):
    base, db = open_base
    ref = make_tree(os.path.join(base, "ref"), {"ok/a.dat": b"a", "locked/b.dat": b"b"})
    dst = make_tree(os.path.join(base, "dst"), {"ok/a.dat": b"a", "locked/b.dat": b"b",
                                                 "locked/c.dat": b"c", "stale.dat": b"s"})
    _open_to_all(base)
    os.chmod(ref / "locked", 0o000)

    def sync_as_plain_user():   # a catalog that never saw the reference: nothing to go by
        return castlib.sync(str(ref), str(dst), db=db, delete=True).counts

    counts = in_unprivileged_child(sync_as_plain_user)
    assert counts["deleted"] == 1 and not (dst / "stale.dat").exists()
    assert (dst / "locked/b.dat").exists() and (dst / "locked/c.dat").exists()
    assert counts["skipped"] == 2


def test_an_unreadable_reference_root_is_an_error_before_any_change(open_base):
    base, db = open_base
    ref = make_tree(os.path.join(base, "ref"), {"a.dat": b"a"})
    dst = make_tree(os.path.join(base, "dst"), {"a.dat": b"a", "b.dat": b"b"})
    _open_to_all(base)
    os.chmod(ref, 0o000)

    def sync_as_plain_user():
        try:
            castlib.sync(str(ref), str(dst), db=db, delete=True)
        except CastlibError as exc:
            return str(exc)
        return "no error"

    message = in_unprivileged_child(sync_as_plain_user)
    assert message.startswith(f"cannot list location {local_url(ref)}: Permission denied")
    assert sorted(os.listdir(dst)) == ["a.dat", "b.dat"]


def test_dry_run_changes_nothing(tmp_path, db_url, capsys):
    ref = make_tree(tmp_path / "ref", {"new.dat": b"n", "dir/": None, "diff.dat": b"1234"})
    dst = make_tree(tmp_path / "dst", {"extra.dat": b"e", "diff.dat": b"12"})
    before = tree_digest(dst)
    r = sync(ref, dst, db_url, dry_run=True, delete=True)
    assert tree_digest(dst) == before
    assert r.counts["copied"] == 1 and r.counts["replaced"] == 1 and r.counts["deleted"] == 1
    out = capsys.readouterr().out
    assert "would copy new.dat" in out and "would delete extra.dat" in out
    assert "would mkdir dir" in out and "would replace diff.dat" in out


def test_leftover_temporary_files_are_removed_and_never_catalogued(tmp_path, db_url):
    from castlib.catalog.settings import temp_name_key
    from castlib.transfer import temp_path

    with Catalog(db_url) as cat:
        leftover = temp_path("a.dat", temp_name_key(cat))   # as an interrupted run left it
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = make_tree(tmp_path / "dst", {leftover: b"half",
                                       ".notours.castlib-part-xyz": b"user file"})
    r = sync(ref, dst, db_url)
    assert r.counts["temp_removed"] == 1
    assert not (dst / leftover).exists()
    assert (dst / ".notours.castlib-part-xyz").read_bytes() == b"user file"
    cat = Catalog(db_url)
    loc = cat.find_location(str(dst))
    assert leftover not in " ".join(e["path"] for e in cat.entries(loc.id))


def test_source_changed_after_indexing_is_not_published(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"version one"})
    dst = tmp_path / "dst"
    castlib.index(str(ref), db=db_url, checksum="adler32")
    st = os.stat(ref / "a.dat")
    (ref / "a.dat").write_bytes(b"version TWO")   # same size, mtime restored: only bytes differ
    os.utime(ref / "a.dat", ns=(st.st_atime_ns, st.st_mtime_ns))
    r = sync(ref, dst, db_url, index="none")
    assert r.counts["failed"] == 1 and r.exit_code == 1
    assert "differs from the catalog" in r.errors[0]
    assert not (dst / "a.dat").exists()
    assert [p for p in os.listdir(dst)] == []          # no temporary file left either


def test_one_failure_does_not_stop_the_others(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {f"f{i}.dat": str(i) for i in range(10)})
    castlib.index(str(ref), db=db_url)
    (ref / "f3.dat").unlink()            # vanishes between index and copy
    r = sync(ref, tmp_path / "dst", db_url, index="none", transfers=3)
    assert r.counts["copied"] == 9 and r.counts["failed"] == 1
    assert any(e.startswith("f3.dat:") for e in r.errors)


def test_parallel_transfers_copy_large_files_byte_exact(tmp_path, db_url):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(6):
        (ref / f"big{i}.dat").write_bytes(os.urandom(3 * 1024 * 1024 + i))
    r = sync(ref, tmp_path / "dst", db_url, transfers=4, checksum="sha256")
    assert r.counts["copied"] == 6
    assert tree_digest(tmp_path / "dst") == tree_digest(ref)


def test_explicit_checksum_compares_content_of_look_alike_files(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"AAAA"})
    dst = make_tree(tmp_path / "dst", {"a.dat": b"BBBB"})
    st = os.stat(ref / "a.dat")
    os.utime(dst / "a.dat", ns=(st.st_atime_ns, st.st_mtime_ns))   # same size, same mtime
    assert sync(ref, dst, db_url).counts["replaced"] == 0          # looks identical
    r = sync(ref, dst, db_url, checksum="md5")
    assert r.counts["replaced"] == 1
    assert (dst / "a.dat").read_bytes() == b"AAAA"
    diff = castlib.diff(str(ref), str(dst), db=db_url, checksum="md5")
    assert diff.value.differences == []


def test_ignored_paths_are_neither_copied_nor_deleted(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"run/a.dat": b"a", "run/b.tmp": b"t", "cache/x": b"x"})
    dst = make_tree(tmp_path / "dst", {"keep.tmp": b"mine", "cache/y": b"y"})
    r = sync(ref, dst, db_url, delete=True, ignore=["*.tmp", "cache"])
    assert (r.counts["copied"], r.counts["deleted"]) == (1, 0)
    assert tree_digest(dst).keys() == {"run", "run/a.dat", "keep.tmp", "cache", "cache/y"}
    r = sync(ref, dst, db_url, delete=True, only=["*.dat"])
    assert r.counts["deleted"] == 0 and "run/b.tmp" not in tree_digest(dst)


def test_a_pipeline_diff_leaves_out_what_the_reference_index_ignored(tmp_path, db_url):
    """Even when the catalog learned those files from an earlier, unfiltered run."""
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a", "b.tmp": b"t"})
    sync(ref, tmp_path / "elsewhere", db_url)           # the catalog now knows b.tmp
    pipeline = castlib.Pipeline.from_stages([
        ("index", {"location": str(ref), "ignore": ["*.tmp"]}),
        ("index", {"location": str(tmp_path / "dst"), "missing_ok": True}),
        ("diff", {"id": "d", "ref": str(ref), "dst": str(tmp_path / "dst")}),
        ("sync", {"from": "d"})])
    with Catalog(db_url) as catalog:
        report = pipeline.run(catalog)
    assert report.counts["copied"] == 1
    assert sorted(os.listdir(tmp_path / "dst")) == ["a.dat"]


def test_overlapping_reference_and_destination_are_refused(tmp_path, db_url):
    ref = make_tree(tmp_path / "a", {"f.dat": b"f"})
    for dst in (ref / "backup", ref, tmp_path):
        with pytest.raises(SafetyRefusal, match="overlap"):
            sync(ref, dst, db_url, delete=True)
    assert tree_digest(ref) == {"f.dat": tree_digest(ref)["f.dat"]}
    sync(ref, tmp_path / "ab", db_url)            # a sibling whose name starts alike is fine
    assert (tmp_path / "ab" / "f.dat").exists()


def test_a_copy_renamed_elsewhere_by_the_destination_is_a_failure_not_a_catalog_entry(
        tmp_path, db_url, monkeypatch):
    """A destination whose rename puts the verified copy under another name (a fault
    injected in the local back-end: WsgiDAV did so with a '?' in the location's folder)
    fails that copy: the catalog never records a file its name does not hold."""
    from castlib.backends.local import LocalBackend

    ref, dst = tmp_path / "ref", tmp_path / "dst"
    make_tree(ref, {"a": b"aaa", "b": b"bbbb"})
    dst.mkdir()
    rename = LocalBackend.rename

    def misplacing(self, src, target):
        if target == "b" and str(dst) in str(self.root):
            target = "b-cut-short"
        return rename(self, src, target)

    monkeypatch.setattr(LocalBackend, "rename", misplacing)
    report = sync(str(ref), str(dst), db_url)
    assert report.counts["copied"] == 1 and report.counts["failed"] == 1
    assert any("b: " in e and "renamed into place, yet nothing is under its name" in e
               for e in report.errors), report.errors
    cat = Catalog(db_url)
    entries = {e["path"] for e in cat.entries(cat.find_location(str(dst)).id)}
    assert "a" in entries and "b" not in entries
