"""Metadata as rsync -a keeps it: permission bits, folder and link mtimes, owners, hard links.
The oracle is rsync itself: after a sync, `rsync -ani --checksum SRC/ DST/` has nothing to do."""
import os
import shutil
import subprocess
import sysconfig

import pytest

import castlib
from castlib.catalog import Catalog
from tests.helpers import in_unprivileged_child, make_tree, run_cli

OLD = 1_000_000_000 * 10**9 + 123   # 2001, with nanoseconds


def rsync_changes(src, dst, *flags: str) -> list[str]:
    """What rsync -a would still do to make dst like src (as root, owners and groups too)."""
    proc = subprocess.run(["rsync", "-ani", "--checksum", *flags, f"{src}/", f"{dst}/"],
                          capture_output=True, text=True, check=True)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def age_folders(root) -> None:
    """Old mtimes on every folder, the root too, deepest first (after their content)."""
    folders = [dirpath for dirpath, _dirs, _files in os.walk(root)]
    for i, path in enumerate(sorted(folders, reverse=True)):
        os.utime(path, ns=(OLD + i, OLD + i))


def fidelity_tree(root):
    """Executables, private files, a set-user-ID file, a read-only folder, links with their
    own mtimes, empty folders, and folders whose mtimes are old."""
    make_tree(root, {"bin/run.sh": "#!/bin/sh\necho hi\n", "bin/tool": b"\x7fELF....",
                     "data/a.dat": b"a" * 1000, "data/deep/b.dat": b"b", "private.key": b"k",
                     "empty/": None, "ro/inside.dat": b"r", "suid": b"s"})
    os.chmod(root / "bin/run.sh", 0o755)
    os.chmod(root / "bin/tool", 0o750)
    os.chmod(root / "private.key", 0o600)
    os.chmod(root / "suid", 0o4755)
    os.chmod(root / "empty", 0o700)
    os.symlink("data/a.dat", root / "link")
    os.symlink("../a.dat", root / "data/deep/up")
    os.utime(root / "link", ns=(OLD - 7, OLD - 7), follow_symlinks=False)
    os.utime(root / "data/deep/up", ns=(OLD - 9, OLD - 9), follow_symlinks=False)
    os.chmod(root / "ro", 0o555)
    os.chmod(root, 0o750)
    age_folders(root)
    return root


def sync(ref, dst, db, **kw):
    return castlib.sync(str(ref), str(dst), db=db, **kw)


def nothing_done(counts: dict) -> bool:
    return all(v == 0 for k, v in counts.items() if k != "dry_run")


def test_after_a_sync_rsync_finds_nothing_to_do(tmp_path, db_url):
    ref, dst = fidelity_tree(tmp_path / "ref"), tmp_path / "dst"
    r = sync(ref, dst, db_url)
    assert r.counts["failed"] == 0 and r.counts["copied"] == 7
    assert rsync_changes(ref, dst) == []
    assert os.stat(dst / "suid").st_mode & 0o7777 == 0o4755
    assert os.lstat(dst / "link").st_mtime_ns == OLD - 7
    again = sync(ref, dst, db_url)
    assert nothing_done(again.counts), again.counts
    d = castlib.diff(str(ref), str(dst), db=db_url)
    assert d.value.differences == [] and d.value.mtimes_to_set == [] and d.exit_code == 0


def test_a_real_tree_the_standard_library_and_docs(tmp_path):
    """Real trees as users sync them: a part of the Python standard library (executable
    scripts among them), and /usr/share/doc with its links."""
    ref = tmp_path / "ref"
    ref.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = [os.path.join(stdlib, p) for p in ("json", "email", "encodings", "lib2to3",
                                                  "idlelib", "turtledemo", "venv", "ensurepip")]
    sources += ["/usr/share/doc"]
    sources = [s for s in sources if os.path.isdir(s)]
    subprocess.run(["cp", "-a", *sources, str(ref)], check=True)
    assert subprocess.run(["find", str(ref), "-type", "f", "-perm", "-u+x"], capture_output=True,
                          text=True).stdout, "the test tree should hold executables"
    age_folders(ref)
    dst = tmp_path / "dst"
    r = castlib.sync(str(ref), str(dst), transfers=2)
    assert r.counts["failed"] == 0
    assert rsync_changes(ref, dst) == []
    assert nothing_done(castlib.sync(str(ref), str(dst)).counts)


