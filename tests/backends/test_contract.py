"""The back-end contract (castlib/backends/base.py), one suite run against every back-end:
a real server each (tests/servers/), never a stand-in for one that can run here.

A new back-end joins with one line in BACKENDS: a name, how to reach an empty folder on its
server (a `Location`), and what it cannot hold. What is particular to one back-end (its
errors, its server's extras, its options) stays in that back-end's own test file.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from castlib.backends import DIR, FILE, LINK, open_backend
from castlib.backends.base import Backend
from castlib.checksum import Hasher
from castlib.errors import NotFound, StorageError, Unsupported
from tests.helpers import backend_listing as listing
from tests.helpers import backend_read as read
from tests.helpers import backend_write as write

MIB = 1024 * 1024


@dataclass
class Location:
    """An empty folder of one test on one back-end's server."""

    url: str
    options: dict
    folder: Path | None = None   # the same folder on this machine's disk, if the server's is


def _served(fixture: str, folder: str = "path") -> Callable:
    """A Location from a server fixture that has .url and .options (and the folder's path)."""
    def make(request) -> Location:
        server = request.getfixturevalue(fixture)
        return Location(server.url, server.options, getattr(server, folder, None))
    return make


def _over_asyncssh(fixture: str, folder: str = "path") -> Callable:
    """An SFTP server's Location reached through asyncssh (ssh_client: asyncssh), not
    OpenSSH's ssh (the default where ssh is installed)."""
    served = _served(fixture, folder)

    def make(request) -> Location:
        location = served(request)
        return Location(location.url, {**location.options, "ssh_client": "asyncssh"},
                        location.folder)
    return make


def _local(request) -> Location:
    folder = request.getfixturevalue("tmp_path") / "root"
    folder.mkdir()
    return Location(f"file://{folder}", {}, folder)


def _memory(request) -> Location:
    return Location(f"memory://castlib-contract/{request.node.name}", {})


def _xrootd(request) -> Location:
    folder = request.getfixturevalue("xrootd_folder")
    return Location(folder.url, {}, folder.path)


def _castor_tools(request) -> Location:
    tools, folder = (request.getfixturevalue(f) for f in ("castor_tools", "xrootd_folder"))
    return Location(tools.url_of(folder.path), tools.options(), folder.path)


def _s3(request) -> Location:
    bucket = request.getfixturevalue("s3_bucket")
    return Location(f"{bucket.url}/some/prefix", bucket.options)


@dataclass(frozen=True)
class Kind:
    name: str
    location: Callable[[pytest.FixtureRequest], Location]
    raw_names: bool = False          # holds names that are not UTF-8 (byte-exact)
    refused: str = ""                # characters it cannot have in a name (Unsupported)
    # {"test name" or "test name[parameter]": why}: xfail(strict=True), so that the fix
    # shows (the test then passes, and strict makes that fail until the entry goes)
    known_failures: dict = field(default_factory=dict)


TAB = "test_names_with_characters_urls_and_shells_treat_specially[tab\there]"
TAB_FAILS = ("rclone serve (1.60) lists a control character as its Unicode picture (rclone's "
             "internal 'Standard' name encoding: a tab is listed as U+2409) but stores a client's "
             "raw tab as it is: a name with a tab is not found under its own name once written, "
             "and nothing in the protocol tells castlib the server is rclone")

RCLONE_SFTP_FAILS = {TAB: TAB_FAILS,
                     "test_permissions_where_held_or_unsupported":
                         "rclone serve sftp ignores chmod without an error; the capability "
                         "stays claimed (sftp: h-sftp)"}

BACKENDS = [
    Kind("local", _local, raw_names=True),
    Kind("memory", _memory, raw_names=True),
    Kind("xrootd", _xrootd, refused="?"),
    Kind("castor-tools", _castor_tools, raw_names=True, refused="?"),
    Kind("s3", _s3),
    Kind("sftp", _served("sftp_server", "folder"), raw_names=True),
    Kind("rclone-sftp", _served("rclone_sftp_server"), raw_names=True,
         known_failures=RCLONE_SFTP_FAILS),
    Kind("sftp-asyncssh", _over_asyncssh("sftp_server", "folder"), raw_names=True),
    Kind("rclone-sftp-asyncssh", _over_asyncssh("rclone_sftp_server"), raw_names=True,
         known_failures=RCLONE_SFTP_FAILS),
    Kind("webdav", _served("webdav_server")),
    Kind("davs", _served("webdavs_server")),
    Kind("rclone-webdav", _served("rclone_webdav_server"),
         known_failures={TAB: TAB_FAILS}),
]


@pytest.fixture(params=BACKENDS, ids=lambda k: k.name)
def kind(request) -> Kind:
    return request.param


