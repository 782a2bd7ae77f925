"""sync safety by identity, not by spelling: overlapping trees reached through a link or a
bind mount, the destination lock under another spelling, castlib's own temporary files
told from a user's look-alikes, a reference that lost most of its files, a root that is
a link to a folder."""
import os
import subprocess
import threading
from contextlib import contextmanager

import pytest

import castlib
from castlib.catalog import Catalog
from castlib.catalog.locks import location_lock
from castlib.errors import NotFound, SafetyRefusal
from castlib.transfer import is_temp_name, temp_path
from tests.helpers import make_tree, run_cli, tree_digest


def sync(ref, dst, db, **kw):
    return castlib.sync(str(ref), str(dst), db=db, **kw)


@contextmanager
def bind_mount(source, target):
    """`mount --bind source target` for the test's duration; skips, with the reason, where
    the kernel or the container refuses it."""
    os.makedirs(target, exist_ok=True)
    r = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"mount --bind refused here: {r.stderr.strip() or r.returncode}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


# -- overlap: real paths and (device, inode), not spellings ----------------------------------

def test_a_destination_through_a_symlink_to_the_references_parent_is_refused(tmp_path, db_url):
    """`sync data/sub via/data --delete`, via -> the parent: the destination is the folder
    that holds the reference; --delete used to remove the reference's own files."""
    make_tree(tmp_path / "data", {"sub/a.dat": b"a", "sub/b.dat": b"b", "other.dat": b"o"})
    os.symlink(tmp_path, tmp_path / "via")
    before = tree_digest(tmp_path / "data")
    with pytest.raises(SafetyRefusal, match="overlap"):
        sync(tmp_path / "data" / "sub", tmp_path / "via" / "data", db_url, delete=True)
    assert tree_digest(tmp_path / "data") == before


def test_a_destination_inside_the_reference_through_a_link_is_refused(tmp_path, db_url):
    """Else each run copies the destination into itself once more (a/backup/backup/...)."""
    ref = make_tree(tmp_path / "a", {"f.dat": b"f"})
    os.symlink(ref, tmp_path / "alias")
    for dst in (tmp_path / "alias" / "backup", tmp_path / "alias"):
        with pytest.raises(SafetyRefusal, match="overlap"):
            sync(ref, dst, db_url)
    (ref / "sub").mkdir()
    for other_ref in (tmp_path / "alias", tmp_path / "alias" / "sub"):  # the other way round
        with pytest.raises(SafetyRefusal, match="overlap"):
            sync(other_ref, ref, db_url, delete=True)
    (ref / "sub").rmdir()
    assert tree_digest(ref) == {"f.dat": tree_digest(ref)["f.dat"]}


def test_overlap_through_a_bind_mount_is_refused_either_way(tmp_path, db_url):
    make_tree(tmp_path / "P", {"data/sub/a.dat": b"a", "data/keep.dat": b"k"})
    before = tree_digest(tmp_path / "P")
    with bind_mount(tmp_path / "P", tmp_path / "via"):
        # the reference inside the destination (the reported case)
        with pytest.raises(SafetyRefusal, match="overlap"):
            sync(tmp_path / "P" / "data" / "sub", tmp_path / "via" / "data", db_url,
                 delete=True)
        # the destination inside the reference, and not created yet
        with pytest.raises(SafetyRefusal, match="overlap"):
            sync(tmp_path / "via" / "data", tmp_path / "P" / "data" / "new" / "deeper", db_url)
        assert tree_digest(tmp_path / "P") == before
        # a sibling on the same mount is no overlap
        r = sync(tmp_path / "via" / "data" / "sub", tmp_path / "P" / "copy", db_url)
        assert r.counts["copied"] == 1


# -- the destination lock: one key whatever the spelling -------------------------------------

def _sync_refused_while_locked(db_url, lock_as, sync_into, ref):
    catalog = Catalog(db_url)
    try:
        loc = catalog.location(str(lock_as))
        with location_lock(catalog, loc.id, loc.url):
            r = run_cli("sync", str(ref), str(sync_into), db=db_url)
    finally:
        catalog.close()
    return r