def test_a_permission_difference_is_fixed_without_copying(tmp_path, db_url):
    ref, dst = fidelity_tree(tmp_path / "ref"), tmp_path / "dst"
    sync(ref, dst, db_url)
    os.chmod(dst / "bin/run.sh", 0o644)
    os.chmod(dst / "data", 0o777)
    inode = os.stat(dst / "bin/run.sh").st_ino
    d = castlib.diff(str(ref), str(dst), db=db_url)
    assert sorted((x.path, x.kind) for x in d.value.differences) == [
        ("bin/run.sh", "mode"), ("data", "mode")]
    assert d.value.differences[0].as_dict()["ref"]["mode"] == "0755"
    r = sync(ref, dst, db_url)
    assert r.counts["mode_fixed"] == 2 and r.counts["copied"] == r.counts["replaced"] == 0
    assert os.stat(dst / "bin/run.sh").st_ino == inode   # the same file, not a copy
    assert rsync_changes(ref, dst) == []
    # the catalog holds what was set: trusting it for the destination finds nothing to do
    assert nothing_done(sync(ref, dst, db_url, index="ref").counts)


def test_no_perms_leaves_permission_bits_alone(tmp_path, db_url):
    ref, dst = fidelity_tree(tmp_path / "ref"), tmp_path / "dst"
    sync(ref, dst, db_url)
    os.chmod(dst / "bin/run.sh", 0o600)
    assert castlib.diff(str(ref), str(dst), db=db_url, perms=False).value.differences == []
    r = sync(ref, dst, db_url, perms=False)
    assert nothing_done(r.counts)
    assert os.stat(dst / "bin/run.sh").st_mode & 0o7777 == 0o600
    out = run_cli("diff", str(ref), str(dst), "--no-perms", db=db_url, check=0)
    assert out.stdout == ""
    out = run_cli("diff", str(ref), str(dst), db=db_url, check=1)
    assert out.stdout.split() == ["mode", "bin/run.sh"]


def test_a_folder_or_link_mtime_alone_is_no_difference_but_is_set(tmp_path, db_url):
    ref, dst = fidelity_tree(tmp_path / "ref"), tmp_path / "dst"
    sync(ref, dst, db_url)
    os.utime(dst / "data", ns=(OLD * 2, OLD * 2))
    os.utime(dst / "link", ns=(OLD * 2, OLD * 2), follow_symlinks=False)
    d = castlib.diff(str(ref), str(dst), db=db_url)
    assert d.exit_code == 0 and d.value.differences == []
    assert sorted(x.path for x in d.value.mtimes_to_set) == ["data", "link"]
    r = sync(ref, dst, db_url)
    assert r.counts["mtime_fixed"] == 2 and r.counts["copied"] == 0
    assert rsync_changes(ref, dst) == []


def test_folders_written_into_get_their_reference_mtime_back(tmp_path, db_url):
    ref, dst = fidelity_tree(tmp_path / "ref"), tmp_path / "dst"
    sync(ref, dst, db_url)
    # an extra file, then the folder's mtime as the reference has it: only --delete moves it
    (dst / "data/deep/extra.dat").write_bytes(b"x")
    stamp = os.stat(ref / "data/deep").st_mtime_ns
    os.utime(dst / "data/deep", ns=(stamp, stamp))
    (ref / "bin/new.sh").write_bytes(b"new")     # moves ref/bin's mtime: copied, then set
    r = sync(ref, dst, db_url, delete=True)
    assert r.counts["deleted"] == 1 and r.counts["copied"] == 1
    assert rsync_changes(ref, dst) == []


def test_a_read_only_folder_gets_its_content_first(open_base):
    """A plain user cannot write into a folder once it is read-only: its bits come last."""
    base, db = open_base
    ref = make_tree(os.path.join(base, "ref"), {"ro/sub/a.dat": b"a", "ro/b.dat": b"b"})
    for dirpath, _dirs, files in os.walk(base):
        os.chmod(dirpath, 0o777)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 if f.startswith("cat.sqlite") else 0o644)
    os.chmod(ref / "ro/sub", 0o555)
    os.chmod(ref / "ro", 0o555)
    dst = os.path.join(base, "dst")

    def sync_as_plain_user():
        return castlib.sync(str(ref), dst, db=db).counts

    counts = in_unprivileged_child(sync_as_plain_user)
    assert counts["failed"] == 0 and counts["copied"] == 2
    assert os.stat(os.path.join(dst, "ro")).st_mode & 0o777 == 0o555
    assert rsync_changes(ref, dst, "--no-owner", "--no-group") == []   # nobody's files


@pytest.fixture
def open_base(db_url):
    """A folder every user may enter and a catalog a plain user can write."""
    import tempfile

    base = tempfile.mkdtemp(prefix="castlib-meta-")
    os.chmod(base, 0o777)
    db = f"sqlite:///{base}/cat.sqlite" if db_url.startswith("sqlite") else db_url
    Catalog(db).close()
    from pathlib import Path

    yield Path(base), db
    for dirpath, _dirs, _files in os.walk(base):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(base)


