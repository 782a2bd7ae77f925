"""The index's C accelerator (castlib/_accel.c, catalog/accel.py) writes exactly what the
pure-Python path writes, every column of every table, fresh and on every re-index, on the
trees an attacker or an unlucky user makes: names that are not UTF-8 or hold '%' or a
newline, links (dangling, looping, to folders, with odd targets), special files, an
unreadable folder, castlib's own temporaries and names that only look like them, very
deep trees and paths longer than the kernel takes. The Python path runs with
CASTLIB_NO_ACCEL=1; the C one is checked to have run."""
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import castlib
from castlib.catalog import Catalog
from castlib.catalog import accel
from castlib.catalog.paths import to_catalog
from castlib.catalog.settings import TEMP_NAME_KEY
from castlib.errors import SafetyRefusal
from castlib.stages.index import IndexStage
from castlib.transfer import temp_path
from tests.catalog.test_lite import _dump
from tests.helpers import in_unprivileged_child, make_tree

built = accel.why_not(honour_env=False)
# CASTLIB_REQUIRE_ACCEL=1 (scripts/test) fails the session instead (conftest.py)
pytestmark = pytest.mark.skipif(built is not None, reason=f"no accelerator: {built}")


@pytest.fixture
def fast_runs(monkeypatch):
    """How many indexes took the C path (whatever CASTLIB_NO_ACCEL the session has: the
    tests set it where they want the Python path)."""
    monkeypatch.delenv("CASTLIB_NO_ACCEL", raising=False)
    runs = []
    original = IndexStage._index_fast

    def counted(self, *args, **kwargs):
        runs.append(self.params.location)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexStage, "_index_fast", counted)
    return runs


def _catalogs(base, key: bytes):
    """A catalog per path, sharing one temporary-name key (castlib's temporaries are
    told by a tag made with it)."""
    dbs = {}
    for name in ("py", "c"):
        dbs[name] = f"sqlite:///{base}/{name}.sqlite"
        with Catalog(dbs[name]) as cat:
            cat.add_setting(TEMP_NAME_KEY, key.hex())
    return dbs


def _index_both(dbs, root, **params):
    """The same index on both paths; (py outcome, c outcome) as (counts, errors, summary)
    or the refusal's text."""
    out = []
    saved = os.environ.get("CASTLIB_NO_ACCEL")   # a session run with it set keeps it
    try:
        for name in ("py", "c"):
            os.environ["CASTLIB_NO_ACCEL"] = "1" if name == "py" else ""
            try:
                r = castlib.index(str(root), db=dbs[name], **params)
                out.append((r.counts, r.last.errors, r.last.summary,
                            sorted(r.value.leftover_temp), r.value.unlisted))
            except SafetyRefusal as exc:
                out.append(str(exc))
    finally:
        if saved is None:
            os.environ.pop("CASTLIB_NO_ACCEL", None)
        else:
            os.environ["CASTLIB_NO_ACCEL"] = saved
    return out


def _same(base):
    py, c = _dump(os.path.join(base, "py.sqlite")), _dump(os.path.join(base, "c.sqlite"))
    assert py["entries"], "nothing indexed"
    assert py == c