@pytest.fixture
def location(kind, request) -> Location:
    params = [v for k, v in request.node.callspec.params.items() if k != "kind"]
    for key in [request.node.originalname] + [f"{request.node.originalname}[{v}]" for v in params]:
        if key in kind.known_failures:
            request.applymarker(pytest.mark.xfail(strict=True, reason=kind.known_failures[key]))
    return kind.location(request)


@pytest.fixture
def backend(location) -> Backend:
    """The back-end of an empty location that exists."""
    b = open_backend(location.url, location.options)
    b.mkdir("")
    try:
        yield b
    finally:
        b.close()


def digest(algorithm: str, data: bytes) -> str:
    hasher = Hasher((algorithm,))
    hasher.update(data)
    return hasher.hexdigests()[algorithm]


# -- listing --------------------------------------------------------------------------------
def test_walk_lists_kinds_sizes_and_mtimes_parents_first(backend):
    started = time.time()
    tree = {"top.txt": b"t", "a/x.txt": b"", "a/b/c.txt": b"hello", "a/b/d/deep.bin": b"\0" * 10}
    for path, data in tree.items():
        backend.mkdir(path.rpartition("/")[0])
        write(backend, path, data)
    backend.mkdir("empty")
    backend.mkdir("a/empty2")

    entries = listing(backend)
    found = {st.path: (st.kind, st.size if st.kind == FILE else None) for st in entries}
    expected = {"top.txt": (FILE, 1), "a": (DIR, None), "a/x.txt": (FILE, 0), "a/b": (DIR, None),
                "a/b/c.txt": (FILE, 5), "a/b/d": (DIR, None), "a/b/d/deep.bin": (FILE, 10)}
    if backend.capabilities.empty_dirs:
        expected.update({"empty": (DIR, None), "a/empty2": (DIR, None)})
    assert found == expected
    assert len(entries) == len(found)   # each entry once
    order = [st.path for st in entries]
    for path in order:
        if "/" in path:
            assert order.index(path.rpartition("/")[0]) < order.index(path), order
    # the server's clock is this machine's; a listing may keep minutes only (CASTOR)
    slack = backend.capabilities.mtime_precision_ns / 1e9 + 5
    for st in entries:
        if st.kind == FILE:
            assert started - slack <= st.mtime_ns / 1e9 <= time.time() + 5, st


def test_walk_of_an_empty_location_lists_nothing(backend):
    assert backend.root_exists()
    assert listing(backend) == []


def test_walk_and_stat_of_a_missing_root(location):
    b = open_backend(location.url + "/not-there", location.options)
    if not b.capabilities.empty_dirs:   # an object store: a prefix with no key is empty
        assert list(b.walk(lambda *a: pytest.fail("no folder to fail on"))) == []
        return
    assert not b.root_exists()
    with pytest.raises(StorageError, match="does not exist"):
        list(b.walk(lambda *a: pytest.fail("the root itself is no folder to skip")))


def test_mkdir_of_the_root_creates_a_missing_location_with_its_parents(location):
    url = f"{location.url}/new root/deeper"
    b = open_backend(url, location.options)
    b.mkdir("")
    assert b.root_exists()
    write(b, "f", b"in a new place")
    assert read(open_backend(location.url, location.options), "new root/deeper/f") == b"in a new place"


def test_names_that_are_not_utf8(kind, location, backend):
    """A name that is not UTF-8 (a surrogate escape, as os.fsdecode gives) round-trips
    byte-exact where the back-end can hold one; elsewhere it is refused, one clear error,
    and nothing is made."""
    name = os.fsdecode(b"latin1-\xe9t\xe9.txt")
    if not kind.raw_names:
        with pytest.raises(Unsupported, match="UTF-8"):
            write(backend, name, b"x")
        assert listing(backend) == []
        return
    write(backend, name, b"caf\xe9")
    [entry] = listing(backend)
    assert entry.path == name and entry.size == 4
    assert read(backend, name) == b"caf\xe9"
    if location.folder is None:
        return
    assert os.listdir(os.fsencode(location.folder)) == [b"latin1-\xe9t\xe9.txt"]
    raw = b"made-there-\xff"   # and one made on the server's side is listed as it is
    (location.folder / os.fsdecode(raw)).write_bytes(b"there")
    assert read(backend, os.fsdecode(raw)) == b"there"
    assert os.fsdecode(raw) in {st.path for st in listing(backend)}


# -- stat -----------------------------------------------------------------------------------
def test_stat_of_files_folders_and_missing_entries(backend):
    assert backend.stat("nope") is None
    assert backend.stat("no/such/file.txt") is None
    backend.mkdir("d")
    write(backend, "d/here.txt", b"12345")
    st = backend.stat("d/here.txt")
    assert (st.path, st.kind, st.size, st.name) == ("d/here.txt", FILE, 5, "here.txt")
    assert st.mtime_ns
    assert backend.stat("d").kind == DIR
    assert backend.stat("").kind == DIR