def hard_link_tree(root):
    make_tree(root, {"a.dat": b"same bytes", "other.dat": b"other", "sub/": None})
    os.link(root / "a.dat", root / "b.dat")
    os.link(root / "a.dat", root / "sub/c.dat")
    os.chmod(root / "a.dat", 0o640)
    age_folders(root)
    return root


def inodes(root, *names):
    return [os.stat(root / n).st_ino for n in names]


def test_hard_links_are_kept_as_links_with_the_option(tmp_path, db_url):
    ref, dst = hard_link_tree(tmp_path / "ref"), tmp_path / "dst"
    r = sync(ref, dst, db_url, hard_links=True)
    assert r.counts["copied"] == 2 and r.counts["hard_links_created"] == 2
    a, b, c, other = inodes(dst, "a.dat", "b.dat", "sub/c.dat", "other.dat")
    assert a == b == c != other
    assert rsync_changes(ref, dst, "-H") == []
    assert nothing_done(sync(ref, dst, db_url, hard_links=True).counts)
    # a new name of the same file: linked too, not copied
    os.link(ref / "a.dat", ref / "sub/d.dat")
    age_folders(ref)
    r = sync(ref, dst, db_url, hard_links=True)
    assert r.counts["hard_links_created"] == 1 and r.counts["copied"] == 0
    assert inodes(dst, "sub/d.dat") == [a]
    assert rsync_changes(ref, dst, "-H") == []


def test_without_the_option_each_name_is_copied_and_with_it_relinked(tmp_path, db_url):
    ref, dst = hard_link_tree(tmp_path / "ref"), tmp_path / "dst"
    r = sync(ref, dst, db_url)
    assert r.counts["copied"] == 4 and r.counts["hard_links_created"] == 0
    assert len(set(inodes(dst, "a.dat", "b.dat", "sub/c.dat"))) == 3
    assert rsync_changes(ref, dst) == []   # without -H, rsync agrees
    r = sync(ref, dst, db_url, hard_links=True)   # a destination synced without it: relinked
    assert r.counts["hard_links_created"] == 2 and r.counts["copied"] == 0
    assert len(set(inodes(dst, "a.dat", "b.dat", "sub/c.dat"))) == 1
    assert rsync_changes(ref, dst, "-H") == []


def test_hard_links_need_the_reference_listed_in_the_run(tmp_path, db_url):
    ref = hard_link_tree(tmp_path / "ref")
    castlib.index(str(ref), db=db_url)
    out = run_cli("sync", str(ref), str(tmp_path / "dst"), "--index", "none", "--hard-links",
                  db=db_url, check=2)
    assert "hard_links: hard links are found while listing the reference" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "dst").exists()


def owned_tree(root):
    fidelity_tree(root)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(dirpath, name), 1234, 5678)
    os.lchown(root / "private.key", 4321, 8765)
    os.chmod(root / "suid", 0o6755)   # chown cleared the bits; set them again
    os.lchown(root, 1234, 5678)
    age_folders(root)
    return root


def test_owner_and_group_as_root(tmp_path, db_url):
    ref, dst = tmp_path / "ref", tmp_path / "dst"
    if os.geteuid() != 0:   # a plain user cannot give files away: refused, not half done
        make_tree(ref, {"a.dat": b"a"})
        out = run_cli("sync", str(ref), str(dst), "--owner", db=db_url, check=2)
        assert "cannot take owners" in out.stderr and not dst.exists()
        return
    owned_tree(ref)
    r = sync(ref, dst, db_url)   # without --owner: the files are root's, as rsync's would be
    assert r.counts["owner_fixed"] == 0 and os.stat(dst / "bin/run.sh").st_uid == 0
    r = sync(ref, dst, db_url, owner=True)
    assert r.counts["owner_fixed"] == 15 and r.counts["copied"] == 0
    st = os.lstat(dst / "link")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (os.stat(dst / "private.key").st_uid, os.stat(dst / "private.key").st_gid) == (4321, 8765)
    assert os.stat(dst / "suid").st_mode & 0o7777 == 0o6755   # bits set again after chown
    assert rsync_changes(ref, dst) == []
    assert nothing_done(sync(ref, dst, db_url, owner=True).counts)
    fresh = tmp_path / "fresh"
    r = sync(ref, fresh, db_url, owner=True)   # from nothing, in one run
    assert r.counts["owner_fixed"] == 15 and rsync_changes(ref, fresh) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are given as root")
