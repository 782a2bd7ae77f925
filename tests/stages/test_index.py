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


# -- updates of a mixed batch: some rows clear checksums, others keep them ----------------

def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


def _mixed_changes(root, names):
    """Every other file only changes mode, the others change bytes at the same size (and
    mtime): one index batch then holds both kinds of update, in the listing's order."""
    for i, name in enumerate(names):
        p = root / name
        if i % 2:
            os.chmod(p, 0o600)
        else:
            st = os.stat(p)
            p.write_bytes(p.read_bytes().upper())
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_mode_changes_and_content_changes_in_one_batch(tmp_path, db_url):
    """A batch took its columns from its first row: a mode-only change listed first kept
    the old checksum of a same-size content change (diff then said identical while the
    bytes differ); a content change listed first made the batch fail on its mode-only rows
    (and every later index with it)."""
    names = [f"f{i:02d}.dat" for i in range(20)]
    root = make_tree(tmp_path / "t", {n: f"old-{n}".encode() for n in names})
    castlib.index(str(root), db=db_url, checksum="adler32")
    _mixed_changes(root, names)
    r = castlib.index(str(root), db=db_url)   # no checksum asked: the stale ones must go
    assert r.exit_code == 0 and r.counts["changed"] == 20
    e = entries(db_url, root)
    for i, n in enumerate(names):
        if i % 2:
            assert e[n]["mode"] == 0o600 and e[n]["adler32"] == _adler(f"old-{n}".encode()), n
        else:
            assert e[n]["adler32"] is None, n
    castlib.index(str(root), db=db_url, checksum="adler32")
    e = entries(db_url, root)
    assert all(e[n]["adler32"] == _adler((root / n).read_bytes()) for n in names)


def test_sync_replaces_a_same_size_change_listed_with_mode_changes(tmp_path, db_url):
    """The sync's own index of the destination goes through the same update: a changed
    destination file must be replaced, not have its mtime "fixed"."""
    from tests.helpers import run_cli, tree_digest

    names = [f"f{i:02d}.dat" for i in range(20)]
    ref = make_tree(tmp_path / "ref", {n: f"ref-{n}".encode() for n in names})
    dst = tmp_path / "dst"
    run_cli("sync", str(ref), str(dst), db=db_url, check=0)
    _mixed_changes(dst, names)
    run_cli("sync", str(ref), str(dst), db=db_url, check=0)
    assert {p: h for p, h in tree_digest(dst).items()} == tree_digest(ref)
    run_cli("diff", str(ref), str(dst), db=db_url, check=0)
    run_cli("verify", str(ref), db=db_url, check=0)


# -- a model: whatever happens to a tree between index runs, the catalog says what is there

import hashlib  # noqa: E402
import itertools  # noqa: E402
from unittest import mock  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from castlib.backends.local import LocalBackend  # noqa: E402

NAMES = ["a.dat", "b.dat", "d/c.dat", "d/e.dat"]
_examples = itertools.count()
_open: dict[str, Catalog] = {}

steps = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.integers(0, 3)),  # create, re-create,
    st.tuples(st.just("same_size"), st.sampled_from(NAMES)),                 # or resize
    st.tuples(st.just("chmod"), st.sampled_from(NAMES), st.sampled_from([0o600, 0o640, 0o644])),
    st.tuples(st.just("delete"), st.sampled_from(NAMES)),
    st.tuples(st.just("index"), st.sampled_from([None, "adler32", "md5"])),
    st.tuples(st.just("kill"), st.integers(1, 6), st.sampled_from([None, "adler32"])),
), max_size=14)


class _Killed(BaseException):
    """Stands for a SIGKILL: what was committed stays, the rest of the run never happens."""


def _killed_after(n: int):
    walk = LocalBackend.walk

    def walk_then_die(self, on_error):
        for i, st_ in enumerate(walk(self, on_error)):
            if i == n:
                raise _Killed()
            yield st_
    return walk_then_die


def _disk(root) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st_ = os.lstat(full)
            rel = os.path.relpath(full, root)
            data = None if name in dirnames else open(full, "rb").read()
            out[rel] = ("d" if data is None else "f", 0 if data is None else st_.st_size,
                        st_.st_mtime_ns, st_.st_mode & 0o7777, data)
    return out