def test_the_destination_lock_holds_under_another_spelling(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = make_tree(tmp_path / "dst", {})
    os.symlink(dst, tmp_path / "alias")
    r = _sync_refused_while_locked(db_url, dst, tmp_path / "alias", ref)
    assert r.returncode == 2 and "another run is syncing into" in r.stderr, r.stderr
    assert os.listdir(dst) == []
    # a destination not created yet: the key it has now is the key it has once created
    r = _sync_refused_while_locked(db_url, tmp_path / "alias" / "new", dst / "new", ref)
    assert r.returncode == 2 and "another run is syncing into" in r.stderr, r.stderr
    catalog = Catalog(db_url)
    try:
        loc = catalog.location(str(dst / "later"))
        with location_lock(catalog, loc.id, loc.url):
            (dst / "later").mkdir()
            r = run_cli("sync", str(ref), str(tmp_path / "alias" / "later"), db=db_url)
        assert r.returncode == 2 and "another run is syncing into" in r.stderr, r.stderr
    finally:
        catalog.close()


def test_the_destination_lock_holds_through_a_bind_mount(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    make_tree(tmp_path / "disk", {"dst/": None})
    with bind_mount(tmp_path / "disk", tmp_path / "mnt"):
        r = _sync_refused_while_locked(db_url, tmp_path / "disk" / "dst",
                                       tmp_path / "mnt" / "dst", ref)
        assert r.returncode == 2 and "another run is syncing into" in r.stderr, r.stderr
        assert os.listdir(tmp_path / "disk" / "dst") == []
        # not the same folder: no wait
        run_cli("sync", str(ref), str(tmp_path / "mnt" / "other"), db=db_url, check=0)


# -- temporary names: castlib's own only ----------------------------------------------------

LOOK_ALIKES = (".x.castlib-part-0123456789ab",                 # the old, unkeyed form
               ".y.dat.castlib-part-" + "0" * 12 + "f" * 16)    # the new form, a wrong tag


def test_a_users_file_named_like_a_castlib_temporary_is_a_file_like_any_other(tmp_path,
                                                                               db_url):
    ref = make_tree(tmp_path / "ref", {name: f"ref {name}" for name in LOOK_ALIKES})
    dst = make_tree(tmp_path / "dst", {"mine/" + name: f"dst {name}" for name in LOOK_ALIKES})
    r = sync(ref, dst, db_url)
    assert r.counts["copied"] == 2 and r.counts["temp_removed"] == 0
    for name in LOOK_ALIKES:
        assert (dst / name).read_text() == f"ref {name}"          # copied from the reference
        assert (dst / "mine" / name).read_text() == f"dst {name}"  # kept: no --delete
    catalog = Catalog(db_url)
    try:
        for root, want in ((ref, set(LOOK_ALIKES)),
                           (dst, set(LOOK_ALIKES) | {"mine/" + n for n in LOOK_ALIKES})):
            loc = catalog.find_location(str(root))
            files = {e["path"] for e in catalog.entries(loc.id) if e["kind"] == "f"}
            assert files == want
    finally:
        catalog.close()
    assert castlib.diff(str(ref), str(dst), db=db_url).value.differences[0].kind == "extra"


def test_castlibs_own_leftovers_are_removed_and_never_copied(tmp_path, db_url):
    from castlib.catalog.settings import temp_name_key

    catalog = Catalog(db_url)
    try:
        key = temp_name_key(catalog)
        assert temp_name_key(catalog) == key and len(key) >= 16   # one key per catalog
    finally:
        catalog.close()
    ours = temp_path("run/a.dat", key)
    ref = make_tree(tmp_path / "ref", {"run/a.dat": b"a", ours: b"half, in the reference"})
    dst = make_tree(tmp_path / "dst", {ours: b"half"})
    r = sync(ref, dst, db_url)
    assert r.counts["temp_removed"] == 1 and r.counts["copied"] == 1
    assert sorted(os.listdir(dst / "run")) == ["a.dat"]
    assert (ref / ours).exists()          # the reference is never written
    name = ours.rsplit("/", 1)[-1]
    assert is_temp_name(name, key)
    other = Catalog(f"sqlite:///{tmp_path / 'another-catalog.sqlite'}")
    try:   # another catalog's temporary is, to this one, a user's file (and the other way)
        other_key = temp_name_key(other)
        assert other_key != key and not is_temp_name(name, other_key)
        assert not is_temp_name(temp_path("run/a.dat", other_key).rsplit("/", 1)[-1], key)
    finally:
        other.close()


# -- a reference that lost most of its files ------------------------------------------------

def _blank_disk_over(ref):
    """What a freshly formatted disk mounted on the reference's mount point shows."""
    for dirpath, dirnames, filenames in os.walk(ref, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    (ref / "lost+found").mkdir()


def test_a_blank_disk_over_a_known_reference_stops_sync_delete(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {f"run/f{i}.dat": str(i) for i in range(3)})
    dst = tmp_path / "dst"
    run_cli("sync", str(ref), str(dst), db=db_url, check=0)
    _blank_disk_over(ref)
    before = tree_digest(dst)
    r = run_cli("sync", str(ref), str(dst), "--delete", db=db_url)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "3 of the 3 files the catalog knew" in r.stderr and "--force" in r.stderr
    assert tree_digest(dst) == before
    r = run_cli("sync", str(ref), str(dst), "--delete", "--force", db=db_url, check=0)
    assert sorted(os.listdir(dst)) == ["lost+found"]


def test_more_than_max_vanish_percent_vanished_stops_the_run(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {f"f{i:02}.dat": str(i) for i in range(20)})
    dst = tmp_path / "dst"
    sync(ref, dst, db_url)
    for i in range(11):                       # 55 % of 20
        (ref / f"f{i:02}.dat").unlink()
    (ref / "new.dat").write_bytes(b"n")       # new files do not make up for vanished ones
    before = tree_digest(dst)
    with pytest.raises(SafetyRefusal, match=r"11 of the 20 files .*55 %.*--max-vanish 50"):
        sync(ref, dst, db_url, delete=True)
    r = run_cli("index", str(ref), db=db_url)
    assert r.returncode == 2 and "--max-vanish" in r.stderr
    assert tree_digest(dst) == before
    catalog = Catalog(db_url)
    try:   # nothing marked vanished either
        assert catalog.live_count(catalog.find_location(str(ref)).id) == 20
    finally:
        catalog.close()
    r = sync(ref, dst, db_url, delete=True, max_vanish=60)
    assert r.counts["deleted"] == 11 and r.counts["copied"] == 1
    # 1 of the 10 now known: 10 %, under the threshold
    (ref / "f11.dat").unlink()
    assert sync(ref, dst, db_url, delete=True).counts["deleted"] == 1


def test_small_locations_stop_only_when_every_known_file_vanished(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a", "b.dat": b"b", "c.dat": b"c"})
    dst = tmp_path / "dst"
    sync(ref, dst, db_url)
    (ref / "a.dat").unlink()
    (ref / "b.dat").unlink()                  # 2 of 3: a small location, fine
    assert sync(ref, dst, db_url, delete=True).counts["deleted"] == 2
    (ref / "c.dat").unlink()
    (ref / "d.dat").write_bytes(b"d")         # every known file gone: refused
    with pytest.raises(SafetyRefusal, match="1 of the 1 files"):
        sync(ref, dst, db_url, delete=True)
    assert (dst / "c.dat").exists()


def test_max_vanish_is_in_the_help_and_checked(db_url):
    for command in ("sync", "index"):
        r = run_cli(command, "--help", check=0)
        assert "--max-vanish" in r.stdout
    r = run_cli("sync", "a", "b", "--max-vanish", "150", db=db_url)
    assert r.returncode == 2 and "--max-vanish" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- a root that is a link to a folder ------------------------------------------------------

def test_a_reference_whose_root_is_a_link_to_a_folder_is_followed_links_below_are_not(
        tmp_path, db_url):
    outside = make_tree(tmp_path / "outside", {"secret.dat": b"s"})
    real = make_tree(tmp_path / "real", {"a.dat": b"a", "sub/b.dat": b"b"})
    os.symlink(outside, real / "dirlink")
    os.symlink(real, tmp_path / "ref")
    r = sync(tmp_path / "ref", tmp_path / "dst", db_url)
    assert r.counts["copied"] == 2 and r.counts["links_created"] == 1
    assert tree_digest(tmp_path / "dst") == tree_digest(real)
    assert os.path.islink(tmp_path / "dst" / "dirlink")
    # a root link to a folder as the destination, too
    os.symlink(tmp_path / "dst", tmp_path / "dst-link")
    (real / "c.dat").write_bytes(b"c")
    r = sync(tmp_path / "ref", tmp_path / "dst-link", db_url)
    assert r.counts["copied"] == 1 and (tmp_path / "dst" / "c.dat").read_bytes() == b"c"


# -- a local path means what the kernel makes of it -----------------------------------------

def test_dotdot_after_a_symlink_goes_where_the_kernel_goes(tmp_path, db_url):
    """`sync S2 P/home/lnk/.. --delete`, lnk -> P/real/deep: the OS (and rsync) take the
    destination as P/real; collapsing `lnk/..` as text made it P/home, and --delete removed
    the user's thesis there."""
    make_tree(tmp_path / "P", {"real/deep/x.dat": b"x", "home/thesis.txt": b"precious"})
    os.symlink(tmp_path / "P" / "real" / "deep", tmp_path / "P" / "home" / "lnk")
    make_tree(tmp_path / "S2", {"new.txt": b"n"})
    home = tree_digest(tmp_path / "P" / "home")
    run_cli("sync", "S2", "P/home/lnk/..", "--delete", db=db_url, cwd=str(tmp_path),
                check=0)
    assert tree_digest(tmp_path / "P" / "home") == home
    assert (tmp_path / "P" / "home" / "thesis.txt").read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path / "P" / "real")) == ["new.txt"]
    assert str(castlib.location.parse_location(str(tmp_path / "P/home/lnk/.."))) == \
        "file://" + castlib.hosts.local_hostname() + str(tmp_path / "P" / "real")


@contextmanager
def tmpfs_over(target):
    """A blank tmpfs mounted on `target` (what a fresh disk mounted there shows: lost+found
    only); skips, with the reason, where the kernel or the container refuses it."""
    r = subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused here: {r.stderr.strip() or r.returncode}")
    try:
        os.mkdir(os.path.join(target, "lost+found"))
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_the_vanish_guard_holds_under_another_spelling_of_the_reference(tmp_path, db_url):
    """The guard judges a location by its history: a symlink to the reference, or a bind
    mount of it, must not be a new location without one."""
    ref = make_tree(tmp_path / "V" / "ref", {f"f{i}": str(i) for i in range(20)})
    dst = tmp_path / "V" / "dst"
    os.symlink(ref, tmp_path / "V" / "refln")
    run_cli("-q", "sync", str(ref), str(dst), "--delete", db=db_url, check=0)
    before = tree_digest(dst)
    with tmpfs_over(ref):
        for spelling in (ref, tmp_path / "V" / "refln"):
            r = run_cli("sync", str(spelling), str(dst), "--delete", db=db_url)
            assert r.returncode == 2, (spelling, r.stdout, r.stderr)
            assert "20 of the 20 files" in r.stderr and len(r.stderr.strip().splitlines()) == 1
            assert tree_digest(dst) == before


def test_the_vanish_guard_holds_through_a_bind_mount_of_the_reference(tmp_path, db_url):
    ref = make_tree(tmp_path / "V" / "ref", {f"f{i}": str(i) for i in range(20)})
    dst = tmp_path / "V" / "dst"
    run_cli("-q", "sync", str(ref), str(dst), "--delete", db=db_url, check=0)
    before = tree_digest(dst)
    with tmpfs_over(ref):   # then the alias, made now, shows the blank disk too
        with bind_mount(ref, tmp_path / "V" / "alias"):
            r = run_cli("sync", str(tmp_path / "V" / "alias"), str(dst), "--delete",
                        db=db_url)
            assert r.returncode == 2, (r.stdout, r.stderr)
            assert "20 of the 20 files" in r.stderr and len(r.stderr.strip().splitlines()) == 1
            assert tree_digest(dst) == before


def test_a_destination_mounted_below_the_reference_is_refused(tmp_path, db_url):
    """`mount --bind D R/sub; sync R D --delete`: the reference holds the destination under
    another path; each run nested D/sub/sub/... deeper, and --delete removed D's files,
    which are the reference's R/sub files."""
    make_tree(tmp_path / "R", {"rfile": b"r", "sub/.keep": b""})
    make_tree(tmp_path / "D", {"dfile": b"d"})
    (tmp_path / "R" / "sub" / ".keep").unlink()
    with bind_mount(tmp_path / "D", tmp_path / "R" / "sub"):
        before = tree_digest(tmp_path / "D")
        for args in (("R", "D"), ("R", "D", "--delete"), ("D", "R", "--delete")):
            r = run_cli("-q", "sync", *args, db=db_url, cwd=str(tmp_path))
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "mount" in r.stderr and str(tmp_path / "R" / "sub") in r.stderr
            assert tree_digest(tmp_path / "D") == before
        # a mount below the destination of something else than the reference is no overlap
        make_tree(tmp_path / "other", {"o": b"o"})
        run_cli("-q", "sync", "other", "R/copy", db=db_url, cwd=str(tmp_path), check=0)
        assert (tmp_path / "R" / "copy" / "o").read_bytes() == b"o"


def test_a_destination_under_an_overlay_below_the_reference_is_refused(tmp_path, db_url):
    """An overlay mounted below the reference whose upper (written) folder is the
    destination: its device is the overlay's, only its options name the destination."""
    make_tree(tmp_path / "R", {"rfile": b"r"})
    make_tree(tmp_path / "D", {"dfile": b"d"})
    make_tree(tmp_path / "low", {"l": b"l"})
    (tmp_path / "work").mkdir()
    (tmp_path / "R" / "ov").mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={tmp_path}/low,upperdir={tmp_path}/D,workdir={tmp_path}/work",
                        str(tmp_path / "R" / "ov")], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t overlay refused here: {r.stderr.strip() or r.returncode}")
    try:
        before = tree_digest(tmp_path / "D")
        r = run_cli("-q", "sync", "R", "D", "--delete", db=db_url, cwd=str(tmp_path))
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "overlay" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert tree_digest(tmp_path / "D") == before
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "R" / "ov")], check=True)