def _hostile_tree(root, key):
    """The tree, and the name of a folder named as castlib's temporary."""
    root = make_tree(root, {"a.dat": b"1", "sub/b.dat": b"22", "sub/deep/c": b"3",
                            "empty/": None, "caf\u00e9/%41 x": b"4", "new\nline": b"5",
                            "sp ace/\u00e9t\u00e9": b"6", "x" * 255: b"7"})
    rb = os.fsencode(root)
    for raw in (b"latin\xe9", b"sur\xed\xa0\x80rogate", b"cut\xe2\x82", b"\xff\xfe%",
                b"ok\xf0\x9f\x98\x80", b"over\xc0\xafong", b"big\xf4\x90\x80\x80"):
        with open(os.path.join(rb, raw), "wb") as f:
            f.write(raw)
    os.mkdir(os.path.join(rb, b"dir\x80"))
    with open(os.path.join(rb, b"dir\x80", b"in\x81side"), "wb") as f:
        f.write(b"x")
    os.symlink("a.dat", root / "ln")
    os.symlink("nowhere", root / "dangling")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("sub", root / "dirlink")   # a link to a folder: an entry, never followed
    os.symlink(b"\xff%target\nx", os.path.join(rb, b"oddtarget"))
    os.mkfifo(root / "fifo")
    # castlib's own temporary (left out, reported) and a user's look-alike (a file)
    real = temp_path("sub/b.dat", key)
    (root / real).write_bytes(b"partial")
    (root / ".b.dat.castlib-part-0123456789ab0123456789abcdef").write_bytes(b"mine")
    # a folder named as castlib's temporary (castlib makes none): left out, its content not
    (root / temp_path("folder", key)).mkdir()
    folder_temp = next(p for p in os.listdir(root) if p.startswith(".folder.castlib-part-"))
    (root / folder_temp / "inside").write_bytes(b"i")
    deep = root / "deep"
    deep.mkdir()
    cwd = os.getcwd()
    os.chdir(deep)   # deeper than any recursion limit, by relative steps
    try:
        for _ in range(1500):
            os.mkdir("d")
            os.chdir("d")
        open("bottom", "wb").close()
    finally:
        os.chdir(cwd)
    # paths longer than PATH_MAX: the entries past it are errors of the listing alike
    os.chdir(root)
    try:
        for i in range(40):
            name = f"{i:03d}" + "L" * 117
            os.mkdir(name)
            os.chdir(name)
            open("f", "wb").close()
    finally:
        os.chdir(cwd)
    return root, folder_temp


def _remove_deep(top):
    """rmtree recurses once per level: a chain deeper than Python's recursion limit is
    pulled up one level at a time instead."""
    while os.path.isdir(os.path.join(top, "d", "d")):
        os.rename(os.path.join(top, "d", "d"), os.path.join(top, "up"))
        shutil.rmtree(os.path.join(top, "d"))
        os.rename(os.path.join(top, "up"), os.path.join(top, "d"))
    shutil.rmtree(top)


@pytest.fixture
def deep_cleanup(tmp_path):
    yield
    if os.path.isdir(tmp_path / "t" / "deep"):
        _remove_deep(str(tmp_path / "t" / "deep"))


def test_both_paths_write_the_same_catalog_on_a_hostile_tree(tmp_path, fast_runs, deep_cleanup):
    key = os.urandom(32)
    dbs = _catalogs(tmp_path, key)
    root, folder_temp = _hostile_tree(tmp_path / "t", key)
    py, c = _index_both(dbs, root)
    assert fast_runs == [str(root)]
    assert py == c
    counts, errors, summary, temps, _unlisted = c
    assert len(temps) == 2 and all(".castlib-part-" in t for t in temps)
    assert counts["new"] > 1500 and counts["specials_skipped"] == 1
    assert any("File name too long" in e for e in errors), errors
    assert "1 special file skipped (fifo)" in summary
    _same(tmp_path)
    with Catalog(dbs["c"]) as cat:
        loc = cat.find_location(str(root))
        paths = set(cat.load_entries(loc.id))
    assert {"latin%E9", "sur%ED%A0%80rogate", "cut%E2%82", "%FF%FE%25", "ok\U0001F600",
            "over%C0%AFong", "big%F4%90%80%80", "dir%80/in%81side", "caf\u00e9/%2541 x",
            "new\nline"} <= paths
    assert ".b.dat.castlib-part-0123456789ab0123456789abcdef" in paths
    temps_seen = [p for p in paths if ".castlib-part-" in p and "0123456789ab" not in p]
    assert temps_seen == [f"{folder_temp}/inside"]   # the folder left out, not its content

    # changes of every kind, then the same again (the hourly no-op)
    (root / "a.dat").write_bytes(b"longer")
    shutil.rmtree(root / "sub" / "deep")
    os.unlink(root / "ln")
    os.symlink("sub/b.dat", root / "ln")
    os.chmod(root / "sub" / "b.dat", 0o600)
    (root / "empty").rmdir()
    (root / "empty").write_bytes(b"now a file")
    os.unlink(root / "dangling")
    (root / "dangling").mkdir()
    (root / "dangling" / "inside").write_bytes(b"i")
    os.unlink(os.path.join(os.fsencode(root), b"latin\xe9"))
    os.utime(root / "sp ace", ns=(10**18, 10**18))
    for step in range(2):
        py, c = _index_both(dbs, root)
        assert py == c, step
        _same(tmp_path)
    assert c[0]["new"] == 0 and c[0]["changed"] == 0 and c[0]["deleted"] == 0
    assert len(fast_runs) == 3
    # a folder comes back where its content had vanished: rows undeleted in place
    make_tree(root, {"sub/deep/c": b"3", "sub/deep/more": b"m"})
    py, c = _index_both(dbs, root)
    assert py == c and c[0]["new"] == 1 and c[0]["changed"] == 2
    _same(tmp_path)