def test_owners_beyond_two_to_the_31_are_given_to_links_too(tmp_path, db_url):
    """uid_t is unsigned: ids from 2**31 on (user namespaces' ranges, 4294967294 for
    nobody on some systems) are owners like others. A link's, given through the
    accelerator's chown_fd, stopped the run (OverflowError: its ids were read as C ints)."""
    ref, dst = tmp_path / "ref", tmp_path / "dst"
    make_tree(ref, {"f": b"f"})
    os.symlink("f", ref / "l")
    for name in ("f", "l"):
        os.lchown(ref / name, 3_000_000_000, 4_294_967_294)
    os.lchown(ref, 3_000_000_000, 4_294_967_294)
    r = sync(ref, dst, db_url, owner=True)
    assert r.exit_code == 0 and r.counts["owner_fixed"] == 3, (r.exit_code, r.errors)
    assert rsync_changes(ref, dst) == []


def test_owner_is_refused_where_the_destination_cannot_keep_owners(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    out = run_cli("sync", str(ref), "memory://castlib-owner-test", "--owner", "-q", db=db_url,
                  check=2)
    assert out.stderr.startswith("castlib: error: owner: memory://")
    assert "cannot take owners" in out.stderr and len(out.stderr.splitlines()) == 1


def test_an_index_sees_permission_and_content_changes_together(tmp_path, db_url):
    """One listing where a file's bits changed and another file's bytes did: both are
    recorded (the bulk update took one set of columns for all rows and failed)."""
    ref = make_tree(tmp_path / "ref", {"one.dat": b"1", "two.dat": b"2"})
    castlib.index(str(ref), db=db_url)
    cat = Catalog(db_url)
    # each way round: whichever of the two the listing meets first
    for bits, content in (("one.dat", "two.dat"), ("two.dat", "one.dat")):
        os.chmod(ref / bits, 0o600)
        (ref / content).write_bytes(b"longer")
        assert castlib.index(str(ref), db=db_url).exit_code == 0
        entries = {e["path"]: e for e in cat.entries(cat.find_location(str(ref)).id)}
        assert entries[bits]["mode"] == 0o600 and entries[content]["size"] == 6


def test_backends_lists_the_metadata_a_back_end_keeps(db_url):
    out = run_cli("backends", db=db_url, check=0).stdout
    (line,) = [l for l in out.splitlines() if l.startswith("file://")]
    for flag in ("permissions", "dir_mtimes", "link_mtimes", "hard_links"):
        assert flag in line.split()
    assert ("owner" in line.split()) == (os.geteuid() == 0)


def test_dry_run_names_the_metadata_it_would_set(tmp_path, db_url):
    ref, dst = fidelity_tree(tmp_path / "ref"), tmp_path / "dst"
    sync(ref, dst, db_url)
    os.chmod(dst / "bin/tool", 0o755)
    os.utime(dst / "data", ns=(OLD * 2, OLD * 2))
    out = run_cli("sync", str(ref), str(dst), "--dry-run", db=db_url, check=0).stdout
    assert "would set permissions of bin/tool to 0750" in out
    assert "would set mtime of data" in out
    assert os.stat(dst / "bin/tool").st_mode & 0o777 == 0o755


def whole_seconds(root) -> None:
    """Every mtime of a tree on a whole second (SFTP keeps seconds), folders last."""
    entries = []
    for dirpath, dirs, files in os.walk(root):
        entries += [os.path.join(dirpath, n) for n in files + dirs]
    for path in sorted(entries, reverse=True) + [str(root)]:
        t = os.lstat(path).st_mtime_ns // 10**9 * 10**9
        os.utime(path, ns=(t, t), follow_symlinks=False)


def test_an_sftp_destination_keeps_permissions_and_folder_mtimes(tmp_path, db_url,
                                                                 sftp_server, monkeypatch):
    import yaml

    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {sftp_server.url: sftp_server.options}}))
    monkeypatch.setenv("CASTLIB_CONFIG", str(config))
    ref = fidelity_tree(tmp_path / "ref")
    whole_seconds(ref)
    url = sftp_server.url + "/meta"
    r = castlib.sync(str(ref), url, db=db_url)
    assert r.counts["failed"] == 0 and r.counts["copied"] == 7
    # the files are the SFTP user's; a link's own mtime needs an extension: not claimed
    assert rsync_changes(ref, sftp_server.folder / "meta", "--no-owner", "--no-group",
                         "--omit-link-times") == []
    assert nothing_done(castlib.sync(str(ref), url, db=db_url).counts)
    os.chmod(sftp_server.folder / "meta/bin/tool", 0o700)
    r = castlib.sync(str(ref), url, db=db_url)
    assert r.counts["mode_fixed"] == 1 and r.counts["copied"] == 0
    assert os.stat(sftp_server.folder / "meta/bin/tool").st_mode & 0o777 == 0o750