@pytest.mark.parametrize("when", ["while written", "before the rename"])
def test_a_temporary_removed_under_a_copy_is_said_so(tmp_path, when):
    from castlib.backends import open_backend
    from castlib.errors import VerificationFailed
    from castlib.transfer import copy_file

    make_tree(tmp_path / "src", {"f.dat": b"data"})
    (tmp_path / "dst").mkdir()
    src, dst = open_backend(str(tmp_path / "src")), open_backend(str(tmp_path / "dst"))
    key = b"k" * 32
    removed = []

    def another_process_removes(tmp=None):   # as a second run taking it for a leftover did
        if removed:
            return
        tmp = tmp or next(n for n in os.listdir(tmp_path / "dst"))
        os.unlink(tmp_path / "dst" / tmp)
        removed.append(tmp)

    hook = ({"on_bytes": lambda n: another_process_removes()} if when == "while written"
            else {"before_rename": another_process_removes})
    with pytest.raises(VerificationFailed, match="removed by another process") as info:
        copy_file(src, "f.dat", dst, "f.dat", algorithm="adler32", expected_size=4,
                  expected_checksum=None, mtime_ns=None, temp_key=key, **hook)
    assert removed and removed[0] in str(info.value) and "None" not in str(info.value)
    assert os.listdir(tmp_path / "dst") == []