def test_the_vanish_guard_stops_both_paths_alike(tmp_path, fast_runs):
    dbs = _catalogs(tmp_path, os.urandom(32))
    root = make_tree(tmp_path / "t", {f"f{i:02d}": b"x" for i in range(30)})
    _index_both(dbs, root)
    for i in range(29):
        os.unlink(root / f"f{i:02d}")
    # no new file here: the C writer may commit the rows it has when it waits 150 ms for
    # its walker (the write lock is never held through such waits), Python holds them to
    # the end of a small tree: a refused run's new rows may differ, never its deletions
    py, c = _index_both(dbs, root)
    assert py == c and "29 of the 30 files the catalog knew there vanished" in c
    _same(tmp_path)
    py, c = _index_both(dbs, root, force=True)
    assert py == c and c[0]["deleted"] == 29
    _same(tmp_path)
    assert len(fast_runs) == 3


def test_an_unreadable_folder_is_reported_alike_and_its_content_kept(fast_runs):
    base = tempfile.mkdtemp(prefix="castlib-accel-")
    try:
        dbs = _catalogs(base, os.urandom(32))
        root = make_tree(os.path.join(base, "t"), {"ok/a.dat": b"a", "locked/b.dat": b"b",
                                                    "locked/in/c": b"c", "c.dat": b"c",
                                                    "noexec/d": b"d"})
        _index_both(dbs, root)
        (root / "new.dat").write_bytes(b"n")
        for dirpath, _dirs, files in os.walk(base):
            os.chmod(dirpath, 0o777)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o666)
        os.chmod(root / "locked", 0o000)
        os.chmod(root / "noexec", 0o666)   # readable, not searchable: its entries fail

        def both():
            return _index_both(dbs, root)

        py, c = in_unprivileged_child(both)
        assert py == c
        counts, errors, *_ = c
        assert counts["deleted"] == 0 and counts["new"] == 1 and counts["unreadable"] == 2
        assert "locked: cannot list: Permission denied" in errors
        os.chmod(root / "locked", 0o755)
        os.chmod(root / "noexec", 0o755)
        _same(base)
    finally:
        for dirpath, _dirs, _files in os.walk(base):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_stale_build_is_not_used(tmp_path, fast_runs, monkeypatch):
    """A .so built from an older _accel.c (pip install -e ., then a pull) says so by its
    VERSION, and the Python path runs."""
    from castlib import _accel

    root = make_tree(tmp_path / "t", {"a": b"1"})
    monkeypatch.setattr(_accel, "VERSION", accel.VERSION - 1)
    assert "stale build" in accel.why_not()
    r = castlib.index(str(root), db=f"sqlite:///{tmp_path}/c.sqlite")
    assert r.counts["new"] == 1 and fast_runs == []
    monkeypatch.setattr(_accel, "SQLITE_VERSION", "0.0.1")
    monkeypatch.setattr(_accel, "VERSION", accel.VERSION)
    assert "two copies of SQLite" in accel.why_not()