def test_stat_many_answers_as_stat_does_for_each(backend):
    """stat_many: each path's stat, whether one after another or a batch in a round trip."""
    backend.mkdir("d/e")
    write(backend, "d/here.txt", b"12345")
    paths = ["d", "nope", "d/here.txt", "d/e", "no/such/file.txt", "d/e/none"]
    got = dict(backend.stat_many(paths))

    def seen(st):
        return (st.kind, st.size if st.kind == FILE else None) if st else None

    assert {p: seen(st) for p, st in got.items()} == {p: seen(backend.stat(p)) for p in paths}
    assert (seen(got["d"]), seen(got["d/here.txt"]), got["nope"]) == ((DIR, None), (FILE, 5), None)
    if backend.capabilities.symlinks:
        try:
            backend.symlink("link-to-d", "d")
        except Unsupported:
            return
        assert dict(backend.stat_many(["link-to-d"]))["link-to-d"].kind == LINK


# -- data -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 9 * MIB + 17], ids=["empty", "one-byte", "9MiB"])
def test_write_read_round_trip_is_byte_exact(backend, size):
    data = os.urandom(size)   # 9 MiB: more than one part of an upload, several reads
    write(backend, "data.bin", data)
    assert backend.stat("data.bin").size == size
    assert read(backend, "data.bin") == data


def test_write_replaces_an_existing_file(backend):
    write(backend, "f", b"old content, longer")
    write(backend, "f", b"new")
    assert read(backend, "f") == b"new"


def test_read_of_a_missing_file_is_not_found(backend):
    with pytest.raises(NotFound):
        read(backend, "missing.bin")


def test_write_commits_on_a_clean_exit(backend):
    with backend.open_write("f") as stream:
        stream.write(b"committed")
    assert read(backend, "f") == b"committed"


class _Interrupted(Exception):
    pass


def test_write_that_raises_leaves_nothing_under_the_final_name(backend):
    """open_write(...) as stream; an exception inside: the file is not there (at most a
    temporary elsewhere), never a partial file under its final name."""
    with pytest.raises(_Interrupted):
        with backend.open_write("partial.bin") as stream:
            stream.write(os.urandom(MIB))
            raise _Interrupted
    assert backend.stat("partial.bin") is None
    assert "partial.bin" not in {st.path for st in listing(backend)}
    write(backend, "after", b"the back-end goes on working")
    assert read(backend, "after") == b"the back-end goes on working"


def _algorithms(backend) -> list[str]:
    return sorted({"adler32", "md5", "sha256"} | backend.capabilities.server_checksums)


def test_checksum_equals_castlib_computation(backend):
    data = os.urandom(3 * MIB + 5)
    write(backend, "sum.bin", data)
    write(backend, "empty", b"")
    for algorithm in _algorithms(backend):
        assert backend.checksum("sum.bin", algorithm) == digest(algorithm, data), algorithm
        assert backend.checksum("empty", algorithm) == digest(algorithm, b""), algorithm


def test_checksum_of_a_missing_file_is_not_found(backend):
    for algorithm in _algorithms(backend):
        with pytest.raises(NotFound):
            backend.checksum("nope", algorithm)


# -- namespace ------------------------------------------------------------------------------
def test_mkdir_makes_parents_and_tolerates_an_existing_folder(backend):
    backend.mkdir("x/y/z")
    backend.mkdir("x/y/z")
    write(backend, "x/y/z/f", b"1")
    assert backend.stat("x/y").kind == DIR
    assert backend.stat("x/y/z/f").size == 1


def test_rename_replaces_the_target(backend):
    write(backend, "new.tmp", b"fresh bytes")
    backend.mkdir("dir")
    write(backend, "dir/final.dat", b"stale")
    backend.rename("new.tmp", "dir/final.dat")
    assert backend.stat("new.tmp") is None
    assert read(backend, "dir/final.dat") == b"fresh bytes"


def test_rename_of_a_missing_source_fails_and_keeps_the_target(backend):
    write(backend, "target", b"keep me")
    with pytest.raises(StorageError):
        backend.rename("missing", "target")
    assert read(backend, "target") == b"keep me"


def test_delete_a_file_and_an_empty_folder(backend):
    backend.mkdir("d")
    write(backend, "d/f", b"1")
    backend.delete("d/f")
    assert backend.stat("d/f") is None
    if backend.capabilities.empty_dirs:   # on S3 the folder went with its last key
        assert backend.stat("d").kind == DIR
        backend.delete("d")
    assert backend.stat("d") is None
    with pytest.raises(NotFound):
        backend.delete("d/f")