# -- a stale catalog never leads a write through a link --------------------------------------

def _stale_link(tmp_path, db_url):
    """A reference and a destination synced once; then, unknown to the catalog, the
    destination's folder `a` replaced by a link to a folder outside it."""
    ref = make_tree(tmp_path / "ref", {"a/f1": b"one", "a/f3": b"three", "keep.dat": b"k"})
    dst = tmp_path / "dst"
    assert sync(ref, dst, db_url).counts["copied"] == 3
    outside = make_tree(tmp_path / "outside", {"f1": b"theirs", "f3": b"three", "x": b"x"})
    before = tree_digest(outside)
    modes = {name: os.lstat(outside / name).st_mode for name in ("f1", "f3", "x")}
    os.rename(dst / "a", tmp_path / "old-a")
    os.symlink(outside, dst / "a")
    return ref, dst, outside, before, modes


def test_a_folder_that_became_a_link_is_not_written_through(tmp_path, db_url):
    """--index ref trusts the catalog for the destination: a folder there that became a
    link to another folder is no way out of the destination. Nothing is made, copied,
    chmod-ed, re-timed or deleted below it; one line says where and why; the rest of the
    sync is done."""
    ref, dst, outside, before, modes = _stale_link(tmp_path, db_url)
    (ref / "a" / "new").mkdir()
    (ref / "a" / "new" / "f4").write_bytes(b"four")
    (ref / "a" / "f5").write_bytes(b"five")
    os.chmod(ref / "a" / "f1", 0o700)
    os.utime(ref / "a" / "f3", (1e9, 1e9))
    os.utime(ref / "a", (1e9, 1e9))
    (ref / "b.dat").write_bytes(b"b")
    r = run_cli("sync", "--index", "ref", "--delete", "--json", str(ref), str(dst), db=db_url)
    assert r.returncode == 1, r.stderr
    line = [l for l in r.stderr.splitlines() if l.startswith("castlib: a: ")]
    assert line == ["castlib: a: a link on the destination now, not a folder: 5 planned "
                    "entries below it left alone (the catalog is stale here: list the "
                    "destination again, e.g. castlib index DST)"], r.stderr
    assert tree_digest(outside) == before
    assert {n: os.lstat(outside / n).st_mode for n in modes} == modes
    assert os.lstat(outside / "f3").st_mtime != 1e9
    assert (dst / "b.dat").read_bytes() == b"b"    # the rest of the sync went on
    assert os.readlink(dst / "a") == str(outside)
    # the next sync lists the destination again, and sees a type conflict, not a folder
    r = run_cli("sync", "--force", str(ref), str(dst), db=db_url)
    assert "a: type conflict: reference has a folder, destination a link" in r.stderr
    assert tree_digest(outside) == before


def test_a_folder_swapped_for_a_link_after_the_look_is_not_written_through(
        tmp_path, db_url, monkeypatch):
    """The race the look before writing leaves open: whoever can write in the destination
    (with --owner as root, the owner of a folder synced) swaps a folder for a link to
    another place after castlib looked and before it writes. Each copy, rename, chmod and
    re-time below it is refused (the local back-end reaches each folder from the root
    without following a link), said, and counted failed; the place the link points to
    is left exactly as it was (before: the copies landed there, over its files)."""
    from castlib.stages.sync import SyncStage

    ref = make_tree(tmp_path / "ref", {"a/f1": b"one", "a/sub/f2": b"two", "keep.dat": b"k"})
    dst = tmp_path / "dst"
    assert sync(ref, dst, db_url).counts["copied"] == 3
    outside = make_tree(tmp_path / "outside", {"f1": b"theirs", "sub/f2": b"theirs too"})
    before = tree_digest(outside)
    modes = {name: os.lstat(outside / name).st_mode for name in ("f1", "sub", "sub/f2")}
    (ref / "a" / "f1").write_bytes(b"one, changed")
    (ref / "a" / "sub" / "f2").write_bytes(b"two, changed")
    (ref / "a" / "f3").write_bytes(b"three")
    os.chmod(ref / "a" / "sub", 0o700)
    (ref / "keep.dat").write_bytes(b"k, changed")
    looked = SyncStage._keep_out_of_links

    def look_then_swap(self, plan):
        looked(self, plan)   # the destination as it was: nothing to keep out of
        os.rename(dst / "a", tmp_path / "old-a")
        os.symlink(outside, dst / "a")

    monkeypatch.setattr(SyncStage, "_keep_out_of_links", look_then_swap)
    r = sync(ref, dst, db_url)
    assert tree_digest(outside) == before
    assert {n: os.lstat(outside / n).st_mode for n in modes} == modes
    assert r.exit_code == 1 and r.counts["failed"] >= 3, r.counts
    assert (dst / "keep.dat").read_bytes() == b"k, changed"   # the rest of the sync was done
    assert os.readlink(dst / "a") == str(outside)
    assert not [p for p in outside.rglob("*") if "castlib" in p.name]


def test_a_source_folder_swapped_for_a_link_is_not_read_through(tmp_path, db_url):
    """The reference side of the same race: a folder of the reference, listed into the
    catalog, swapped for a link to a folder the syncing user may read and its owner may
    not, holding a file of the same name, size and mtime (all of which the one who swaps
    can see and copy). The sync trusts the catalog (--index none) and reads: the file
    is refused as a link, not copied under the name of a file of the one who swapped."""
    ref = make_tree(tmp_path / "ref", {"a/f": b"mine, 16 bytes.", "keep.dat": b"k"})
    secret = make_tree(tmp_path / "secret", {"f": b"theirs, 16 byte"})
    os.utime(ref / "a" / "f", ns=(1_600_000_000 * 10**9,) * 2)
    os.utime(secret / "f", ns=(1_600_000_000 * 10**9,) * 2)
    castlib.index(str(ref), db=db_url)
    os.rename(ref / "a", tmp_path / "old-a")
    os.symlink(secret, ref / "a")
    dst = tmp_path / "dst"
    r = sync(ref, dst, db_url, index="none")
    assert (dst / "keep.dat").read_bytes() == b"k"
    assert not (dst / "a" / "f").exists()
    assert r.counts["failed"] == 1 and any("a link now" in e for e in r.errors), r.errors