def test_filters_checksums_and_other_catalogs_take_the_python_path(tmp_path, fast_runs):
    root = make_tree(tmp_path / "t", {"a": b"1", "b.log": b"2"})
    db = f"sqlite:///{tmp_path}/c.sqlite"
    castlib.index(str(root), db=db, ignore=["*.log"])
    castlib.index(str(root), db=db, checksum="adler32")
    castlib.index(str(root), db=Catalog(f"sqlite:///{tmp_path}/g.sqlite", lean=False))
    assert fast_runs == []
    castlib.index(str(root), db=db)
    assert fast_runs == [str(root)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12))
def test_names_are_escaped_as_the_catalog_does(raw):
    raw = raw.replace(b"\0", b"").replace(b"/", b"")
    from castlib import _accel

    assert _accel.escape(raw) == to_catalog(os.fsdecode(raw))


# -- property: random trees and change sequences, both paths, the same catalog -------------
NAMES = st.sampled_from([b"a", b"b", b"c\xc3\xa9", b"d\xe9", b"e%", b"f\nx", b"g%25",
                         b"h.castlib-part-0123456789ab0123456789abcdef"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(b"/".join)
CHANGE = st.one_of(
    st.tuples(st.just("write"), PATHS, st.binary(max_size=3)),
    st.tuples(st.just("remove"), PATHS, st.none()),
    st.tuples(st.just("mkdir"), PATHS, st.none()),
    st.tuples(st.just("chmod"), PATHS, st.sampled_from([0o600, 0o644, 0o755])),
    st.tuples(st.just("link"), PATHS, NAMES),
    st.tuples(st.just("touch"), PATHS, st.integers(1, 10**9)),
    st.tuples(st.just("fifo"), PATHS, st.none()),
    st.tuples(st.just("temp"), PATHS, st.none()),
)


def _apply(root: bytes, change, key):
    op, rel, arg = change
    path = os.path.join(root, rel)
    parent = os.path.dirname(path)
    try:
        if op in ("write", "link", "fifo", "temp"):
            os.makedirs(parent, exist_ok=True)
        if op == "write":
            if os.path.lexists(path) and not os.path.isfile(path):
                return   # a fifo would block the open; a folder or link cannot take it
            with open(path, "wb") as f:
                f.write(arg)
        elif op == "remove":
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
            else:
                shutil.rmtree(path)
        elif op == "mkdir":
            os.makedirs(path, exist_ok=True)
        elif op == "chmod" and os.path.exists(path) and not os.path.islink(path):
            os.chmod(path, arg if not os.path.isdir(path) else arg | 0o700)
        elif op == "link":
            os.symlink(arg, path)
        elif op == "touch" and os.path.exists(path) and not os.path.islink(path):
            os.utime(path, ns=(arg * 1000, arg * 1000))
        elif op == "fifo":
            os.mkfifo(path)
        elif op == "temp":   # one of castlib's own, beside `path`
            tmp = os.fsencode(temp_path(os.fsdecode(path), key))
            with open(tmp, "wb") as f:
                f.write(b"t")
    except OSError:   # exists, not a folder, a path through a link loop...
        pass   # a change the tree as it is cannot take: skipped, for both paths alike


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.lists(CHANGE, max_size=8), min_size=1, max_size=4))
def test_random_trees_and_changes_give_the_same_catalog(tmp_path_factory, steps):
    base = tmp_path_factory.mktemp("accel")
    key = os.urandom(32)
    dbs = _catalogs(base, key)
    root = base / "t"
    root.mkdir()
    (root / "seed").write_bytes(b"s")
    for changes in steps:
        for change in changes:
            _apply(os.fsencode(root), change, key)
        py, c = _index_both(dbs, root, force=True)
        assert py == c
        _same(base)


def _location_id(db_file, root) -> int:
    import sqlite3
    with sqlite3.connect(db_file) as con:
        ids = [i for (i,) in con.execute("SELECT id FROM locations")]
    assert len(ids) == 1, ids
    return ids[0]


