"""The one write life cycle (backends/base.py WriteStream) on every back-end, against the
real servers: a `with` block that ends cleanly commits; one left on an exception aborts
and leaves nothing under the name; and a copy whose source fails mid-read commits
nothing (transfer.py writes inside `with`), leaving neither the final name nor its
temporary."""
from __future__ import annotations

import os

import pytest

from castlib import transfer
from castlib.backends import open_backend
from castlib.backends.local import LocalBackend
from castlib.errors import StorageError
from castlib.location import parse_location

MIB = 1024 * 1024
KINDS = ["local", "memory", "xrootd", "castor-tools", "s3", "sftp", "webdav"]


@pytest.fixture(params=KINDS)
def dst(request, tmp_path):
    """An empty destination location of each kind, and its back-end."""
    kind = request.param
    if kind == "local":
        (tmp_path / "dst").mkdir()
        url, options = str(tmp_path / "dst"), {}
    elif kind == "memory":
        url, options = f"memory://castlib-lifecycle/{tmp_path.name}", {}
    elif kind == "xrootd":
        url, options = request.getfixturevalue("xrootd_folder").url, {}
    elif kind == "castor-tools":
        tools, folder = (request.getfixturevalue("castor_tools"),
                         request.getfixturevalue("xrootd_folder"))
        url, options = tools.url_of(folder.path), tools.options()
    elif kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        url, options = f"{bucket.url}/lifecycle", bucket.options
    else:
        server = request.getfixturevalue(f"{kind}_server")
        url, options = server.url, server.options
    backend = open_backend(url, options)
    backend.mkdir("")
    yield backend
    backend.close()


def names(backend) -> list[str]:
    return sorted(st.path for st in backend.walk(lambda path, msg: pytest.fail(msg)))


def test_a_clean_with_block_commits(dst):
    data = os.urandom(MIB + 17)
    with dst.open_write("f.bin") as f:
        f.write(data[:MIB])
        f.write(data[MIB:])
    assert f.closed
    with dst.open_read("f.bin") as r:
        got = b"".join(iter(lambda: r.read(MIB), b""))
    assert got == data


def test_a_with_block_left_on_an_exception_leaves_nothing(dst):
    with pytest.raises(RuntimeError, match="the caller gave up"):
        with dst.open_write("half.bin") as f:
            f.write(os.urandom(MIB))
            raise RuntimeError("the caller gave up")
    assert f.closed
    assert dst.stat("half.bin") is None
    assert names(dst) == []


class _FailingReader:
    """A real file's bytes, then a read error after `good` bytes (a disk that fails, a
    connection that drops mid-read)."""

    def __init__(self, path: str, good: int):
        self._f = open(path, "rb")
        self._left = good

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise StorageError("read error in the middle of the file", path="big.bin")
        data = self._f.read(min(size, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _SourceFailingMidRead(LocalBackend):
    def open_read(self, path: str):
        return _FailingReader(self._abs(path), 2 * MIB)


def test_a_read_error_mid_copy_commits_nothing_and_leaves_nothing(dst, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.bin").write_bytes(os.urandom(5 * MIB))
    src = _SourceFailingMidRead(parse_location(str(tmp_path / "src")))
    committed = []
    open_write = dst.open_write

    def spying_open_write(path):   # the real stream, its commits (close()) recorded
        stream = open_write(path)
        close = stream.close
        stream.close = lambda: (committed.append(path), close())[1]
        return stream

    dst.open_write = spying_open_write
    with pytest.raises(StorageError, match="read error in the middle"):
        transfer.copy_file(src, "big.bin", dst, "big.bin", algorithm="md5",
                           expected_size=5 * MIB, expected_checksum=None, mtime_ns=None,
                           temp_key=b"k" * 32, chunk_size=MIB)
    assert committed == []          # the upload was aborted, not completed with 2 MiB
    assert names(dst) == []         # neither the final name nor a temporary