@pytest.mark.parametrize("chmod_by", ["fchmodat2", "proc"])
def test_local_writes_below_a_link_are_refused_and_a_chmod_of_a_link_leaves_its_target(
        tmp_path, chmod_by, monkeypatch):
    """The local back-end's own guarantee, one operation at a time: below its root
    nothing is made, written, renamed, linked, re-timed, chmod-ed, chowned, removed or
    looked at through a link, and a link where a file was keeps its target's bits as they
    are. chmod both
    ways: the kernel's fchmodat2 (Linux 6.6, through the C accelerator), and, where
    there is none, the entry opened without following it and changed through /proc."""
    from castlib.backends import local, open_backend
    from castlib.backends.base import LINK
    from castlib.errors import StorageError

    if chmod_by == "fchmodat2":
        from castlib._accel import chmod_nofollow   # (built by the install)

        monkeypatch.setattr(local, "_fchmodat2", chmod_nofollow)
    else:
        monkeypatch.setattr(local, "_fchmodat2", False)

    dst = make_tree(tmp_path / "dst", {"f": b"f", "real/g": b"g"})
    outside = make_tree(tmp_path / "outside", {"g": b"theirs", "secret": b"s"})
    os.chmod(outside / "secret", 0o600)
    before = tree_digest(outside)
    os.symlink(outside, dst / "a")
    os.symlink(outside / "secret", dst / "lnk")
    b = open_backend(str(dst))
    attempts = {
        "open_write": lambda: b.open_write("a/new").close(),
        "mkdir": lambda: b.mkdir("a/deeper"),
        "rename into": lambda: b.rename("f", "a/g"),
        "rename out of": lambda: b.rename("a/g", "stolen"),
        "symlink": lambda: b.symlink("a/l", "/etc/passwd"),
        "hard_link": lambda: b.hard_link("a/h", "f"),
        "set_mtime": lambda: b.set_mtime("a/g", 10**18),
        "chmod below": lambda: b.chmod("a/g", 0o777),
        "chmod of a link": lambda: b.chmod("lnk", 0o666),
        "delete": lambda: b.delete("a/g"),
        "open_read below": lambda: b.open_read("a/secret").close(),
        "open_read of a link": lambda: b.open_read("lnk").close(),
        "stat below": lambda: b.stat("a/secret"),   # (its size, mtime, owner: not told)
        "chown below": lambda: b.chown("a/g", 1234, 1234),
    }
    for what, attempt in attempts.items():
        with pytest.raises(StorageError, match="a link now") as info:
            attempt()
        assert "Traceback" not in str(info.value), what
    assert tree_digest(outside) == before
    assert os.stat(outside / "secret").st_mode & 0o777 == 0o600
    assert sorted(os.listdir(dst)) == ["a", "f", "lnk", "real"]
    b.mkdir("real/deeper")   # the same calls where no link is in the way: done
    b.chmod("real/g", 0o640)
    assert b.stat("real/g").size == 1 and b.stat("lnk").kind == LINK
    assert b.stat("lnk").link_target == str(outside / "secret")
    assert b.stat("real/none") is None and b.stat("f/below-a-file") is None
    assert os.stat(dst / "real" / "g").st_mode & 0o777 == 0o640 and (dst / "real/deeper").is_dir()
    # the way asked for is the way taken (a kernel before 6.6 turns fchmodat2 off)
    assert bool(local._fchmodat2) == (chmod_by == "fchmodat2"), os.uname().release


def test_a_deletion_below_a_folder_that_became_a_link_deletes_nothing(tmp_path, db_url):
    ref, dst, outside, before, _ = _stale_link(tmp_path, db_url)
    os.remove(ref / "a" / "f1")
    os.remove(ref / "keep.dat")
    r = sync(ref, dst, db_url, index="ref", delete=True)
    assert r.counts["deleted"] == 1 and not (dst / "keep.dat").exists()
    assert r.counts["failed"] == 2 and tree_digest(outside) == before   # a/f1, and a's mtime


def test_a_file_that_became_a_link_does_not_pass_its_metadata_on(tmp_path, db_url):
    """A file whose bits alone differ is chmod-ed in place; if it became a link to a file
    outside, a chmod would change that file's bits (chmod follows links)."""
    ref = make_tree(tmp_path / "ref", {"f": b"data", "g": b"g"})
    dst = tmp_path / "dst"
    sync(ref, dst, db_url)
    victim = make_tree(tmp_path / "outside", {"victim": b"data"}) / "victim"
    os.chmod(victim, 0o600)
    os.remove(dst / "f")
    os.symlink(victim, dst / "f")
    os.chmod(ref / "f", 0o755)
    os.chmod(ref / "g", 0o700)
    r = sync(ref, dst, db_url, index="ref")
    assert r.counts["mode_fixed"] == 1 and os.lstat(dst / "g").st_mode & 0o777 == 0o700
    assert os.lstat(victim).st_mode & 0o777 == 0o600
    assert r.counts["failed"] == 1
    assert any(e.startswith("f: a link on the destination now, not the file the catalog has")
               for e in r.errors), r.errors


def test_a_link_where_the_catalog_has_nothing_is_not_made_into_a_folder_through(tmp_path,
                                                                               db_url):
    """The catalog has no `a` on the destination, which has a link `a` by now: making the
    folder a (mkdir -p finds it there) and then a/new would go through the link. The
    folder is looked at as it is made: nothing deeper is made, nothing copied below it."""
    ref = make_tree(tmp_path / "ref", {"keep.dat": b"k"})
    dst = tmp_path / "dst"
    sync(ref, dst, db_url)
    outside = make_tree(tmp_path / "outside", {"x": b"x"})
    os.symlink(outside, dst / "a")
    make_tree(ref, {"a/new/deeper/f": b"f", "a/g": b"g", "b/h": b"h"})
    r = sync(ref, dst, db_url, index="ref")
    assert os.listdir(outside) == ["x"]
    assert r.counts["copied"] == 1 and (dst / "b" / "h").read_bytes() == b"h"
    assert r.errors == ["a: a link on the destination now, not a folder: 4 planned entries "
                        "below it left alone (the catalog is stale here: list the destination "
                        "again, e.g. castlib index DST)"]