def test_the_write_lock_is_not_held_past_a_second(tmp_path, fast_runs):
    """Every other writer of the catalog (another index, a sync's records, `runs cancel`,
    this process's heartbeat) waits for the index's write lock, and fails after its busy
    timeout: the accelerator commits a batch held a second, whatever its size. Here the
    first 4000 entries of the walk change (one transaction: the batch is 20000), the
    progress callback at 4096 starts a writer with a 3 s timeout and sleeps past the
    second; the rest of the walk writes nothing (no new transaction), so the writer gets the lock only if the
    index committed on its own (before, it held it until commit())."""
    import sqlite3
    import threading
    import time
    from datetime import datetime

    from castlib import _accel
    from castlib.catalog.lite import stamp
    from castlib.catalog.records import BATCH, WRITES_KEY

    dbs = _catalogs(tmp_path, os.urandom(32))
    root = tmp_path / "t"
    root.mkdir()
    for i in range(6000):
        (root / f"f{i:05d}").write_bytes(b"x")
    castlib.index(str(root), db=dbs["c"])
    db_file = str(tmp_path / "c.sqlite")
    loc_id = _location_id(db_file, root)
    for name in os.listdir(root)[:4000]:   # readdir order: the walk's
        os.utime(root / name, ns=(10**18, 10**18))
    outcome = []

    def other_writer():
        try:
            # BEGIN IMMEDIATE: waits for the lock (a deferred one would fail on its
            # stale snapshot once it gets it)
            con = sqlite3.connect(db_file, timeout=3, isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT INTO settings (name, value) VALUES ('probe', 'x') "
                            "ON CONFLICT (name) DO UPDATE SET value = 'y'")
                con.execute("COMMIT")
            finally:
                con.close()
            outcome.append("written")
        except sqlite3.OperationalError as exc:
            outcome.append(str(exc))

    other = threading.Thread(target=other_writer)
    calls = []

    def progress(n):
        # the callback also comes when the writer waited 150 ms for the walker (a loaded
        # machine): the test acts once the writer is 4096 entries into the folder
        calls.append(n)
        if sum(calls) >= 4096 and not other.is_alive() and not outcome:
            other.start()
            time.sleep(1.3)

    indexer = _accel.Indexer(db_file, str(root), loc_id, stamp(datetime.utcnow()), BATCH,
                             lambda name: False, progress, f"{WRITES_KEY}{loc_id}")
    try:
        listing = indexer.run()
        other.join()
        indexer.commit()
    finally:
        indexer.close()
    assert sum(calls) >= 4096 and listing["counts"]["changed"] == 4000
    assert outcome == ["written"]