def test_delete_refuses_a_folder_with_content(backend):
    backend.mkdir("full")
    write(backend, "full/keep", b"keep me")
    with pytest.raises(StorageError):
        backend.delete("full")
    assert read(backend, "full/keep") == b"keep me"


HOSTILE_NAMES = ["with space.txt", "quote'and\"double", "-leading-dash", "ünïcödé-名前 ✓.dat",
                 "hash#tag", "per%25cent%", "what?.txt", "semi;colon&amp", "plus+sign",
                 "tab\there"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_names_with_characters_urls_and_shells_treat_specially(kind, backend, name):
    folder, path = f"dir {name}", f"dir {name}/{name}"
    if set(name) & set(kind.refused):
        with pytest.raises(Unsupported, match="cannot contain"):
            write(backend, name, b"x")
        assert listing(backend) == []
        return
    backend.mkdir(folder)
    write(backend, path, name.encode())
    assert backend.stat(path).kind == FILE
    assert read(backend, path) == name.encode()
    assert backend.checksum(path, "adler32") == digest("adler32", name.encode())
    assert {st.path for st in listing(backend)} == {folder, path}
    backend.rename(path, f"{folder}/renamed {name}")
    assert read(backend, f"{folder}/renamed {name}") == name.encode()
    backend.delete(f"{folder}/renamed {name}")
    assert backend.stat(f"{folder}/renamed {name}") is None


# -- metadata: each capability, or Unsupported ----------------------------------------------
def declared_or_unsupported(backend: Backend, capability: str, call: Callable[[], object]) -> bool:
    """Whether the back-end declares `capability`; where it does not, call() must raise
    Unsupported (and the test has nothing more to check)."""
    if getattr(backend.capabilities, capability):
        return True
    with pytest.raises(Unsupported):
        call()
    return False


def test_set_mtime_within_the_declared_precision_or_unsupported(backend):
    write(backend, "f", b"data")
    wanted = 1_600_000_000_123_456_789
    if not declared_or_unsupported(backend, "set_mtime", lambda: backend.set_mtime("f", wanted)):
        return
    backend.set_mtime("f", wanted)
    precision = backend.capabilities.mtime_precision_ns
    assert abs(backend.stat("f").mtime_ns - wanted) < precision
    assert abs({st.path: st for st in listing(backend)}["f"].mtime_ns - wanted) < precision


def test_symlink_where_links_are_held_or_unsupported(backend):
    """A link is listed as a link with its target, never followed; a back-end that holds
    none says Unsupported. A server that refuses what its protocol promised (rclone's SFTP)
    is learned: Unsupported, and the capability turns off for the location."""
    backend.mkdir("d")
    write(backend, "d/inside", b"x")
    if not declared_or_unsupported(backend, "symlinks", lambda: backend.symlink("link-to-d", "d")):
        assert backend.stat("link-to-d") is None
        return
    try:
        backend.symlink("link-to-d", "d")
    except Unsupported:
        assert backend.capabilities.symlinks is False
        return
    entries = {st.path: st for st in listing(backend)}
    assert (entries["link-to-d"].kind, entries["link-to-d"].link_target) == (LINK, "d")
    assert "link-to-d/inside" not in entries
    assert backend.stat("link-to-d").kind == LINK
    backend.delete("link-to-d")
    assert backend.stat("link-to-d") is None and read(backend, "d/inside") == b"x"


def test_permissions_where_held_or_unsupported(backend):
    write(backend, "f", b"x")
    if not declared_or_unsupported(backend, "permissions", lambda: backend.chmod("f", 0o600)):
        return
    backend.chmod("f", 0o600)
    assert backend.stat("f").mode & 0o7777 == 0o600
    backend.chmod("f", 0o644)
    assert backend.stat("f").mode & 0o7777 == 0o644


def test_hard_links_where_held_or_unsupported(backend):
    write(backend, "first", b"shared")
    if not declared_or_unsupported(backend, "hard_links",
                                   lambda: backend.hard_link("second", "first")):
        assert backend.stat("second") is None
        return
    backend.hard_link("second", "first")
    first, second = backend.stat("first"), backend.stat("second")
    assert first.inode is not None and first.inode == second.inode
    assert read(backend, "second") == b"shared"


def test_owner_where_held_or_unsupported(backend):
    write(backend, "f", b"x")
    if not declared_or_unsupported(backend, "owner", lambda: backend.chown("f", 0, 0)):
        return
    st = backend.stat("f")
    backend.chown("f", st.uid, st.gid)   # as root: giving it to its own owner changes nothing
    assert (backend.stat("f").uid, backend.stat("f").gid) == (st.uid, st.gid)