@pytest.mark.skipif(os.geteuid() != 0, reason="--owner takes root")
def test_owners_are_not_given_through_a_folder_that_became_a_link(tmp_path, db_url):
    """--owner asks both sides of every entry the catalog has, planned or not: a folder
    that became a link, with nothing planned below it, is no way to the files it points to
    (lchown follows the links above the last name)."""
    ref = make_tree(tmp_path / "ref", {"a/f": b"f", "keep.dat": b"k"})
    dst = tmp_path / "dst"
    sync(ref, dst, db_url)
    victim = make_tree(tmp_path / "outside", {"f": b"theirs"}) / "f"
    os.rename(dst / "a", tmp_path / "old-a")
    os.symlink(victim.parent, dst / "a")
    os.chown(ref / "a" / "f", 1234, 5678)
    os.chown(ref / "keep.dat", 1234, 5678)
    r = sync(ref, dst, db_url, index="ref", owner=True)
    st = os.lstat(victim)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.lstat(dst / "keep.dat").st_uid == 1234 and r.counts["owner_fixed"] == 1
    assert [e for e in r.errors if e.startswith("a: ")] == [
        "a: a link on the destination now, not a folder: owners below it left alone (the "
        "catalog is stale here: list the destination again, e.g. castlib index DST)"]


def test_a_hard_link_to_a_file_below_a_folder_that_became_a_link_is_said_undone(tmp_path,
                                                                                 db_url):
    """--hard-links: a new name of a file whose first name lies below a folder that became
    a link is not linked through it; it is not silently left out either: it fails, one
    line, as a name whose first name failed does."""
    ref = make_tree(tmp_path / "ref", {"a/f": b"one", "keep.dat": b"k"})
    dst = tmp_path / "dst"
    sync(ref, dst, db_url, hard_links=True)
    outside = make_tree(tmp_path / "outside", {"f": b"theirs"})
    os.rename(dst / "a", tmp_path / "old-a")
    os.symlink(outside, dst / "a")
    (ref / "b").mkdir()
    os.link(ref / "a" / "f", ref / "b" / "g")
    os.link(ref / "a" / "f", ref / "a" / "h")   # a new name below the link too
    r = sync(ref, dst, db_url, index="ref", hard_links=True)
    assert os.listdir(outside) == ["f"]
    assert (dst / "b" / "g").exists() or [e for e in r.errors if e.startswith("b/g: ")] == [
        "b/g: not linked: a/f (the same file) is below a folder that is no folder on the "
        "destination now"], r.errors


@pytest.mark.skipif(os.geteuid() != 0, reason="--owner takes root")
def test_owners_are_not_given_through_a_link_in_a_type_conflict(tmp_path, db_url):
    """A fresh listing that finds a link where the reference has a folder reports a type
    conflict; --owner then asked both sides of each entry below that folder, the
    destination's through the link, and gave the files it points to away."""
    ref = make_tree(tmp_path / "ref", {"a/f": b"f", "keep.dat": b"k"})
    victim = make_tree(tmp_path / "outside", {"f": b"theirs"}) / "f"
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(victim.parent, dst / "a")
    os.chown(ref / "a" / "f", 1234, 5678)
    r = sync(ref, dst, db_url, owner=True)
    st = os.lstat(victim)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert r.errors == ["a: type conflict: reference has a folder, destination a link; use "
                        "--delete to replace it"]


def test_a_source_file_swapped_for_a_fifo_is_refused_not_waited_on(tmp_path, db_url):
    """A file of the reference swapped for a fifo after it was listed: the sync read it
    as a file, and the open of a fifo waits for a writer, so the sync hung (and a
    SIGTERM did not end it). It is refused, said in one line, counted failed; the rest
    is copied. (A writer opens the fifo after a while so that the old code ends.)"""
    import threading

    ref = make_tree(tmp_path / "ref", {"f1": b"one", "f2": b"two", "f3": b"three"})
    castlib.index(str(ref), db=db_url)
    os.unlink(ref / "f2")
    os.mkfifo(ref / "f2")
    done = threading.Event()

    def unblock():
        if not done.wait(20):
            with open(ref / "f2", "wb") as w:
                w.write(b"two")

    threading.Thread(target=unblock, daemon=True).start()
    dst = tmp_path / "dst"
    try:
        r = sync(ref, dst, db_url, index="none")
    finally:
        done.set()
    assert r.exit_code == 1 and r.counts["failed"] == 1, r.counts
    assert any("fifo now" in e and "Traceback" not in e for e in r.errors), r.errors
    assert (dst / "f1").read_bytes() == b"one" and (dst / "f3").read_bytes() == b"three"
    assert not (dst / "f2").exists()


@pytest.mark.parametrize("perms", [True, False])
def test_a_temporary_is_not_readable_by_others_while_it_is_written(tmp_path, db_url,
                                                                   monkeypatch, perms):
    """A file only its owner may read, copied: its temporary was made 0666 less the
    umask (0644) and its bits set only before the rename, so anyone who could list the
    destination folder could open the temporary while the bytes went in and read them
    all. It is made 0600; its bits come before the rename, as before (--no-perms: the
    bits a new file gets, 0666 less the umask, as before)."""
    from castlib import transfer

    ref = make_tree(tmp_path / "ref", {"secret": b"s" * 1000})
    os.chmod(ref / "secret", 0o600)
    seen = []
    stream = transfer._stream

    def look_while_written(src, src_path, dst, tmp, *a, **kw):
        out = stream(src, src_path, dst, tmp, *a, **kw)
        seen.append(dst.stat(tmp).mode & 0o777)   # written: the bytes are all there
        return out

    monkeypatch.setattr(transfer, "_stream", look_while_written)
    old = os.umask(0o022)
    try:
        r = sync(tmp_path / "ref", tmp_path / "dst", db_url, perms=perms)
    finally:
        os.umask(old)
    assert r.counts["copied"] == 1, r.errors
    assert seen == [0o600]
    assert os.stat(tmp_path / "dst" / "secret").st_mode & 0o777 == (0o600 if perms else 0o644)