def test_a_folder_swapped_for_a_link_mid_walk_is_not_followed(tmp_path, fast_runs):
    """O_NOFOLLOW covers a path's last component only: a parent folder replaced by a link
    once listed must not lead the walk out of the tree. Made deterministic with the
    bounded queue between the threads (65536 entries): the root holds, in its readdir
    order (the walk's), two folders of 66000 files and `z` with z/q/r.dat. The walker
    lists both big ones and z, then waits for room; while the writer is in the first big
    one (its progress callback), z is swapped for a link to a tree whose q holds
    secret.dat. q, opened after that, is reported unreadable, and nothing of the outside
    tree is written. The walker, alive then, is checked to block the signals."""
    import sqlite3
    import time
    from datetime import datetime

    from castlib import _accel
    from castlib.catalog.lite import stamp
    from castlib.catalog.records import BATCH, WRITES_KEY

    dbs = _catalogs(tmp_path, os.urandom(32))
    root = tmp_path / "t"
    root.mkdir()
    for name in ("d0", "d1", "d2"):
        (root / name).mkdir()
    big1, big2, z = os.listdir(root)
    make_tree(root / z, {"q/r.dat": b"r"})
    make_tree(tmp_path / "outside", {"q/secret.dat": b"s"})
    castlib.index(str(root), db=dbs["c"])
    db_file = str(tmp_path / "c.sqlite")
    loc_id = _location_id(db_file, root)
    for big in (big1, big2):
        for i in range(66000):
            os.close(os.open(root / big / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    calls = []
    before = set(os.listdir("/proc/self/task"))
    masked, swapped = [], []

    def progress(n):
        calls.append(n)
        # once the writer is 4096 entries into the first big folder (the callback also
        # comes earlier when the writer waited 150 ms for the walker, on a loaded machine)
        if sum(calls) >= 4096 and not swapped:
            swapped.append(True)
            time.sleep(0.5)   # the walker lists z and waits for room in the queue
            os.rename(root / z, tmp_path / "z-was")
            os.symlink(tmp_path / "outside", root / z)
            # the walker (the one new thread) blocks SIGINT and SIGTERM: a signal taken
            # there would interrupt its system calls (EINTR: a folder said unreadable)
            for tid in set(os.listdir("/proc/self/task")) - before:
                with open(f"/proc/self/task/{tid}/status") as f:
                    blk = [int(line.split()[1], 16) for line in f if line.startswith("SigBlk:")]
                masked.append(all(blk[0] >> (sig - 1) & 1 for sig in (2, 15)))

    indexer = _accel.Indexer(db_file, str(root), loc_id, stamp(datetime.utcnow()), BATCH,
                             lambda name: False, progress, f"{WRITES_KEY}{loc_id}")
    try:
        listing = indexer.run()
        indexer.commit()
    finally:
        indexer.close()
    assert masked == [True]
    assert [(path, message.split(" (")[0]) for path, message in listing["errors"]] == [
        (f"{z}/q", "replaced while the index ran")]
    with sqlite3.connect(db_file) as con:
        paths = [p for (p,) in con.execute("SELECT path FROM entries WHERE path LIKE ?",
                                           (f"{z}/%",))]
    assert paths == [f"{z}/q", f"{z}/q/r.dat"]
    assert [p for p, _id, _kind in listing["unseen"]] == [f"{z}/q/r.dat"]


def test_a_negative_entry_id_is_an_error_not_a_hang(tmp_path, fast_runs):
    """The bitmap of the ids seen doubled its size until it held the id: a negative one
    (a catalog written by hand, or by another tool) looped forever, the GIL released."""
    import sqlite3
    from datetime import datetime

    from castlib import _accel
    from castlib.catalog.lite import stamp
    from castlib.catalog.records import BATCH, WRITES_KEY

    dbs = _catalogs(tmp_path, os.urandom(32))
    root = make_tree(tmp_path / "t", {"a.dat": b"a", "b.dat": b"b"})
    castlib.index(str(root), db=dbs["c"])
    db_file = str(tmp_path / "c.sqlite")
    loc_id = _location_id(db_file, root)
    with sqlite3.connect(db_file) as con:
        con.execute("UPDATE entries SET id = -5 WHERE path = 'a.dat'")
    indexer = _accel.Indexer(db_file, str(root), loc_id, stamp(datetime.utcnow()), BATCH,
                             lambda name: False, None, f"{WRITES_KEY}{loc_id}")
    try:
        with pytest.raises(_accel.Error, match="catalog entry id -5 is out of range"):
            indexer.run()
    finally:
        indexer.close()


def test_close_and_commit_are_refused_while_the_indexer_runs(tmp_path, fast_runs):
    """The connection is opened without SQLite's mutex (one thread uses it at a time): a
    close() or commit() from another thread while run() writes, GIL released, is refused
    (here from the progress callback, which run() calls while it runs)."""
    from datetime import datetime

    from castlib import _accel
    from castlib.catalog.lite import stamp
    from castlib.catalog.records import BATCH, WRITES_KEY

    dbs = _catalogs(tmp_path, os.urandom(32))
    root = make_tree(tmp_path / "t", {"a.dat": b"a"})
    castlib.index(str(root), db=dbs["c"])
    db_file = str(tmp_path / "c.sqlite")
    loc_id = _location_id(db_file, root)
    (root / "b.dat").write_bytes(b"b")
    refused = []

    def progress(n):
        for call in ("close", "commit"):
            try:
                getattr(indexer, call)()
            except _accel.Error as exc:
                refused.append(str(exc))

    indexer = _accel.Indexer(db_file, str(root), loc_id, stamp(datetime.utcnow()), BATCH,
                             lambda name: False, progress, f"{WRITES_KEY}{loc_id}")
    try:
        listing = indexer.run()
        indexer.commit()
    finally:
        indexer.close()
    assert refused == ["the indexer is running (in another thread)"] * 2
    assert listing["counts"]["new"] == 1
