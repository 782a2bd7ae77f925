"""What is particular to the XRootD back-end, against a real xrootd server: its schemes,
server checksums, third-party copy, tape staging and the errors a user sees. The contract
every back-end keeps is tests/backends/test_contract.py."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from castlib.backends import FILE, open_backend
from castlib.checksum import Hasher
from castlib.errors import NotFound, StorageError, Unsupported
from castlib.backends.xrootd import XRootDBackend
from tests.helpers import backend_read as read
from tests.helpers import backend_write as write
from tests.helpers import make_tree
from tests.servers.common import free_port

MIB = 1024 * 1024


def adler32(data: bytes) -> str:
    h = Hasher(("adler32",))
    h.update(data)
    return h.hexdigests()["adler32"]


def no_listing_errors(path, message):
    pytest.fail(f"cannot list {path}: {message}")


@pytest.fixture
def backend(xrootd_folder):
    b = open_backend(xrootd_folder.url)
    yield b
    b.close()


def test_registry_serves_every_xrootd_scheme(xrootd_folder):
    for scheme in ("root", "xroot"):
        url = xrootd_folder.url.replace("root://", f"{scheme}://", 1)
        b = open_backend(url)
        assert isinstance(b, XRootDBackend)
        assert b.root_exists()


def test_listed_mtimes_are_the_files_to_the_second_and_files_on_disk_are_online(
        backend, xrootd_folder):
    make_tree(xrootd_folder.path, {"a.txt": b"abc", "d/e/f.bin": b"12345"})
    by_path = {st.path: st for st in backend.walk(no_listing_errors)}
    local_mtime = os.stat(xrootd_folder.path / "d/e/f.bin").st_mtime_ns
    assert by_path["d/e/f.bin"].mtime_ns == local_mtime // 10**9 * 10**9
    assert by_path["a.txt"].online is True


def test_walk_reports_unlistable_folder_and_goes_on(backend, xrootd_folder):
    make_tree(xrootd_folder.path, {"closed/secret": b"x", "open/ok": b"y"})
    os.chmod(xrootd_folder.path / "closed", 0o000)   # the server runs unprivileged
    errors = []
    try:
        paths = {st.path for st in backend.walk(lambda p, m: errors.append((p, m)))}
    finally:
        os.chmod(xrootd_folder.path / "closed", 0o755)
    assert {"closed", "open", "open/ok"} <= paths and "closed/secret" not in paths
    assert [p for p, _ in errors] == ["closed"]
    assert "\n" not in errors[0][1]


def test_server_adler32_matches_castlib_xrdadler32_and_xrdfs(backend, xrootd_folder):
    data = os.urandom(2 * MIB + 3)
    write(backend, "c.bin", data)
    ours = adler32(data)
    assert backend.checksum("c.bin", "adler32") == ours
    local = xrootd_folder.path / "c.bin"
    printed = subprocess.run(["xrdadler32", str(local)], capture_output=True, text=True,
                             check=True).stdout.split()[0]
    assert printed == ours
    query = subprocess.run(["xrdfs", xrootd_folder.server.host, "query", "checksum", str(local)],
                           capture_output=True, text=True, check=True).stdout.split()
    assert query == ["adler32", ours]


def test_folder_holding_a_non_utf8_name_is_reported_and_skipped(backend, xrootd_folder):
    make_tree(xrootd_folder.path, {"ok/a": b"a", "bad/": None})
    (xrootd_folder.path / "bad" / os.fsdecode(b"raw\xffbytes")).write_bytes(b"x")
    errors = []
    paths = {st.path for st in backend.walk(lambda p, m: errors.append((p, m)))}
    assert paths == {"ok", "ok/a", "bad"}
    assert len(errors) == 1 and errors[0][0] == "bad" and "UTF-8" in errors[0][1]


def test_stat_of_a_name_that_is_not_utf8_is_refused_clearly(backend):
    with pytest.raises(Unsupported, match="UTF-8"):
        backend.stat(os.fsdecode(b"raw\xffbytes"))


def test_unreachable_server_fails_quickly_with_one_line(tmp_path):
    port = free_port()   # nothing listens there
    b = open_backend(f"root://127.0.0.1:{port}//data")
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        b.stat("x")
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert "\n" not in message and "/data/x" in message
    assert info.value.transient


def test_credentials_never_in_errors():
    port = free_port()
    b = open_backend(f"root://alice:s3cret@127.0.0.1:{port}//data")
    with pytest.raises(StorageError) as info:
        b.stat("x")
    assert "s3cret" not in str(info.value)


def test_third_party_copy_between_folders(xrootd_server):
    src_url, src_dir = xrootd_server.new_folder("tpc-src")
    dst_url, dst_dir = xrootd_server.new_folder("tpc-dst")
    data = os.urandom(3 * MIB + 1)
    (src_dir / "in.bin").write_bytes(data)
    src, dst = open_backend(src_url), open_backend(dst_url, {"tpc_min_size": 0})
    assert dst.copy_from(src, "in.bin", "deep/out.bin") is True
    assert (dst_dir / "deep/out.bin").read_bytes() == data
    # replaces an existing target
    (src_dir / "in.bin").write_bytes(b"second")
    assert dst.copy_from(src, "in.bin", "deep/out.bin") is True
    assert (dst_dir / "deep/out.bin").read_bytes() == b"second"


def test_small_files_are_streamed_not_third_party_copied(xrootd_server):
    src_url, src_dir = xrootd_server.new_folder("tpc-src")
    dst_url, dst_dir = xrootd_server.new_folder("tpc-dst")
    (src_dir / "small").write_bytes(b"x" * 1000)
    assert open_backend(dst_url).copy_from(open_backend(src_url), "small", "out") is False
    assert not (dst_dir / "out").exists()


def test_third_party_copy_from_another_kind_is_declined(backend, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    assert backend.copy_from(open_backend(str(tmp_path)), "f", "f") is False


def test_third_party_copy_of_missing_source_is_not_found(xrootd_server):
    src_url, _ = xrootd_server.new_folder("tpc-src")
    dst_url, _ = xrootd_server.new_folder("tpc-dst")
    with pytest.raises(NotFound):
        open_backend(dst_url).copy_from(open_backend(src_url), "nope", "out")


def test_file_on_tape_is_offline_and_stage_waits_for_its_recall(xrootd_tape_server):
    tape, server = xrootd_tape_server, xrootd_tape_server.server
    tape.put_on_tape(server.data_dir / "run/raw.dat", b"from tape")
    (server.data_dir / "disk.dat").write_bytes(b"on disk")
    backend = open_backend(server.url_of(server.data_dir))
    on_tape = backend.stat("run/raw.dat")
    assert (on_tape.kind, on_tape.size, on_tape.online) == (FILE, 9, False)
    assert backend.stat("disk.dat").online is True

    recall = threading.Timer(1.0, tape.recall, [server.data_dir / "run/raw.dat"])
    recall.start()
    try:
        backend.stage(["run/raw.dat", "disk.dat"], timeout_s=30)
    finally:
        recall.join()
    assert backend.stat("run/raw.dat").online is True
    assert read(backend, "run/raw.dat") == b"from tape"


def test_stage_that_never_completes_names_the_files(xrootd_tape_server):
    tape, server = xrootd_tape_server, xrootd_tape_server.server
    tape.put_on_tape(server.data_dir / "a.dat", b"a")
    tape.put_on_tape(server.data_dir / "b.dat", b"b")
    backend = open_backend(server.url_of(server.data_dir))
    with pytest.raises(StorageError) as info:
        backend.stage(["a.dat", "b.dat"], timeout_s=1)
    message = str(info.value)
    assert "still on tape" in message and "a.dat" in message and "b.dat" in message


def test_stage_of_online_files_returns_at_once(backend):
    write(backend, "f", b"x")
    start = time.monotonic()
    backend.stage(["f"], timeout_s=30)
    assert time.monotonic() - start < 5


def test_checksum_queries_in_flight_per_server_are_bounded(xrootd_folder):
    """xrootd keeps a small table of checksum jobs (3 x `xrootd.chksum max`, and slow to
    free under load); one request too many is told to wait 30 s. Parallel transfers must
    not all ask at once: at most `checksum_queries` (default 2) are in flight."""
    for i in range(12):
        (xrootd_folder.path / f"f{i}").write_bytes(os.urandom(4 * MIB))
    b = open_backend(xrootd_folder.url)
    real_fs, lock = b._fs, threading.Lock()
    in_flight, most = 0, 0

    class CountingFileSystem:   # the real client underneath; only counts what is asked
        def __getattr__(self, name):
            return getattr(real_fs, name)

        def query(self, *args):
            nonlocal in_flight, most
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            try:
                time.sleep(0.05)   # widen the window a burst of queries would share
                return real_fs.query(*args)
            finally:
                with lock:
                    in_flight -= 1

    b._fs = CountingFileSystem()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        sums = list(pool.map(lambda i: b.checksum(f"f{i}", "adler32"), range(12)))
    assert sums == [adler32((xrootd_folder.path / f"f{i}").read_bytes()) for i in range(12)]
    assert most == 2