def test_a_file_swapped_in_before_the_owners_are_given_gets_no_set_id_bits(
        tmp_path, db_url, monkeypatch):
    """--owner as root: a set-user-ID file of root's, in a folder of a user's. The user
    swaps in a file of their own under its name after the copy, before the owners are
    given: the sync gave it to root and set its set-user-ID bit again (after the chown
    that clears it): the user's program, run as root by anyone. A file owned by neither
    the reference's owner nor the syncing user keeps its owner given, not its set-ID
    bits, and that is said."""
    from castlib.stages.sync import SyncStage

    ref = make_tree(tmp_path / "ref", {"a/su": b"root's program", "a/plain": b"p"})
    os.chown(ref / "a", 1234, 1234)
    os.chmod(ref / "a" / "su", 0o4755)
    dst = tmp_path / "dst"
    assert sync(ref, dst, db_url, owner=True).exit_code == 0
    assert os.stat(dst / "a" / "su").st_mode & 0o7777 == 0o4755
    (ref / "a" / "plain").write_bytes(b"changed")
    settle = SyncStage._settle_owners

    def swap_then_settle(self):
        os.unlink(dst / "a" / "su")   # the user may: the folder is theirs
        (dst / "a" / "su").write_bytes(b"the user's program")
        os.chown(dst / "a" / "su", 1234, 1234)
        os.chmod(dst / "a" / "su", 0o755)
        settle(self)

    monkeypatch.setattr(SyncStage, "_settle_owners", swap_then_settle)
    r = sync(ref, dst, db_url, owner=True)
    st = os.lstat(dst / "a" / "su")
    assert not (st.st_uid == 0 and st.st_mode & 0o6000), oct(st.st_mode)
    assert r.exit_code == 1 and any(e.startswith("a/su: ") and "set-ID" in e
                                    for e in r.errors), r.errors
    assert (dst / "a" / "plain").read_bytes() == b"changed"


def test_a_users_own_file_gets_no_set_group_id_bit_of_a_group_not_theirs(
        tmp_path, db_url, monkeypatch):
    """The same swap where the reference's file is the user's own, set-group-ID to a
    group of which they need not be: their program swapped in would have been given that
    group and the bit. It gets the group, not the bit."""
    from castlib.stages.sync import SyncStage

    ref = make_tree(tmp_path / "ref", {"a/sg": b"the group's program", "a/plain": b"p"})
    os.chown(ref / "a", 1234, 1234)
    os.chown(ref / "a" / "sg", 1234, 4321)
    os.chmod(ref / "a" / "sg", 0o2755)
    dst = tmp_path / "dst"
    assert sync(ref, dst, db_url, owner=True).exit_code == 0
    (ref / "a" / "plain").write_bytes(b"changed")
    settle = SyncStage._settle_owners

    def swap_then_settle(self):
        os.unlink(dst / "a" / "sg")
        (dst / "a" / "sg").write_bytes(b"the user's program")
        os.chown(dst / "a" / "sg", 1234, 1234)
        settle(self)

    monkeypatch.setattr(SyncStage, "_settle_owners", swap_then_settle)
    r = sync(ref, dst, db_url, owner=True)
    st = os.lstat(dst / "a" / "sg")
    assert not (st.st_gid == 4321 and st.st_mode & 0o2000), oct(st.st_mode)
    assert r.exit_code == 1 and any(e.startswith("a/sg: ") for e in r.errors), r.errors


def test_a_users_set_user_id_program_is_never_roots_with_the_bit_before_its_owner(
        tmp_path, db_url, monkeypatch):
    """--owner as root: a user's own set-user-ID program (theirs to make) is copied as
    root's. Its bits were set under the temporary name, so from its rename to the owners'
    pass (the rest of the copies, the metadata) it was a set-user-ID program of root's,
    which its user, who wrote it, could run as root. As rsync does, the set-ID bits of a
    file come with its owner: root's own set-ID files too, and bits that alone differed."""
    from castlib.stages.sync import SyncStage

    ref = make_tree(tmp_path / "ref", {"a/su": b"the user's program", "a/sg": b"g",
                                       "a/old": b"o", "roots": b"root's program"})
    os.chown(ref / "a", 1234, 1234)
    for name, mode in (("su", 0o4755), ("sg", 0o2755), ("old", 0o755)):
        os.chown(ref / "a" / name, 1234, 4321 if name == "sg" else 1234)
        os.chmod(ref / "a" / name, mode)
    os.chmod(ref / "roots", 0o6755)
    dst = tmp_path / "dst"
    assert sync(ref, dst, db_url).exit_code == 0   # without --owner: root's, as rsync's
    os.chmod(dst / "a" / "old", 0o755)
    os.chmod(ref / "a" / "old", 0o4755)   # the bit alone differs now
    before_owners = {}
    settle = SyncStage._settle_owners

    def look_then_settle(self):
        for name in ("a/su", "a/sg", "a/old"):
            st = os.stat(dst / name)
            before_owners[name] = (st.st_uid, st.st_mode & 0o7777)
        settle(self)

    monkeypatch.setattr(SyncStage, "_settle_owners", look_then_settle)
    os.unlink(dst / "a" / "su")
    os.unlink(dst / "a" / "sg")
    r = sync(ref, dst, db_url, owner=True)
    assert r.exit_code == 0, r.errors
    assert all(not (uid == 0 and mode & 0o6000) for uid, mode in before_owners.values()), \
        before_owners
    assert subprocess.run(["rsync", "-ani", "--checksum", f"{ref}/", f"{dst}/"],
                          capture_output=True, text=True, check=True).stdout.split() == []
    monkeypatch.setattr(SyncStage, "_settle_owners", settle)
    counts = sync(ref, dst, db_url, owner=True).counts
    assert counts["mode_fixed"] == counts["owner_fixed"] == 0, counts


