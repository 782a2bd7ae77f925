"""Sparse files keep their holes when synced to a local file system (as cp --sparse does):
all-zero blocks are skipped with a seek, the size set at the end; the bytes are the same."""
import hashlib
import os

import castlib

MiB = 1024 * 1024


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def test_a_sparse_file_synced_locally_stays_sparse_and_byte_identical(tmp_path, db_url):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.img", "wb") as f:   # 64 MiB: a hole, 1 MiB of data, a hole
        f.truncate(64 * MiB)
        f.seek(20 * MiB + 123)                  # data not aligned to blocks either
        f.write(os.urandom(MiB))
    with open(src / "head.img", "wb") as f:     # data, then a hole to the end
        f.write(b"\x01" * 5000)
        f.truncate(16 * MiB)
    assert os.stat(src / "sparse.img").st_blocks * 512 < 4 * MiB, "this file system made no hole"

    r = castlib.sync(str(src), str(tmp_path / "dst"), db=db_url)
    assert r.counts["copied"] == 2 and r.exit_code == 0

    for name, limit in (("sparse.img", 2 * MiB + 64 * 1024), ("head.img", 64 * 1024)):
        a, b = src / name, tmp_path / "dst" / name
        assert os.stat(b).st_size == os.stat(a).st_size
        assert _sha256(b) == _sha256(a)
        assert os.stat(b).st_blocks * 512 <= limit, f"{name}: {os.stat(b).st_blocks * 512} bytes allocated"
    assert castlib.verify(str(tmp_path / "dst"), db=db_url).exit_code == 0


def test_dense_files_with_zero_runs_copy_exactly(tmp_path, db_url):
    """Zero runs at every alignment, at the start, the end, across chunk boundaries."""
    src = tmp_path / "src"
    src.mkdir()
    block = 4096
    pieces = [bytes(block), os.urandom(1), bytes(3 * block + 7), os.urandom(block - 1),
              bytes(4 * MiB + 5), os.urandom(10), bytes(2 * block)]
    (src / "mixed.dat").write_bytes(b"".join(pieces))
    (src / "zeros.dat").write_bytes(bytes(9 * MiB + 3))
    (src / "empty.dat").write_bytes(b"")
    castlib.sync(str(src), str(tmp_path / "dst"), db=db_url)
    for name in ("mixed.dat", "zeros.dat", "empty.dat"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