def _assert_catalog_is_disk(catalog, root) -> None:
    loc = catalog.find_location(str(root))
    live = {e["path"]: e for e in catalog.entries(loc.id)}
    disk = _disk(root)
    assert set(live) == set(disk)
    for path, (kind, size, mtime_ns, mode, data) in disk.items():
        e = live[path]
        got = (e["kind"], e["size"], e["mtime_ns"], e["mode"])
        assert got == (kind, size, mtime_ns, mode), path
        if data is None:
            continue
        truth = {"adler32": _adler(data), "md5": hashlib.md5(data).hexdigest(),
                 "sha256": hashlib.sha256(data).hexdigest()}
        for algo, value in truth.items():   # a checksum may be missing, never wrong
            assert e[algo] in (None, value), (path, algo)


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=steps, batch=st.sampled_from([2, 3, 20_000]))
def test_catalog_follows_any_sequence_of_changes(tmp_path, db_url, steps, batch):
    """Files created, rewritten at the same or another size, chmod-ed, deleted and created
    again, indexed with and without checksums, by runs that may be killed half-way (small
    batches: some of their writes committed): after each complete index the catalog says
    exactly what the disk holds, and no checksum it keeps is wrong."""
    if db_url not in _open:
        _open[db_url] = Catalog(db_url)
    catalog = _open[db_url]
    root = tmp_path / f"ex{next(_examples)}"
    (root / "d").mkdir(parents=True)
    clock = itertools.count(10**18, 10**9)   # each write gets an mtime of its own
    serial = itertools.count()
    start = [("write", name, 1) for name in NAMES] + [("index", "adler32")]
    with mock.patch("castlib.stages.index.BATCH", batch):
        for step in start + steps + [("index", None)]:
            op, *args = step
            path = root / args[0] if op in ("write", "same_size", "chmod", "delete") else None
            if op == "write":
                path.write_bytes(f"{next(serial)}".encode() * (args[1] + 1))
                os.utime(path, ns=(0, next(clock)))
            elif op == "same_size" and path.exists():
                path.write_bytes(bytes((c + 1) % 256 for c in path.read_bytes()))
                os.utime(path, ns=(0, next(clock)))
            elif op == "chmod" and path.exists():
                os.chmod(path, args[1])
            elif op == "delete" and path.exists():
                path.unlink()
            elif op == "index":
                r = castlib.index(str(root), db=catalog, checksum=args[0], force=True)
                assert r.exit_code == 0, r.errors
                _assert_catalog_is_disk(catalog, root)
            elif op == "kill":
                with mock.patch.object(LocalBackend, "walk", _killed_after(args[0])):
                    try:
                        castlib.index(str(root), db=catalog, checksum=args[1], force=True)
                    except _Killed:
                        pass


# -- --rehash without --checksum ----------------------------------------------------------------

def _same_size_and_mtime(path, data: bytes) -> None:
    st = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rehash_without_checksum_recomputes_the_kinds_the_location_has(tmp_path, db_url):
    """`index --rehash` alone did nothing at all: it recomputes the checksums the catalog
    holds for the location (here adler32 and md5, not sha256)."""
    import hashlib

    root = make_tree(tmp_path / "t", {"a.dat": b"original", "b.dat": b"other"})
    castlib.index(str(root), db=db_url, checksum="adler32")
    castlib.index(str(root), db=db_url, checksum="md5")
    _same_size_and_mtime(root / "a.dat", b"ORIGINAL")   # bit-rot, as far as an index sees
    r = castlib.index(str(root), db=db_url, rehash=True)
    assert r.exit_code == 0 and r.counts["hashed"] == 4   # two files, two algorithms
    e = entries(db_url, root)
    assert e["a.dat"]["adler32"] == _adler(b"ORIGINAL")
    assert e["a.dat"]["md5"] == hashlib.md5(b"ORIGINAL").hexdigest()
    assert e["a.dat"]["sha256"] is None and e["b.dat"]["adler32"] == _adler(b"other")


def test_rehash_without_checksum_of_a_location_without_any_is_refused(tmp_path, db_url):
    from tests.helpers import run_cli

    root = make_tree(tmp_path / "t", {"a.dat": b"a"})
    run_cli("index", str(root), db=db_url, check=0)
    r = run_cli("index", str(root), "--rehash", db=db_url, check=2)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "--rehash" in lines[0] and "--checksum" in lines[0], r.stderr
    assert str(root) in lines[0]


def test_fifos_and_sockets_are_counted_and_said_once_not_catalogued(tmp_path, db_url):
    """rsync -a would recreate them; castlib does not, and says so instead of nothing."""
    import socket

    root = make_tree(tmp_path / "t", {"a.dat": b"1", "sub/b.dat": b"2"})
    os.mkfifo(root / "sub" / "fifo")
    os.mkfifo(root / "fifo2")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
        r = castlib.index(str(root), db=db_url)
        assert r.counts["specials_skipped"] == 3 and r.counts["files"] == 2
        assert r.last.summary.endswith("; 3 special files skipped (2 fifo, 1 socket): castlib "
                                       "copies files, folders and links"), r.last.summary
        assert set(entries(db_url, root)) == {"a.dat", "sub", "sub/b.dat"}
        r = castlib.index(str(root), db=db_url, ignore=["sock", "fifo2"])
        assert r.counts["specials_skipped"] == 1
        assert r.last.summary.endswith("; 1 special file skipped (fifo): castlib copies files, "
                                       "folders and links"), r.last.summary
    assert castlib.index(str(tmp_path / "t" / "sub"), db=db_url).counts["specials_skipped"] == 1


@pytest.mark.parametrize("swapped", ["a", "a/b"])
def test_the_python_walk_does_not_follow_a_folder_swapped_for_a_link_mid_walk(tmp_path,
                                                                               swapped):
    """The walk castlib takes where the C accelerator does not (a PostgreSQL catalog, a
    destination's listing): a folder listed as a folder, then swapped for a link before
    its own turn (itself, or a folder above it), is said unreadable and not listed; what
    the link points to never enters the catalog as if it were here (as the C walk)."""
    from castlib.backends import open_backend

    tree = make_tree(tmp_path / "tree", {"a/b/f": b"f", "a/g": b"g", "z": b"z"})
    outside = make_tree(tmp_path / "outside", {"b/secret": b"s", "secret": b"s"})
    errors, seen = [], []
    for stat in open_backend(str(tree)).walk(lambda path, why: errors.append((path, why))):
        seen.append(stat.path)
        if stat.path == swapped:   # listed as a folder; its own listing comes later
            os.rename(tree / "a", tmp_path / "old-a")
            os.symlink(outside, tree / "a")
    assert not [p for p in seen if "secret" in p], seen
    assert errors == [(swapped, "replaced while the index ran (a link or another folder in "
                                "its path now): not listed")], errors