@pytest.mark.parametrize("swapped_in", ["file", "link"])
def test_a_file_swapped_in_between_the_look_and_the_chown_is_left_as_it_is(
        tmp_path, db_url, monkeypatch, swapped_in):
    """--owner as root: a new copy of a set-group-ID file (group 4321) in a folder of a
    user's is root's when the owners are given; the sync looks at it (root's: the file
    it wrote), then gives it owner, group and bits. A user who swaps in their own
    program in the moment between the look and the chown got it that group and the
    set-group-ID bit: the chown and the bits went by name. They go to the entry looked
    at, held open: the one swapped in is left as it is, and that is said. A link swapped
    in is not followed, nor given the owner either."""
    from castlib.backends.local import LocalBackend
    from castlib.stages.sync import SyncStage

    ref = make_tree(tmp_path / "ref", {"a/sg": b"the group's program"})
    os.chown(ref / "a", 1234, 1234)
    os.chown(ref / "a" / "sg", 1234, 4321)
    os.chmod(ref / "a" / "sg", 0o2755)
    dst = tmp_path / "dst"
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's")
    settling = threading.Event()
    settle, stat = SyncStage._settle_owners, LocalBackend.stat

    def settle_flagged(self):
        settling.set()
        settle(self)

    def stat_then_swap(self, path):
        st = stat(self, path)
        if settling.is_set() and path == "a/sg" and self.root == str(dst):
            os.unlink(dst / "a" / "sg")   # the user may: the folder is theirs
            if swapped_in == "link":
                os.symlink(victim, dst / "a" / "sg")
                os.lchown(dst / "a" / "sg", 1234, 1234)
            else:
                (dst / "a" / "sg").write_bytes(b"the user's program")
                os.chown(dst / "a" / "sg", 1234, 1234)
                os.chmod(dst / "a" / "sg", 0o755)
        return st

    monkeypatch.setattr(SyncStage, "_settle_owners", settle_flagged)
    monkeypatch.setattr(LocalBackend, "stat", stat_then_swap)
    r = sync(ref, dst, db_url, owner=True)
    st = os.lstat(dst / "a" / "sg")
    assert (st.st_uid, st.st_gid) == (1234, 1234), (st.st_uid, st.st_gid)
    assert not st.st_mode & 0o6000, oct(st.st_mode)
    assert os.stat(victim).st_uid == 0 and os.stat(victim).st_gid == 0
    assert r.exit_code == 1 and any(
        e.startswith("a/sg: cannot set owner: another entry is there now") for e in r.errors), \
        r.errors


@pytest.mark.parametrize("hard_links", [False, True])
def test_a_hard_link_to_a_file_outside_put_in_before_the_owners_keeps_its_owner(
        tmp_path, db_url, monkeypatch, hard_links):
    """--owner as root: a user replaces the new copy of their set-user-ID program, in a
    folder of theirs, by a hard link to a file of root's outside the destination (one
    they may write: fs.protected_hardlinks lets them link it). Root's, it looked like
    the file the run wrote, and the owners' pass gave it to the user, with the bit: a
    file that was never the tree's. A file with a name the reference's has not keeps
    its owner, and that is said."""
    from castlib.stages.sync import SyncStage

    ref = make_tree(tmp_path / "ref", {"a/su": b"the user's program", "a/one": b"1"})
    os.link(ref / "a" / "one", ref / "a" / "two")   # (names of one file, for -H)
    for entry in ("a", "a/su", "a/one"):
        os.chown(ref / entry, 1234, 1234)
    os.chmod(ref / "a" / "su", 0o4755)
    dst = tmp_path / "dst"
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's")
    os.chmod(victim, 0o666)
    settle = SyncStage._settle_owners

    def link_then_settle(self):
        os.unlink(dst / "a" / "su")   # the user may: the folder is theirs
        os.link(victim, dst / "a" / "su")
        settle(self)

    monkeypatch.setattr(SyncStage, "_settle_owners", link_then_settle)
    r = sync(ref, dst, db_url, owner=True, hard_links=hard_links)
    st = os.stat(victim)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o666), \
        (st.st_uid, st.st_gid, oct(st.st_mode))
    assert r.exit_code == 1 and [e for e in r.errors if e.startswith("a/su: ")] and \
        not [e for e in r.errors if not e.startswith("a/su: ")], r.errors
    st = os.stat(dst / "a" / "two")
    assert (st.st_uid, st.st_nlink) == (1234, 2 if hard_links else 1)


def test_the_owner_is_given_to_the_entry_as_it_was_looked_at(tmp_path):
    """Backend.chown with `was` and `mode`: the entry looked at gets owner, group and its
    bits again; another found there (other kind, owner, size) is left as it is; a link's
    own owner changes, not its target's."""
    from castlib.backends import open_backend
    from castlib.errors import StorageError

    (tmp_path / "f").write_bytes(b"x")
    os.chmod(tmp_path / "f", 0o755)
    (tmp_path / "target").write_bytes(b"t")
    os.symlink("target", tmp_path / "l")
    b = open_backend(str(tmp_path))
    seen = b.stat("f")
    b.chown("f", 1234, 4321, was=seen, mode=0o2755)
    st = os.stat(tmp_path / "f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 4321, 0o2755)
    (tmp_path / "f").write_bytes(b"longer now")
    with pytest.raises(StorageError, match="another entry is there now"):
        b.chown("f", 0, 0, was=seen, mode=0o4755)   # (seen: before it grew)
    st = os.stat(tmp_path / "f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 4321, 0o2755)
    b.chown("l", 1234, 4321, was=b.stat("l"))
    assert (os.lstat(tmp_path / "l").st_uid, os.lstat(tmp_path / "l").st_gid) == (1234, 4321)
    assert (os.stat(tmp_path / "target").st_uid, os.stat(tmp_path / "target").st_gid) == (0, 0)
    b.chown("", 1234, 1234, was=b.stat(""))
    assert os.stat(tmp_path).st_uid == 1234


def test_a_hard_link_swapped_in_after_the_look_is_another_entry_however_like_it(tmp_path):
    """Backend.chown with `was`: a user who may write a file of root's (and so link it:
    fs.protected_hardlinks) gives it the size, and their file in the reference the mtime
    and bits, of the copy the run will look at; swapped in as a hard link between the look
    and the chown, it matched all that was compared, and was given away. Its other name
    tells it apart: the copy looked at had one."""
    from castlib.backends import open_backend
    from castlib.errors import StorageError

    (tmp_path / "dst").mkdir()
    copy, victim = tmp_path / "dst" / "copy", tmp_path / "victim"
    for path in (copy, victim):
        path.write_bytes(b"same size")
        os.chmod(path, 0o666)
        os.utime(path, ns=(10**18, 10**18))
    b = open_backend(str(tmp_path / "dst"))
    seen = b.stat("copy")
    os.unlink(copy)
    os.link(victim, copy)
    with pytest.raises(StorageError, match="another entry is there now"):
        b.chown("copy", 1234, 1234, was=seen, mode=0o4666)
    st = os.stat(victim)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o666)


def test_an_aborted_local_write_leaves_nothing_behind_in_the_back_end(tmp_path):
    """A copy given up (its write aborted, then its temporary removed, as copy_file does)
    leaves no file and no name in the back-end's set of private temporaries (a long-lived
    worker's back-end collected one for every failed copy)."""
    from castlib.backends import open_backend

    b = open_backend(str(tmp_path))
    stream = b.open_write(".f.tmp")
    stream.write(b"half")
    stream.abort()
    with pytest.raises(NotFound):
        b.delete(".f.tmp")   # (copy_file's cleanup, after the abort removed it)
    assert os.listdir(tmp_path) == [] and b._private == set()
